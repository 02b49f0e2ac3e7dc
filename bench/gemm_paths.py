"""The Triton experts' GEMM paths against each other, the same tiles, on one GPU: operands through pointers,
through TMA descriptors, with the dot's operands swapped (the weights as its first operand), and TMA with
persistent programs (two per SM, tile and K loops flattened into one).

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

For each shape of `bench/layer.py`, quant mode and T, `tuner.tune` times both GEMMs over the same tile
candidates on each path (uniform random routing, the experts op alone), and this prints the best time of
each path and its ratio to pointers; before that, one call per (shape, quant, path) checks that it gives
the pointer path's output. The tiles are the regime's: prefill tiles (T >= 1024) for TMA and persistent
programs, decode tiles for the swap. Writes OUT/gemm_paths-<stamp>.json; the tuned entries land in the tuning cache
(MOE_FX_TUNING_CACHE).

    python bench/gemm_paths.py --out DIR [--shapes mixtral ...] [--T 1 16 128] [--quant none int4_weight]
        [--paths pointers swap]    (or --T 1024 8192 --paths pointers tma persistent)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import experts_op, write_rows  # noqa: E402
from layer import SHAPES  # noqa: E402

from moe_fx.lowering.triton import tuner, tuning  # noqa: E402
from moe_fx.lowering.triton.grouped_gemm import load_path, loads  # noqa: E402

# (block_m, block_n, block_k, num_warps, num_stages) by regime and operand width (int4_weight's activations
# are two bytes: the bf16 tiles)
TILES = {
    ("prefill", 2): ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
                     (64, 128, 64, 4, 4)),
    ("prefill", 1): ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 128, 8, 4)),
    ("decode", 2): ((16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (16, 64, 64, 4, 5),
                    (32, 64, 128, 4, 4)),
    ("decode", 1): ((16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),
                    (16, 64, 128, 4, 5)),
}  # fmt: skip
PATHS = {"pointers": (False, False, False), "tma": (True, False, False), "swap": (False, True, False),
         "persistent": (True, False, True)}  # -> (tma, swap_ab, persistent)  # fmt: skip
ONE_BYTE = ("fp8", "fp8_block", "int8")


def tiles(T: int, quant: str) -> tuple:
    return TILES[("prefill" if T >= 1024 else "decode", 1 if quant in ONE_BYTE else 2)]


def same_output(name: str, quant: str, path: str, T: int) -> float:
    """‖out_path − out_pointers‖ / ‖out_pointers‖ for one call of the experts op at the regime's first tile,
    asserting that each GEMM took its path."""
    run, outs = experts_op(name, T, quant), []
    m, n, k, warps, stages = tiles(T, quant)[0]
    for p in ("pointers", path):
        gemm = tuning.GemmConfig(m, n, k, 8, warps, stages, *PATHS[p])
        loads.clear()
        outs.append(run(tuning.conform(tuning.ExpertsConfig(gemm, gemm), quant)).float())
        assert loads[load_path("up", PATHS[p][0], gemm)] == 1 == loads[load_path("down", PATHS[p][0], gemm)], loads
    return ((outs[1] - outs[0]).norm() / outs[0].norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[1024, 8192])
    p.add_argument("--quant", nargs="+", default=["none", "fp8"], choices=["none", *ONE_BYTE, "int4_weight"])
    p.add_argument("--paths", nargs="+", default=["pointers", "tma"], choices=list(PATHS))
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.manual_seed(0)
    base, *others = args.paths  # the ratios' denominator: the first path named
    checks = {
        f"{name}/{quant}/{path}/T{T}": same_output(name, quant, path, T)
        for name in args.shapes for quant in args.quant for path in args.paths if path != "pointers"
        for T in sorted({min(args.T), max(args.T)})
    }  # fmt: skip
    print("each path against pointers, rel diff of one call:", checks)
    rows, written = [], None  # the JSON is rewritten after every cell: a run cut short keeps what it measured
    ratios_head = " | ".join(f"{p} / {base}" for p in others)
    head = " | ".join(f"{path} µs" for path in args.paths)
    print(f"| shape | quant | T | {head} | {ratios_head} | best |\n|{'---|' * (4 + len(args.paths) + len(others))}")
    for name in args.shapes:
        E, K, D, F = SHAPES[name]
        for quant in args.quant:
            for T in args.T:
                by_path = {}  # path -> tune's result over its tiles (each tune stores its best; the winner last)
                for path in args.paths:
                    candidates = tuple((*t, *PATHS[path]) for t in tiles(T, quant))
                    ((key, by_path[path]),) = tuner.tune(E, D, F, K, "silu_gated", torch.bfloat16, [T],
                                                          quant=quant, candidates=candidates).items()  # fmt: skip
                won = min(by_path, key=lambda path: by_path[path]["best"])
                config = by_path[won]["config"]
                tuning.store(key, tuning.entry_config(config), {"best": by_path[won]["best"]},
                             tuning.capability(torch.device("cuda")))  # fmt: skip
                best_us = {path: r["best"] for path, r in by_path.items()}
                rows.append({"shape": name, "quant": quant, "T": T, "best_us": best_us, "won": won, "by_path": by_path})
                cells = " | ".join(f"{best_us[path]:.1f}" for path in args.paths)
                ratios = " | ".join(f"{best_us[path] / best_us[base]:.3f}" for path in others)
                print(f"| {name} | {quant} | {T} | {cells} | {ratios} | {won}: {config} |", flush=True)
                written = write_rows(args.out, "gemm_paths", rows, written, checks_rel_diff=checks)


if __name__ == "__main__":
    main()
