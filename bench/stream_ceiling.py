"""How fast Triton programs can stream one decode step's expert weights: the ceiling under the decode kernels.

Legend: D model dim, F expert ffn dim, K top-k, P programs, BK rows per load.

`bench/layer.py`'s floor divides bytes by the copy bandwidth of a large transfer (3.01 TB/s on an H100). A
decode step reads the weights of its K experts, 3·K·D·F bf16 elements (75.5 MB for Qwen3 at T=1), which is
small enough that the ramp of a kernel shows. This times what a plain kernel gets for that many bytes: P
programs, each streaming its share of a [rows, 2048] bf16 matrix (a 256-byte column stripe of each 4 KB row,
as an up tile reads its weights) through `tl.dot` with a 16-row activation tile, as the decode GEMMs do; the
loads by TMA, by pointers, or by TMA for the first half and pointers for the second (the fused decode
kernel's shape: w13's K-loop, then w2's column blocks). Every config is a CUDA-graph replay after the L2 is
emptied by a read. Beside them, `torch.sum` over the same bytes. A table and JSON.

    python bench/stream_ceiling.py --out OUT [--shapes qwen3 gptoss] [--weight-bytes 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import write_rows  # noqa: E402
from layer import SHAPES  # noqa: E402

from moe_fx.lowering.triton import timing  # noqa: E402

COLS, BN = 2048, 128  # the weight matrix's row length, a program's column stripe
PROGRAMS = (96, 128, 192, 256, 384)
PATHS = ("tma", "pointers", "tma+pointers")


@triton.jit
def _stream_kernel(w_ptr, w_desc, x_ptr, out_ptr, rows_per_program, C: tl.constexpr, BK: tl.constexpr,
                   BN: tl.constexpr, STAGES: tl.constexpr, TMA_ROWS: tl.constexpr):  # fmt: skip
    """Program p streams rows [chunk·rows_per_program, +rows_per_program) of the column stripe p % (C/BN) of
    w_RC, acc_16N += x_16K · w_KN per BK rows, and stores acc. TMA_ROWS: the first rows_per_program · TMA_ROWS
    (0, 1/2 or 1) rows by TMA, the rest by pointers in 64-row blocks through h_16x64 = acc's first half (a
    second dependent loop, as the fused decode kernel's w2 loop follows its w13 loop)."""
    pid = tl.program_id(0)
    stripes: tl.constexpr = C // BN
    r0 = (pid // stripes) * rows_per_program
    c0 = (pid % stripes) * BN
    x = tl.load(x_ptr + tl.arange(0, 16)[:, None] * BK + tl.arange(0, BK)[None, :])  # x_16K
    acc = tl.zeros([16, BN], tl.float32)
    by_tma = (rows_per_program * TMA_ROWS).to(tl.int32)
    cols = c0 + tl.arange(0, BN)
    if TMA_ROWS > 0:
        for i in tl.range(0, by_tma, BK, num_stages=STAGES):
            acc = tl.dot(x, w_desc.load([r0 + i, c0]), acc)
    if TMA_ROWS == 0:
        rows = tl.arange(0, BK)
        for i in tl.range(0, rows_per_program, BK, num_stages=STAGES):
            acc = tl.dot(x, tl.load(w_ptr + (r0 + i + rows)[:, None] * C + cols[None, :]), acc)
    elif TMA_ROWS < 1:
        h, _ = tl.split(tl.permute(tl.reshape(acc, (16, 2, BN // 2)), (0, 2, 1)))
        h = h.to(w_ptr.dtype.element_ty)
        rows = tl.arange(0, BN // 2)
        for i in range(by_tma, rows_per_program, BN // 2):
            acc = tl.dot(h, tl.load(w_ptr + (r0 + i + rows)[:, None] * C + cols[None, :]), acc)
    tl.store(out_ptr + pid * 16 * BN + tl.arange(0, 16)[:, None] * BN + tl.arange(0, BN)[None, :], acc)


def stream(w_RC: torch.Tensor, x_16K: torch.Tensor, programs: int, path: str, stages: int,
           out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """acc_P16N (into `out` if given): program p's products of its rows (see `_stream_kernel`)."""
    R, C = w_RC.shape
    BK, chunks = x_16K.shape[1], programs // (C // BN)
    if not splits(R, programs, BK):
        raise ValueError(f"moe_fx: {programs} programs split {R} rows of {C} into no whole {BK}-row loads")
    out = torch.empty((programs, 16, BN), dtype=torch.float32, device=w_RC.device) if out is None else out
    tma_rows = {"tma": 1.0, "pointers": 0.0, "tma+pointers": 0.5}[path]
    w_desc = TensorDescriptor(w_RC, [R, C], [C, 1], [BK, BN])
    _stream_kernel[(programs,)](w_RC, w_desc, x_16K, out, R // chunks, C=C, BK=BK, BN=BN, STAGES=stages,
                                TMA_ROWS=tma_rows, num_warps=4)  # fmt: skip
    return out


def splits(rows: int, programs: int, BK: int) -> bool:
    """Whether `programs` split [rows, COLS] into whole stripes and row chunks of whole BK-row loads in each half
    (the halves of tma+pointers)."""
    chunks = programs // (COLS // BN)
    return programs % (COLS // BN) == 0 and rows % chunks == 0 and (rows // chunks) % (2 * BK) == 0


def rows_for(shape: str, weight_bytes: int = 2) -> int:
    """Rows of bf16 [rows, COLS] holding the bytes of shape's K experts' weights (3·D·F each, of weight_bytes
    each: 1 for fp8 / int8), rounded down to what 96 and 192 programs split into whole loads (`splits`; the
    other program counts run where they split it too)."""
    E, K, D, F = SHAPES[shape]
    step = 12 * 2 * 128  # 192 programs' 12 row chunks, each two halves of whole 128-row loads
    return 3 * K * D * F * weight_bytes // 2 // COLS // step * step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen3"], choices=list(SHAPES))
    p.add_argument("--weight-bytes", type=int, default=2, choices=(1, 2), help="1: a one-byte step's bytes")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    results, path = [], None
    print("| shape | MB | path | BK | stages | programs | µs | TB/s |")
    for shape in args.shapes:
        w = torch.randn(rows_for(shape, args.weight_bytes), COLS, device="cuda", dtype=torch.bfloat16)
        mb = w.numel() * 2 / 1e6
        sum_us = timing.median_us(timing.graph_replay(lambda w=w: w.sum()))
        rows = [dict(shape=shape, path="torch.sum", us=sum_us, mb=mb)]
        for BK in (64, 128):
            x = torch.randn(16, BK, device="cuda", dtype=torch.bfloat16)
            for path_ in PATHS:
                for stages in (2, 3, 4):
                    for programs in (p for p in PROGRAMS if splits(w.shape[0], p, BK)):
                        call = lambda w=w, x=x, p=programs, a=path_, s=stages: stream(w, x, p, a, s)  # noqa: E731
                        us = timing.median_us(timing.graph_replay(call))
                        rows.append(dict(shape=shape, path=path_, BK=BK, stages=stages, programs=programs, us=us,
                                         mb=mb))  # fmt: skip
        for r in rows:
            r["TBs"] = r["mb"] / r["us"]  # MB per µs
        for r in sorted(rows[1:], key=lambda r: r["us"])[:8] + rows[:1]:  # the fastest, and torch.sum
            print(f"| {shape} | {mb:.1f} | {r['path']} | {r.get('BK', '')} | {r.get('stages', '')} | "
                  f"{r.get('programs', '')} | {r['us']:.1f} | {r['TBs']:.2f} |")  # fmt: skip
        results += rows
        path = write_rows(args.out, "stream-ceiling", results, path)


if __name__ == "__main__":
    main()
