"""Randomized tiny configs of the real HuggingFace MoE architectures that moe_fx rewrites: `apply` on an example
of T1 tokens (or `torch.compile(backend="moe_fx")`, a third of the cases), then the logits of that example and of
T2 fresh tokens against an untouched copy. A case is rewritten (every MoE block) with equal logits, or left
untouched with the reason; never rewritten wrong.

Draws E, k, D, F, the expert groups (n_group, topk_group), renormalisation, the experts implementation
(grouped_mm, batched_mm, eager), the dtype, T1, T2 and the entry point over every architecture `hf_models` lists
as rewritten.
CI runs CASES derandomized cases; more, each run new:

    MOE_FX_FUZZ_HF=200 pytest -s tests/test_hf_fuzz.py              # MOE_FX_FUZZ_HF_SEED=n repeats a run

Such a run found Gemma4's and DiffusionGemma's batched_mm/eager experts refused (2026-12-05, `match._unrepeated`).
"""

import copy
import os
import random
import warnings
from collections import Counter

import pytest
import torch

import moe_fx
from moe_fx import hf_models
from moe_fx.backend import last_reports
from tests.conftest import FALLBACK, rel_err

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="transformers 5.x configs")

CASES = int(os.environ.get("MOE_FX_FUZZ_HF", 4))
SEED = int(os.environ.get("MOE_FX_FUZZ_HF_SEED", random.randrange(2**31) if "MOE_FX_FUZZ_HF" in os.environ else 0))
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
SIZES = ("num_experts", "num_experts_per_tok", "hidden_size", "moe_intermediate_size", "n_group", "topk_group")


def _architectures() -> list[str]:
    return sorted(n for n, a in hf_models.ARCHITECTURES.items() if not a.refused and not hf_models.missing(n))


def draw_case(rng: random.Random) -> dict:
    """One random case: the architecture, its config overrides, experts implementation, dtype and T1, T2."""
    name = rng.choice(_architectures())
    E = rng.choice([2, 4, 6, 8, 16])
    k = rng.randint(1, min(E, 4))
    hidden, ffn = rng.choice([32, 64, 96]), rng.choice([16, 24, 40, 48])
    n_group = rng.choice([g for g in (1, 2, 4) if E % g == 0 and E // g >= 2] or [1])
    topk_group = rng.randint(1, n_group)
    while topk_group * (E // n_group) < k:  # the kept groups must hold k experts
        topk_group += 1
    overrides = dict(
        num_experts=E, n_routed_experts=E, num_local_experts=E, moe_num_experts=E, num_experts_per_tok=k,
        num_experts_per_token=k, moe_topk=k, moe_k=k, top_k_experts=k, hidden_size=hidden,
        moe_intermediate_size=ffn, intermediate_size=rng.choice([ffn, 2 * ffn]), n_group=n_group,
        topk_group=topk_group, num_expert_group=n_group, norm_topk_prob=rng.random() < 0.5,
    )  # fmt: skip
    if name == "dbrx":
        overrides = dict(ffn_config={"moe_num_experts": E, "moe_top_k": k, "ffn_hidden_size": ffn}, d_model=hidden)
    impl = rng.choice(["grouped_mm", "batched_mm", "eager"]) if hf_models.has_experts_implementations(name) else None
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    T = (rng.choice([1, 2, 5, 7]), rng.choice([1, 3, 9, 16]))
    entry = rng.choice(["apply", "apply", "compile"])
    return dict(name=name, overrides=overrides, impl=impl, dtype=dtype, T=T, entry=entry)


def _rewrite_and_run(model, inputs: list[dict], entry: str) -> tuple[list, int, str]:
    """(logits of each input, MoE blocks rewritten, the report as text) after `entry` ("apply": on the first
    input; "compile": torch.compile(backend="moe_fx") with eager inside)."""
    if entry == "apply":
        report = moe_fx.apply(model, **inputs[0])
        with torch.no_grad():
            return [hf_models.logits(model(**x)) for x in inputs], len(report.matches), str(report)
    before = len(last_reports())
    compiled = torch.compile(model, backend="moe_fx", options={"inner": "eager"})
    with torch.no_grad():
        outs = [hf_models.logits(compiled(**x)) for x in inputs]
    reports = last_reports()[before:]  # a recompile for the second input reports its blocks again: count paths
    blocks = len({m.module_path for r in reports for m in r.matches})
    return outs, blocks, "; ".join(map(str, reports))


def run_case(case: dict, seed: int) -> tuple[str, str]:
    """(outcome, detail): "rewritten" (every block, logits equal), "refused" (a block left as it is: the report),
    "invalid" (transformers rejects the config), "fallback" (a call ran the original block), "wrong"."""
    name, dtype = case["name"], case["dtype"]
    torch.manual_seed(seed)
    try:  # a drawn config transformers rejects, when built (its validators raise several types) or run
        args = (name, case["impl"]) if case["impl"] else (name,)
        model = hf_models.build(*args, **case["overrides"]).to(dtype).eval()
        inputs = [hf_models.example_inputs(model, T=T, seed=seed + i) for i, T in enumerate(case["T"])]
        original = copy.deepcopy(model)
        with torch.no_grad():
            expected = [hf_models.logits(original(**x)) for x in inputs]
    except Exception as err:
        return "invalid", f"{type(err).__name__}: {err}"[:200]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs, blocks, report = _rewrite_and_run(model, inputs, case.get("entry", "apply"))
    errs = [rel_err(out, ref) for out, ref in zip(outs, expected)]
    if max(errs) > TOL[dtype]:
        return "wrong", f"rel errs {errs}"
    if blocks < hf_models.ARCHITECTURES[name].moe_blocks:
        return "refused", report.replace("\n", " | ")[:400]
    if any(FALLBACK in str(w.message) for w in caught):
        return "fallback", next(str(w.message) for w in caught if FALLBACK in str(w.message))[:300]
    return "rewritten", ""


def test_random_hf_configs_are_rewritten_right_or_refused():
    rng, outcomes, notes = random.Random(SEED), Counter(), []
    for i in range(CASES):
        case = draw_case(rng)
        outcome, detail = run_case(case, SEED + i)
        outcomes[outcome] += 1
        if outcome != "rewritten":
            sizes = {k: case["overrides"].get(k) for k in SIZES}
            what = f"{case['name']} {case['entry']} {case['impl']} {case['dtype']} T={case['T']}"
            notes.append(f"{outcome}: {what} {sizes} {detail}")
    print(f"\nhf fuzz seed {SEED}: {dict(outcomes)}", *notes, sep="\n")
    assert outcomes["wrong"] == 0, notes
    assert outcomes["rewritten"] + outcomes["invalid"] + outcomes["refused"] + outcomes["fallback"] == CASES
    assert outcomes["rewritten"] >= outcomes["refused"] + outcomes["fallback"], notes  # refusals stay the exception
