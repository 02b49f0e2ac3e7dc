"""Tiles re-tuned on this GPU: per shape, quant mode and T, the experts op under the entry `choose` ships, every
device's entry of the same key in tuned.json, a fresh tuning over one family of tiles (`--tiles decode`: <= 32
rows; `prefill`: >= 64 rows through TMA descriptors) and the untuned default, each timed as CUDA-graph replays
in one process (the median of 3 rounds in rotated order: `tuner.confirm`), and the JSON of the table.

    MOE_FX_TUNING_CACHE=OUT/tuning_cache.json python bench/retune.py --out OUT [--shapes qwen3] [--T 1 16]
    MOE_FX_TUNING_CACHE=OUT/tuning_cache.json python bench/retune.py --out OUT --tiles prefill --T 1024 8192
    python bench/merge_tuned.py OUT/tuning_cache.json      # ships the fresh entries (edit out the slower ones)

Written when the H100's T=1 entries, tuned on eager calls (host-bound: the pick was noise), ran Qwen3 fp8
1.36x slower than a graph-timed pick (bench/NOTES.md, sixth session); `prefill` when the H100's T >= 1024
entries, tuned before TMA loads existed, were found to use none.
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

ACTIVATION, DTYPE = "silu_gated", torch.bfloat16


def shipped_entries(E: int, D: int, F: int, K: int, T: int, quant: str) -> dict[str, tuning.ExpertsConfig]:
    """{"entry <device>": config} of every device's packaged entry for this key."""
    head, tail = tuning._key_ends(E, D, F, K, True, DTYPE, T, quant)
    packaged = tuning._read(tuning.PACKAGED).items()
    return {f"entry {device}": tuning.entry_config(entry) for key, entry in packaged
            if (device := tuning.key_device(key, head, tail)) is not None}  # fmt: skip


TILES = {  # which candidates (block_m, block_n, block_k, warps, stages, tma, swap_ab, persistent) a family tunes
    "decode": lambda c: c[0] <= 32,
    "prefill": lambda c: c[0] >= 64 and c[5],
}


def time_configs(shape: str, quant: str, T: int, tiles: str, device: torch.device) -> dict[str, tuple[str, float]]:
    """{name: (config, µs per graph replay)} for the shipped, packaged, freshly tuned and default configs."""
    E, K, D, F = SHAPES[shape]
    reduce = tuning.native_atomics(DTYPE)
    run = experts_op(shape, T, quant, device, DTYPE, reduce, tuning.routes(T, quant, reduce))  # as tune times it
    R, sms = T * K, tuning.sm_count(device)
    configs = {"shipped": tuning.choose(E, D, F, K, True, DTYPE, device, R, quant)}
    configs.update(shipped_entries(E, D, F, K, T, quant))
    candidates = tuner.CANDIDATES if quant == "none" else tuner.QUANT_CANDIDATES
    tuned = tuner.tune(E, D, F, K, ACTIVATION, DTYPE, [T], quant=quant,
                        candidates=tuple(filter(TILES[tiles], candidates)))  # fmt: skip
    for timings in (r["timings"] for r in tuned.values()):  # the fastest fused and two-kernel configs, timed once
        for kind, found in (("fused", {c: us for c, us in timings.items() if "fused" in c}),
                            ("two kernels", {c: us for c, us in timings.items() if "fused" not in c})):  # fmt: skip
            if found:
                fastest = min(found, key=found.get)
                print(f"  {shape} {quant} T={T} fastest {kind}: {fastest} {found[fastest]:.1f} µs")
    configs["tuned"] = tuning.choose(E, D, F, K, True, DTYPE, device, R, quant)
    default = tuning.spread(tuning.default_config(R / E, DTYPE, quant), E, D, F, R, sms)
    configs["default"] = tuning.conform(default, quant)
    _, medians = tuner.confirm(list(dict.fromkeys(configs.values())), lambda c: tuner.time_config(run, c))
    return {name: (tuning.describe(config), medians[config]) for name, config in configs.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--quant", nargs="+", default=["none", "fp8"])
    p.add_argument("--T", nargs="+", type=int, default=[1])
    p.add_argument("--tiles", choices=list(TILES), default="decode")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    device = torch.device("cuda")
    rows, path = [], None
    print("| shape | quant | T | config | µs | over the fastest |")
    for shape in args.shapes:
        for quant in args.quant:
            for T in args.T:
                timed = time_configs(shape, quant, T, args.tiles, device)
                fastest = min(us for _, us in timed.values())
                for name, (config, us) in timed.items():
                    print(f"| {shape} | {quant} | {T} | {name}: {config} | {us:.1f} | {us / fastest:.2f} |", flush=True)
                rows.append({"shape": shape, "quant": quant, "T": T, "us": {n: us for n, (_, us) in timed.items()},
                             "configs": {n: c for n, (c, _) in timed.items()}})  # fmt: skip
                path = write_rows(args.out, f"retune-{args.tiles}", rows, path)


if __name__ == "__main__":
    main()
