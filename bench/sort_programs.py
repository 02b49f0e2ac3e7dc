"""The two-launch sort's programs (`dispatch.SORT_PROGRAMS`) at prefill: one `dispatch` per setting, timed.

Legend: T tokens, E experts, K top-k, R = T*K routed rows.

`dispatch` above a decode step's few blocks is two launches of at most SORT_PROGRAMS programs, each taking a run
of blocks of rows (count, then scatter); fewer programs mean longer runs and fewer atomics on the cursors. Each
setting is timed as a CUDA-graph replay of one dispatch (the fill of its counters, the count and the scatter) on
the same random top-K routing, after a read flush (`timing.median_us`), medians of `--rounds` rounds in rotated
order. A table and JSON.

    python bench/sort_programs.py --out OUT [--shapes qwen3 deepseek] [--T 8192] [--programs 64 128 256 512 1024]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import write_rows  # noqa: E402
from layer import SHAPES  # noqa: E402

from moe_fx.lowering.triton import dispatch, timing  # noqa: E402


def routed_rows(E: int, K: int, T: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_TD, weights_TK, ids_TK): T tokens routed to K of E experts by softmax top-K of random logits (x is
    narrow: unquantised, dispatch never reads it)."""
    x = torch.randn(T, 64, device=device, dtype=torch.bfloat16)
    weights, ids = torch.randn(T, E, device=device).softmax(-1).topk(K, dim=-1)
    return x, weights, ids.to(torch.int32)


def at_programs(programs: int, E: int, x, weights, ids):
    """dispatch(x, ids, weights, E) with SORT_PROGRAMS = programs (restored after)."""
    shipped = dispatch.SORT_PROGRAMS
    dispatch.SORT_PROGRAMS = programs
    try:
        return dispatch.dispatch(x, ids, weights, E)
    finally:
        dispatch.SORT_PROGRAMS = shipped


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen3", "deepseek"], choices=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[8192])
    p.add_argument("--programs", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    rows, path = [], None
    print(f"| shape | T | {' | '.join(str(n) for n in args.programs)} | shipped ({dispatch.SORT_PROGRAMS}) |")
    for shape in args.shapes:
        E, K, _, _ = SHAPES[shape]
        for T in args.T:
            x, weights, ids = routed_rows(E, K, T)
            sort = {n: functools.partial(at_programs, n, E, x, weights, ids) for n in args.programs}
            replays = {n: timing.graph_replay(fn) for n, fn in sort.items()}
            samples = {n: [] for n in args.programs}
            for r in range(args.rounds):  # each round times every setting once, in an order rotated by one
                for n in args.programs[r % len(args.programs) :] + args.programs[: r % len(args.programs)]:
                    samples[n].append(timing.median_us(replays[n]))
            us = {n: statistics.median(s) for n, s in samples.items()}
            rows.append(dict(shape=shape, T=T, us_by_programs=us, shipped=dispatch.SORT_PROGRAMS))
            shipped = f"{us[dispatch.SORT_PROGRAMS]:.1f}" if dispatch.SORT_PROGRAMS in us else "-"
            print(f"| {shape} | {T} | {' | '.join(f'{us[n]:.1f}' for n in args.programs)} | {shipped} |")
            path = write_rows(args.out, "sort-programs", rows, path, rounds=args.rounds)


if __name__ == "__main__":
    main()
