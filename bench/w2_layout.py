"""w2's layout under a one-byte quant mode: in column blocks of each width (`quant.block_columns`) against [E, D, F].

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k, B a block's width.

The rewrite stores fp8 / int8 w2 in blocks of `quant.W2_BLOCK` columns ([E, ceil(F/B), D, B]), where a program
reading a narrow F-slice of every row of D reads longer runs of bytes. For each (shape, quant, T) cell the shipped
config runs the experts step (routed where the rewrite routes it, `tuning.routes`; otherwise the experts op alone,
its rows summed as the rewrite sums them) on the same quantised weights in each layout; every layout is first
checked against the reference lowering (`tuner.agreement`, outputs poisoned), then timed as CUDA-graph replays
in rotated rounds. A table (µs, and the time over [E, D, F]'s) and JSON.

    python bench/w2_layout.py --out OUT [--cells qwen3:fp8:1 gptoss:fp8:16 ...] [--widths 64 128 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import write_rows  # noqa: E402
from layer import SHAPES  # noqa: E402

from moe_fx.lowering import quant  # noqa: E402
from moe_fx.lowering.triton import tuner, tuning  # noqa: E402

DTYPE = torch.bfloat16
CELLS = ("qwen3:fp8:1", "gptoss:fp8:1", "qwen3:int8:1", "qwen3:fp8:16", "gptoss:fp8:16", "deepseek:fp8:16",
         "qwen3:fp8:1024", "qwen3:fp8:8192")  # fmt: skip


def cell(text: str) -> tuple[str, str, int]:
    """(shape, quant, T) from "shape:quant:T"."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in SHAPES or parts[1] not in quant.PER_TOKEN or not parts[2].isdigit():
        raise ValueError(f"moe_fx: a cell is shape:quant:T with shape in {tuple(SHAPES)}, quant in "
                         f"{quant.PER_TOKEN}, e.g. qwen3:fp8:1; got {text!r}")  # fmt: skip
    return parts[0], parts[1], int(parts[2])


def layouts(shape, q: str, T: int, widths: list[int], device, dtype=DTYPE) -> tuple[dict, tuning.ExpertsConfig]:
    """({0 (w2 [E, D, F]) or a block width: run}, the shipped config): the experts step of one cell on the same
    quantised weights in each layout (`tuner.experts_call`; shape a `SHAPES` name or (E, K, D, F))."""
    E, K, D, F = SHAPES[shape] if isinstance(shape, str) else shape
    w13, w2, scales = tuner.random_weights(E, D, F, "silu_gated", dtype, device, q)
    if w2.dim() == 4:  # the rewrite's layout: back to [E, D, F], then each width from it
        w2 = quant.unblock_columns(w2, F)
    routed = tuning.routes(T, q, True)
    stored = {0: w2, **{w: quant.block_columns(w2, w) for w in widths}}
    runs = {w: tuner.experts_call(T, K, "silu_gated", dtype, (w13, w2_, scales), q, True, routed)
            for w, w2_ in stored.items()}  # fmt: skip
    return runs, tuning.choose(E, D, F, K, True, dtype, device, T * K, q)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", type=cell, default=[cell(c) for c in CELLS], metavar="SHAPE:QUANT:T")
    p.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    device, rows, path = torch.device("cuda"), [], None
    print("| shape | quant | T | config | w2 | µs | over [E, D, F] |")
    for shape, q, T in args.cells:
        runs, config = layouts(shape, q, T, args.widths, device)
        bound = tuner.agreement_bound(DTYPE, q)
        errors = {w: tuner.agreement(run, config, run.reference()) for w, run in runs.items()}
        ok = [w for w, err in errors.items() if err <= bound]
        times = {w: [] for w in ok}
        for r in range(args.rounds):
            for w in ok[r % len(ok) :] + ok[: r % len(ok)]:
                times[w].append(tuner.time_config(runs[w], config))
        us = {w: statistics.median(t) for w, t in times.items()}
        base = us.get(0, float("nan"))  # nan where [E, D, F] disagreed (listed in the JSON)
        for w, t in us.items():
            layout = f"blocks of {w}" if w else "[E, D, F]"
            print(f"| {shape} | {q} | {T} | {tuning.describe(config)} | {layout} | {t:.1f} | {t / base:.3f} |",
                  flush=True)  # fmt: skip
        rows.append({"shape": shape, "quant": q, "T": T, "config": tuning.describe(config),
                     "routed": tuning.routes(T, q, True), "row_errors": errors, "us": us, "rounds": times,
                     "disagreed": [w for w in runs if w not in ok]})  # fmt: skip
        path = write_rows(args.out, "w2-layout", rows, path)


if __name__ == "__main__":
    main()
