"""Where the time of a fused decode kernel goes, program by program: `%globaltimer` stamps in the up kernel.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

The up kernel's source (`experts_kernels.py`) is copied with five stamps added, each program writing them into the
activation buffer h_RF, which a fused config never writes otherwise: its start, the expert bounds known (the offsets
dispatch wrote, a dependent load; routed: its pick known, its token's top-k done), the up K-loop done (its sum
known), the down slice issued (w2's column blocks loaded and multiplied, the atomics issued) and its end; and the SM
it ran on. The shipped config of each (shape, T, quant) runs, made fused if it is not (w2 in `tuning.FUSED_BLOCK_D`
blocks), routed where the rewrite routes it (`tuning.routes`), eagerly after the L2 is emptied by a read; the
medians over 7 calls of each stamp's median and maximum over the programs, in µs from the first program's start, as
a table and JSON.

    python bench/timeline.py --out OUT [--cells qwen3:1 gptoss:1 qwen3:4 qwen3:1:fp8]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import experts_op, write_rows  # noqa: E402
from layer import SHAPES  # noqa: E402

import moe_fx.lowering.triton.experts_kernels as kernels  # noqa: E402
import moe_fx.lowering.triton.grouped_gemm as gg  # noqa: E402
from moe_fx.lowering.triton import timing, tuning  # noqa: E402

STAMPS = ("start", "bounds", "up_done", "down_done", "end")

HELPERS = '''

@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _now_after(x):
    """the time once x (a float32 scalar) is known"""
    return tl.inline_asm_elementwise("{ .reg .f32 t; mov.f32 t, $1; mov.u64 $0, %globaltimer; }", "=l,r", [x],
                                     dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

'''


def _insert(src: str, after: int, pattern: str, line: str, before: bool = False) -> str:
    """src with `line` added at the indentation of the first match of `pattern` (a regex whose group 1 is that
    indentation) past `after`: after the match, or before it."""
    m = re.compile(pattern, re.M).search(src, after)
    if m is None:
        raise RuntimeError(f"moe_fx: experts_kernels.py changed: no {pattern!r} in _up_kernel to stamp")
    at = m.start() if before else m.end()
    return src[:at] + m.group(1) + line + "\n" + src[at:]


def instrumented_kernels() -> str:
    """experts_kernels.py with the stamps added to `_up_kernel`."""
    src = Path(kernels.__file__).read_text()
    head, sep, body = src.partition("\n@triton.jit\ndef _gelu")
    src = head + HELPERS + sep + body
    up = src.index("def _up_kernel(")
    src = _insert(
        src, up, r"^\):  # fmt: skip\n()", "    STAMP = h_ptr.to(tl.pointer_type(tl.int64)) + tl.program_id(0) * 8"
    )
    src = _insert(
        src, up, r"^    STAMP = .*\n()", "    tl.store(STAMP, _now())\n    tl.store(STAMP + 7, _smid().to(tl.int64))"
    )
    bounds = r"^(\s+)e, lo_E, hi_E, real_tiles = _expert_bounds\(.*\n"
    src = _insert(src, up, bounds, "tl.store(STAMP + 1, _now_after(real_tiles.to(tl.float32)))")
    routed = r"^(\s+)expert, pick_w = tl\.reduce\(.*\n"  # a routed program's pick known (in the bounds' slot)
    src = _insert(src, up, routed, "tl.store(STAMP + 1, _now_after(pick_w))")
    src = _insert(
        src,
        up,
        r"^(\s+)if SWAP:\n\s+acc = tl\.trans\(acc\)",
        "tl.store(STAMP + 2, _now_after(tl.sum(tl.sum(acc, axis=1), axis=0)))",
        before=True,
    )
    down = r"^(\s+)_down_slice\((?:.*\n)*?.*BLOCK_D, W2_BLOCK\)  # fmt: skip\n"
    src = _insert(src, up, down, "tl.store(STAMP + 3, _now())")
    return _insert(src, up, r"^    if FUSED:\n        _cast_when_last\(.*\n()", "    tl.store(STAMP + 4, _now())")


def instrumented_launcher(kernels_module: str) -> str:
    """grouped_gemm.py launching the kernels of the module `kernels_module` (`instrumented_kernels`), and
    `experts` keeping its h_RF (of at least 64 x 1024 elements: 8 int64 per program) as the module's LAST_H."""
    src = Path(gg.__file__).read_text()
    imports = "from moe_fx.lowering.triton.experts_kernels import"
    h = "    h_RF = torch.empty((R, F), dtype=h_dtype, device=xq.device)  # (fused: never written)\n"
    for needed in (imports, h):
        if needed not in src:
            raise RuntimeError(f"moe_fx: grouped_gemm.py changed: no {needed.strip()!r} to replace")
    src = src.replace(imports, f"from {kernels_module} import")
    return src.replace(h, "    h_RF = torch.full((max(R, 64), max(F, 1024)), -1, dtype=h_dtype, device=xq.device)\n"
                          "    global LAST_H\n    LAST_H = h_RF\n")  # fmt: skip


def instrumented_module():
    """The stamped kernels and their launcher as modules of their own, in files (Triton reads a kernel's source
    from its file): the launcher's module."""
    folder = Path(tempfile.mkdtemp())
    (folder / "experts_kernels_timed.py").write_text(instrumented_kernels())
    (folder / "grouped_gemm_timed.py").write_text(instrumented_launcher("experts_kernels_timed"))
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("grouped_gemm_timed", folder / "grouped_gemm_timed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stamps(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[programs, 5] µs from the first program's start (NaN where a program did not get there: no tile), and
    [programs] SM ids, of the programs that ran."""
    st = h.view(torch.int64).flatten()[: 8 * (h.numel() * h.element_size() // 64)].view(-1, 8).cpu()
    st = st[st[:, 0] > 0]
    rel = (st[:, :5] - st[:, 0].min()).double() / 1e3
    rel[st[:, :5] <= 0] = float("nan")
    return rel, st[:, 7]


def timeline(shape: str, T: int, quant: str, timed) -> dict:
    """One cell's row: the stamps' medians and maxima over the programs, medians over 7 calls. A fused config
    runs routed where the rewrite routes it (`tuning.routes`): the router's GEMV, then the kernel routing its own
    picks (the bounds stamp is then each program's pick known)."""
    if not tuning.runs_fused(quant):
        raise ValueError(f"moe_fx: timeline stamps the fused kernel, which runs quant in "
                         f"{tuple(tuning.FUSED_BLOCK_D)}; got {quant!r}")  # fmt: skip
    E, K, D, F = SHAPES[shape]
    config = tuning.choose(E, D, F, K, True, torch.bfloat16, torch.device("cuda"), T * K, quant)
    if not config.fused:
        config = replace(config, fused=True, down=replace(config.down, block_n=tuning.FUSED_BLOCK_D[quant]))
    config = tuning.conform(config, quant)
    routed = tuning.routes(T, quant, True)
    run = experts_op(shape, T, quant, "cuda", torch.bfloat16, reduce=True, routed=routed)
    for _ in range(3):
        run(config)
    calls = []
    for _ in range(7):
        timing.empty_l2("read")
        torch.cuda.synchronize()
        run(config)
        torch.cuda.synchronize()
        calls.append(stamps(timed.LAST_H))
    last, sms = calls[-1]
    row = dict(shape=shape, T=T, quant=quant, routed=routed, config=tuning.describe(config), programs=len(sms),
               programs_with_a_tile=int((~last[:, 2].isnan()).sum()), sms=len(set(sms.tolist())))  # fmt: skip
    for i, name in enumerate(STAMPS):
        row[f"{name}_median"] = statistics.median(float(c[:, i].nanmedian()) for c, _ in calls)
        row[f"{name}_max"] = statistics.median(float(c[:, i][~c[:, i].isnan()].max()) for c, _ in calls)
    row["last_call"] = [[round(v, 2) for v in r] for r in last.tolist()]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", default=["qwen3:1", "gptoss:1", "qwen3:4"], metavar="SHAPE:T[:QUANT]")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    cells = [(shape, int(T), quant or "none") for shape, T, quant in (f"{c}:".split(":")[:3] for c in args.cells)]
    timed = instrumented_module()
    gg.experts = timed.experts  # what experts_op's run calls (tuner.experts_call imports it at call time)
    rows, path = [], None
    stamp_heads = " | ".join(f"{s} median / max µs" for s in STAMPS)
    print(f"| shape | T | quant | config | programs (with a tile) | {stamp_heads} |")
    for shape, T, quant in cells:
        row = timeline(shape, T, quant, timed)
        cols = " | ".join(f"{row[f'{s}_median']:.2f} / {row[f'{s}_max']:.2f}" for s in STAMPS)
        programs = f"{row['programs']} ({row['programs_with_a_tile']})"
        print(f"| {shape} | {T} | {quant} | {row['config']} | {programs} | {cols} |")
        rows.append(row)
        path = write_rows(args.out, "timeline", rows, path)


if __name__ == "__main__":
    main()
