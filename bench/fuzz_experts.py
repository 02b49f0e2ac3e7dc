"""Random experts problems and tiles: the Triton experts against the reference lowering on the same rows.

Each case draws a shape (E, K, D, F, T; D and F sometimes not a multiple of 16 bytes, so that TMA gives way to
pointer loads), an activation, the gate/up layout and storage, biases, where the routing weight goes, a quant
mode, a routing (uniform, skewed, one expert for every first pick, dropped picks), whether experts sums each
token's rows (`reduce`), and a config (each GEMM a tuning candidate; fused where it applies). It runs the
Triton `dispatch` and `experts` with that config, outputs NaN-poisoned, and the reference lowering's experts
on the same dispatched rows, and compares the largest row error with `tuner.agreement_bound`.

    python bench/fuzz_experts.py --out OUT --cases 2000 --jobs 14      # on a GPU, bf16
    python bench/fuzz_experts.py --repro '{"seed": 17, ...}'            # one case again, from its printed draw

`tests/lowering/triton/test_fuzz_experts.py` runs a few derandomized cases in the interpreter (fp32/fp16).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton

from moe_fx.lowering import quant as quant_fmt
from moe_fx.lowering import reference
from moe_fx.lowering.triton import dispatch, grouped_gemm, tuner, tuning
from moe_fx.ops import rows_are_tokens
from moe_fx.spec import GATED_ACTIVATIONS

QUANTS = ("none", "none", "none", "fp8", "int8", "int4_weight", "fp8_block")  # unquantised drawn 3 times in 7
ROUTINGS = ("uniform", "skewed", "first_pick_on_one", "dropped")
MAX_WEIGHTS = 2e7  # E·D·F of a GPU case at most: 120 MB of bf16 weights (gated)


def draw(seed: int, device: str, dtype: torch.dtype) -> dict:
    """One case, a JSON-able dict (its seed draws the tensors too). Small shapes where kernels are interpreted."""
    rng = random.Random(seed)
    small = device != "cuda"
    E = rng.choice((1, 2, 3, 4, 8) if small else (1, 2, 3, 4, 8, 16, 32, 64, 128))
    quant = rng.choice(QUANTS if dtype != torch.float32 or small else ("none",))

    def width(top: int) -> int:  # a multiple of 16 elements mostly; else of 2 (int4 packs pairs), or odd
        w = 16 * rng.randint(1, top)
        if rng.random() < 0.25:
            w = 2 * rng.randint(4, 8 * top) + (quant != "int4_weight" and rng.random() < 0.3)
        return w

    top = 4 if small else max(2, min(192, int((MAX_WEIGHTS / E) ** 0.5 / 16)))  # E·D·F within MAX_WEIGHTS

    activation = rng.choice(sorted(grouped_gemm.ACTIVATION_CODES))
    gated = activation in GATED_ACTIVATIONS
    layouts = ("concat", "interleaved", "separate", "up_first") if quant == "none" else ("concat", "interleaved")
    reduce = rng.random() < 0.6
    gemms = tuner.candidate_gemms(tuner.CANDIDATES if quant == "none" else tuner.QUANT_CANDIDATES)
    up, down = rng.choice(gemms), rng.choice(gemms)
    fused = reduce and quant == "none" and up.block_m <= tuner.FUSED_MAX_BLOCK_M and rng.random() < 0.4
    if fused:
        down = replace(down, block_n=tuning.FUSED_BLOCK_D["none"])
    T = max(1, int(2 ** rng.uniform(0, 5.3 if small else 11)))
    return dict(
        seed=seed, E=E, K=rng.randint(1, min(E, 8)), D=width(top), F=width(top), T=T, activation=activation,
        gate_up=rng.choice(layouts) if gated else "concat",
        w13_transposed=quant == "none" and rng.random() < 0.3, w2_transposed=quant == "none" and rng.random() < 0.3,
        b13=rng.random() < 0.3, b2=rng.random() < 0.3, weight_at=rng.choice(("none", "input", "output")),
        quant=quant, routing=rng.choice(ROUTINGS), reduce=reduce,
        config=asdict(tuning.ExpertsConfig(up, down, fused)), dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip


def _routing(case: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK fp32, ids_TK int32) of the case's routing: K distinct experts per token (id -1: dropped)."""
    T, K, E = case["T"], case["K"], case["E"]
    scores = torch.rand(T, E, generator=gen, device=gen.device)
    if case["routing"] == "skewed":  # a score u^(1/(e+1)): the later experts picked far more often
        scores = scores ** (1.0 / torch.arange(1, E + 1, device=scores.device).float())
    ids = scores.argsort(dim=-1, descending=True)[:, :K]
    if case["routing"] == "first_pick_on_one":
        ids = torch.where(ids == 0, ids[:, :1], ids)
        ids[:, 0] = 0
    weights = torch.rand(T, K, generator=gen, device=gen.device) + 0.1
    if case["routing"] == "dropped":
        dropped = torch.rand(T, K, generator=gen, device=gen.device) < 0.3
        ids, weights = ids.masked_fill(dropped, -1), weights.masked_fill(dropped, 0.0)
    return weights, ids.to(torch.int32)


def _weights(case: dict, gen: torch.Generator, dtype: torch.dtype) -> dict:
    """The experts' weights as the case stores them (canonical and quantised under a quant mode)."""
    E, D, F = case["E"], case["D"], case["F"]
    gated = case["activation"] in GATED_ACTIVATIONS
    H = 2 * F if gated else F
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=gen.device)  # noqa: E731
    w13, w2 = randn(E, H, D) / D**0.5, randn(E, D, F) / F**0.5
    out = dict(w3=None, b13=None, b2=None, w13_scale=None, w2_scale=None)
    if case["b13"]:
        out["b13"] = (randn(E, H) / 4).to(dtype)
    if case["b2"]:
        out["b2"] = (randn(E, D) / 4).to(dtype)
    if case["quant"] != "none":
        out["w13"], out["w13_scale"] = quant_fmt.quantize_weight(w13.to(dtype), case["quant"])
        out["w2"], out["w2_scale"] = quant_fmt.quantize_weight(w2.to(dtype), case["quant"])
        return out
    w13, w2 = w13.to(dtype), w2.to(dtype)
    if gated and case["gate_up"] == "separate":
        w13, out["w3"] = w13[:, :F].contiguous(), w13[:, F:].contiguous()
    if case["w13_transposed"]:
        w13 = w13.transpose(1, 2).contiguous()
        out["w3"] = None if out["w3"] is None else out["w3"].transpose(1, 2).contiguous()
    out["w13"] = w13
    out["w2"] = w2.transpose(1, 2).contiguous() if case["w2_transposed"] else w2
    return out


def check(case: dict, device: str) -> dict:
    """Run the case: {"status": "right" | "wrong" | "no_fit" (out of shared memory or registers, which tuning
    skips too) | "error" (any other exception), "row_err", "bound", "error": its text}."""
    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator(device=device).manual_seed(case["seed"])
    weights_TK, ids_TK = _routing(case, gen)
    w = _weights(case, gen, dtype)
    x = torch.randn(case["T"], case["D"], generator=gen, device=device).to(dtype)
    quant, E = case["quant"], case["E"]
    xq, xscale, offsets, gather, row_weights, row_index, _ = dispatch.dispatch(x, ids_TK, weights_TK, E, quant)
    xq = x if rows_are_tokens(quant, "single") else xq
    common = (case["weight_at"], case["activation"], case["gate_up"], case["w13_transposed"], case["w2_transposed"],
              1.702, 7.0)  # fmt: skip
    config = tuning.entry_config(case["config"])
    bound = tuner.agreement_bound(dtype, quant)
    try:
        with tuner.poisoned():
            out = grouped_gemm.experts(
                xq, offsets, gather, row_weights, w["w13"], w["w3"], w["w2"], w["b13"], w["b2"], *common, dtype,
                config=config, quant=quant, xscale=xscale, w13_scale=w["w13_scale"], w2_scale=w["w2_scale"],
                reduce=case["reduce"],
            )  # fmt: skip
    except Exception as err:  # a config that does not fit this GPU is not a wrong result; anything else is
        status = "no_fit" if isinstance(err, triton.runtime.errors.OutOfResources) else "error"
        return {"status": status, "row_err": None, "bound": bound, "error": f"{type(err).__name__}: {err}"[:300]}
    y = reference.experts(xq, xscale, offsets, gather, row_weights, w["w13"], w["w3"], w["w2"], w["b13"], w["b2"],
                          w["w13_scale"], w["w2_scale"], *common, quant, dtype)  # fmt: skip
    if case["reduce"]:  # combine's sum, each row × its routing weight unless the experts applied it
        y = reference.combine(y, weights_TK, row_index, None, case["weight_at"] == "none", "single", "")
    err = tuner.row_error(out, y)
    return {"status": "right" if err <= bound else "wrong", "row_err": err, "bound": bound}


def _worker(first: int, count: int, device: str, dtype: torch.dtype) -> None:
    """Cases first .. first + count - 1, one JSON line each (the draw and its result)."""
    for seed in range(first, first + count):
        case = draw(seed, device, dtype)
        print(f"start {seed}", flush=True)  # the case a worker that dies (a fault, not an exception) was running
        print(json.dumps({"case": case, **check(case, device)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0, help="the first case's seed")
    parser.add_argument("--jobs", type=int, default=14)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seconds", type=float, default=480.0, help="stop starting workers' cases after this")
    parser.add_argument("--worker", type=int, nargs=2, help="internal: first, count")
    parser.add_argument("--repro", help="a case's JSON, as printed: run it alone and print the result")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), "cuda" if torch.cuda.is_available() else "cpu"
    if args.repro:
        print(json.dumps(check(json.loads(args.repro), device)))
        return
    if args.worker:
        _worker(*args.worker, device, dtype)
        return
    per_job = -(-args.cases // args.jobs)
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--dtype", args.dtype, "--worker", str(first), str(per_job)], **pipes
        )
        for first in range(args.first, args.first + args.cases, per_job)
    ]
    start, results = time.time(), []
    deadline = start + args.seconds
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if proc.returncode not in (0, -9):
            seed = int([line for line in out.splitlines() if line.startswith("start ")][-1].split()[1])
            case = json.dumps(draw(seed, device, dtype))
            print(f"a worker exited {proc.returncode} in case {seed}: --repro '{case}'\n{err[-3000:]}", flush=True)
    by = {s: [r for r in results if r["status"] == s] for s in ("right", "wrong", "no_fit", "error")}
    ran = by["right"] + by["wrong"]
    print(f"{len(results)} cases in {time.time() - start:.0f} s: " + ", ".join(f"{len(v)} {s}" for s, v in by.items()))
    for mode in sorted({r["case"]["quant"] for r in ran}):
        errs = [r["row_err"] / r["bound"] for r in ran if r["case"]["quant"] == mode]
        print(f"  {mode}: {len(errs)} ran, worst row err / bound {max(errs):.3f}")
    for r in by["wrong"] + by["error"]:
        what = f"row err {r['row_err']:.3g} (bound {r['bound']:g})" if r["row_err"] is not None else r["error"]
        print(f"{r['status'].upper()} {what}: --repro '{json.dumps(r['case'])}'")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
        (args.out / "fuzz-experts.json").write_text(json.dumps({"meta": meta, "results": results}))


if __name__ == "__main__":
    main()
