"""Pointer loads against TMA descriptor loads in the Triton experts, the same tiles, on one GPU.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

For each shape of `bench/layer.py` and each T, `tuning.tune` times both GEMMs over the same tile candidates
through pointers and through TMA (uniform random routing, the experts op alone), and this prints the best
time of each and their ratio; before that, one call per (shape, quant) checks that the two load paths give
the same output. Writes OUT/tma-<stamp>.json. The tuned entries land in the tuning cache
(MOE_FX_TUNING_CACHE).

    python bench/tma.py --out DIR [--shapes mixtral ...] [--T 1024 8192] [--quant none fp8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import experts_op, write_rows  # noqa: E402
from layer import SHAPES  # noqa: E402

from moe_fx.lowering.triton import tuning  # noqa: E402
from moe_fx.lowering.triton.grouped_gemm import loads  # noqa: E402
from moe_fx.lowering.triton.tuning import ExpertsConfig, GemmConfig  # noqa: E402

TILES = {  # (block_m, block_n, block_k, num_warps, num_stages): the large-T tiles, bf16 and one-byte operands
    "none": (
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (256, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
    ),
    "fp8": ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 128, 8, 4)),
}


def same_output(name: str, quant: str, T: int = 512) -> float:
    """‖out_tma − out_pointers‖ / ‖out_pointers‖ for one call of the experts op, asserting each took its path."""
    run, outs = experts_op(name, T, quant), []
    for tma in (False, True):
        gemm = GemmConfig(128, 128, 64 if quant == "none" else 128, 8, 8, 3, tma)
        loads.clear()
        outs.append(run(tuning.conform(ExpertsConfig(gemm, gemm), quant)).float())
        path = "tma" if tma else "pointers"
        assert loads[f"up/{path}"] == 1 and loads[f"down/{path}"] == 1, dict(loads)
    return ((outs[1] - outs[0]).norm() / outs[0].norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[1024, 8192])
    p.add_argument("--quant", nargs="+", default=["none", "fp8"], choices=list(TILES))
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.manual_seed(0)
    checks = {f"{name}/{quant}": same_output(name, quant) for name in args.shapes for quant in args.quant}
    print("TMA against pointers, rel diff of one call:", checks)
    rows = []
    print("| shape | quant | T | pointers µs | tma µs | tma / pointers | best |\n|---|---|---|---|---|---|---|")
    for name in args.shapes:
        E, K, D, F = SHAPES[name]
        for quant in args.quant:
            tiles = tuple((*t, tma) for tma in (False, True) for t in TILES[quant])
            for T in args.T:
                (result,) = tuning.tune(E, D, F, K, "silu_gated", torch.bfloat16, [T], quant=quant,
                                        candidates=tiles).values()  # fmt: skip
                timings = result["timings"]
                pointers = min(us for c, us in timings.items() if "tma" not in c)
                tma = min(us for c, us in timings.items() if "tma" in c)
                best = min(timings, key=timings.get)
                rows.append({"shape": name, "quant": quant, "T": T, "pointers_us": pointers, "tma_us": tma,
                             "best": best, **result})  # fmt: skip
                print(f"| {name} | {quant} | {T} | {pointers:.0f} | {tma:.0f} | {tma / pointers:.3f} | {best} |")
    write_rows(args.out, "tma", rows, checks_rel_diff=checks)


if __name__ == "__main__":
    main()
