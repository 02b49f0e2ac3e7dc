"""The experts config `choose` picks for each cell against the same config with fields changed: the experts op
alone, CUDA-graph replays in one process (the median of 3 rounds in rotated order: `tuner.confirm`), the two
outputs compared; a table and JSON. `--store` writes the faster of each pair into $MOE_FX_TUNING_CACHE, for
`bench/layer.py` to time in whole layers.

    python bench/entry_ab.py --out OUT --set up.persistent=false down.persistent=false --T 1024 8192
    MOE_FX_TUNING_CACHE=OUT/c.json python bench/entry_ab.py --out OUT --set down.num_stages=4 --store

Written for one field flipped on the shipped entries. A full re-tuning (`bench/retune.py`) times every
candidate, whereas an A/B needs only the two configs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import experts_op, write_rows  # noqa: E402
from layer import SHAPES  # noqa: E402

from moe_fx.lowering.triton import tuner, tuning  # noqa: E402

DTYPE = torch.bfloat16


def changed(config: tuning.ExpertsConfig, assignments: list[str]) -> tuning.ExpertsConfig:
    """`config` with each "up.FIELD=VALUE" / "down.FIELD=VALUE" (a GemmConfig field of that GEMM) or
    "FIELD=VALUE" (an ExpertsConfig field) set; VALUE is JSON (true, 128)."""
    for assignment in assignments:
        target, sep, value = assignment.partition("=")
        gemm, _, name = target.rpartition(".")
        owner = getattr(config, gemm) if gemm in ("up", "down") else config if not gemm else None
        if not sep or owner is None or name not in {f.name for f in fields(owner)}:
            raise ValueError(f"moe_fx: --set takes up.FIELD=VALUE, down.FIELD=VALUE or FIELD=VALUE with a field of "
                             f"GemmConfig or ExpertsConfig, got {assignment!r}")  # fmt: skip
        try:
            new = replace(owner, **{name: json.loads(value)})
        except json.JSONDecodeError as err:
            raise ValueError(f"moe_fx: --set {assignment!r}: VALUE must be JSON (true, 128), got {value!r}") from err
        config = replace(config, **{gemm: new}) if gemm else new
    return config


def compare(shape: str, quant: str, T: int, assignments: list[str], store: bool, device: torch.device) -> dict:
    """One cell's row: both configs described and timed, and the outputs' relative difference."""
    E, K, D, F = SHAPES[shape]
    run = experts_op(shape, T, quant, device, DTYPE, reduce=tuning.native_atomics(DTYPE))  # as tune times it
    chosen = tuning.choose(E, D, F, K, True, DTYPE, device, T * K, quant)
    other = tuning.conform(changed(chosen, assignments), quant)
    ref = run(chosen).float()
    diff = ((run(other).float() - ref).norm() / ref.norm()).item()
    best, medians = tuner.confirm(list(dict.fromkeys([chosen, other])), lambda c: tuner.time_config(run, c))
    if store:
        key = tuning.key(E, D, F, K, True, DTYPE, tuning.device_name(device), T, quant)
        tuning.store(key, best, {"best": medians[best]}, tuning.capability(device))
    return {"shape": shape, "quant": quant, "T": T, "chosen": tuning.describe(chosen),
            "changed": tuning.describe(other), "chosen_us": medians[chosen], "changed_us": medians[other],
            "rel_diff": diff}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", nargs="+", required=True, dest="assignments", metavar="[GEMM.]FIELD=VALUE")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--quant", nargs="+", default=["none", "fp8"])
    p.add_argument("--T", nargs="+", type=int, default=[1024, 8192])
    p.add_argument("--store", action="store_true", help="the faster config of each cell into the tuning cache")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    changed(tuning.default_config(1024, DTYPE), args.assignments)  # a bad --set fails before any GPU work
    device = torch.device("cuda")
    rows, path = [], None
    print(f"| shape | quant | T | chosen µs | {' '.join(args.assignments)} µs | ratio | rel diff | chosen config |")
    for T in args.T:
        for shape in args.shapes:
            for quant in args.quant:
                r = compare(shape, quant, T, args.assignments, args.store, device)
                print(
                    f"| {shape} | {quant} | {T} | {r['chosen_us']:.1f} | {r['changed_us']:.1f} | "
                    f"{r['changed_us'] / r['chosen_us']:.3f} | {r['rel_diff']:.1e} | {r['chosen']} |",
                    flush=True,
                )
                rows.append(r)
                path = write_rows(args.out, "entry-ab", rows, path, assignments=args.assignments)


if __name__ == "__main__":
    main()
