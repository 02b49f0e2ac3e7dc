"""Every tuning candidate checked against the reference lowering on a GPU: no timing, only `tuner.agreement`.

`tuner.tune` refuses a candidate whose output disagrees with the reference lowering before timing it. This
sweep runs that check for every candidate `tune` would try (up GEMMs with the default down, down GEMMs with
the default up, fused decode tiles where they apply), at several T and at shapes whose D and F are not
multiples of the tiles, so that a tile this GPU and Triton compile wrong shows before a user's tuning meets
it. Each (mode, shape) is split over `--split` processes (a share of the candidates each), `--jobs` at a
time: compiling dominates.

    python bench/verify_candidates.py --out OUT                  # all modes, the default shapes and T
    python bench/verify_candidates.py --out OUT --modes none fp8 --T 1 1000

Prints one line per job and every wrong config; writes OUT/verify-candidates.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

from moe_fx.lowering.triton import tuner, tuning

MODES = ("none", "none-stored", "fp8", "int8", "int4_weight", "fp8_block")  # none-stored: reduce=False
SHAPES = ((8, 2, 2880, 2880), (16, 4, 1000, 704))  # (E, K, D, F): GPT-OSS's widths; ragged ones
TS = (1, 7, 64, 1000)


def configs(quant: str, rows_per_expert: float, reduce: bool) -> list[tuning.ExpertsConfig]:
    """What `tuner.tune` tries at this T, in its order, without duplicates."""
    default = tuning.default_config(rows_per_expert, torch.bfloat16, quant)
    gemms = tuner.candidate_gemms(tuner.CANDIDATES if quant == "none" else tuner.QUANT_CANDIDATES)
    tried = (tuner.tried_config(part, g, default, quant) for part in tuner.tuned_parts(reduce, quant) for g in gemms)
    return list(dict.fromkeys(c for c in tried if c is not None))


def job(mode: str, shape: tuple, Ts: tuple, part: int = 0, parts: int = 1) -> dict:
    """Check every parts-th candidate of (mode, shape) from the part-th, at each T; {"rows": [...], "wrong":
    [...], "errors": [...]}."""
    quant = "none" if mode.startswith("none") else mode
    reduce = mode != "none-stored"
    E, K, D, F = shape
    weights = tuner.random_weights(E, D, F, "silu_gated", torch.bfloat16, "cuda", quant)
    bound = tuner.agreement_bound(torch.bfloat16, quant)
    rows, wrong, errors = [], [], []
    for T in Ts:
        torch.manual_seed(T)
        run = tuner.experts_call(T, K, "silu_gated", torch.bfloat16, weights, quant, reduce)
        ref = run.reference()
        checked, worst = 0, 0.0
        for config in configs(quant, T * K / E, reduce)[part::parts]:
            try:
                err = tuner.agreement(run, config, ref)
            except Exception as e:  # out of shared memory or registers: tune skips these too
                errors.append({"T": T, "config": tuning.describe(config), "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            checked += 1
            if err > bound:
                wrong.append({"T": T, "config": tuning.describe(config), "row_err": err})
            else:
                worst = max(worst, err)
        rows.append({"T": T, "checked": checked, "worst_right_row_err": worst})
    return {"mode": mode, "shape": list(shape), "bound": bound, "rows": rows, "wrong": wrong, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--T", type=int, nargs="+", default=list(TS))
    parser.add_argument("--jobs", type=int, default=14)
    parser.add_argument("--split", type=int, default=4)
    parser.add_argument("--one", help="internal: run one job, 'mode:E,K,D,F:part', and print its JSON")
    args = parser.parse_args()
    if args.one:
        mode, shape, part = args.one.split(":")
        print(json.dumps(job(mode, tuple(int(v) for v in shape.split(",")), tuple(args.T), int(part), args.split)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    parts = range(args.split)
    pending = [
        f"{mode}:{','.join(map(str, shape))}:{part}" for mode in args.modes for shape in SHAPES for part in parts
    ]
    running, results, start = {}, [], time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            one = pending.pop(0)
            cmd = [sys.executable, __file__, "--one", one, "--split", str(args.split), "--T", *map(str, args.T)]
            cmd += ["--out", str(args.out)]
            running[one] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for one, proc in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[one]
            if proc.returncode:
                results.append({"job": one, "failed": err[-2000:]})
                print(f"{one}: exit {proc.returncode}\n{err[-2000:]}", flush=True)
                continue
            r = json.loads(out.strip().splitlines()[-1])
            results.append(r)
            checked = sum(row["checked"] for row in r["rows"])
            worst = max(row["worst_right_row_err"] for row in r["rows"])
            elapsed = time.time() - start
            print(f"{one}: {checked} checked, {len(r['wrong'])} wrong, {len(r['errors'])} did not run, "
                  f"worst right row err {worst:.2e} (bound {r['bound']:g}) [{elapsed:.0f} s]", flush=True)  # fmt: skip
            for w in r["wrong"]:
                print(f"  WRONG T={w['T']} {w['config']}: row err {w['row_err']:.3g}", flush=True)
        time.sleep(1)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "T": args.T}
    meta["triton"] = triton.__version__
    (args.out / "verify-candidates.json").write_text(json.dumps({"meta": meta, "jobs": results}, indent=1))


if __name__ == "__main__":
    main()
