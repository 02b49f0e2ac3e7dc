"""Property-based fuzzing: a random naive MoE block (spec and coding form) is rewritten with equal outputs
or refused with a reason, never rewritten wrong.

Hypothesis draws E, K, D, F, T, the router kind, the activation, biases, the dtype, a shared expert, the
form (loop with where/index_add_, loop with nonzero/setitem, gather + einsum, dense scatter gates,
masked sum), ModuleList or 3-D parameters, and the entry point (torch.compile or apply). Derandomized
and bounded (EXAMPLES), so CI is reproducible. The counts are printed (`pytest -s`) and asserted.

    MOE_FX_FUZZ_EXAMPLES=300 pytest -s tests/test_fuzz.py     # a longer run, randomized (new cases each run)

Such runs found the bugs fixed on 2026-12-05 (a router told apart on too few tokens, a bf16 bias sum rounded
otherwise than the original's, stacked biases refused); CI keeps the derandomized 30.
"""

import os
import warnings
from collections import Counter

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import moe_fx
from moe_fx import examples as ex
from moe_fx.backend import last_reports
from tests.conftest import FALLBACK, TOLERANCE, rel_err

EXAMPLES = int(os.environ.get("MOE_FX_FUZZ_EXAMPLES", 30))
RANDOMIZED = "MOE_FX_FUZZ_EXAMPLES" in os.environ
ACTIVATIONS = ("silu_gated", "gelu_gated", "gelu_tanh_gated", "clamped_silu_gated", "relu", "gelu", "silu", "relu2")


@st.composite
def naive_blocks(draw):
    E = draw(st.sampled_from((4, 8, 2, 6, 1, 3, 5, 7)))  # integers() would favour E=1
    form = draw(st.sampled_from(ex.FORMS))
    params = dict(
        num_experts=E,
        k=draw(st.integers(1, min(E, 4))),
        dim=draw(st.integers(2, 24)) * 2,
        ffn=draw(st.integers(1, 24)) * 2,
        router=draw(st.sampled_from(ex.ROUTERS)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        bias=draw(st.booleans()),
        shared=draw(st.booleans()),
        form=form,
        stacked=form == "gather_einsum" or draw(st.booleans()),
        router_fp32=draw(st.booleans()),
    )
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    T = draw(st.integers(1, 12))
    entry = draw(st.sampled_from(["compile", "compile", "apply"]))
    return params, dtype, T, entry, draw(st.integers(0, 2**16))


def _run(params, dtype, T, entry, seed, stats):
    torch.manual_seed(seed)
    torch._dynamo.reset()
    counters.clear()
    model = ex.NaiveMoE(**params).eval().to(dtype)
    D = params["dim"]
    x, x2 = torch.randn(T, D, dtype=dtype), torch.randn(T + 3, D, dtype=dtype)
    with torch.no_grad():
        ref, ref2 = model(x), model(x2)
        if entry == "compile":
            seen = len(last_reports())  # the reports of every graph compiled in this process, oldest first
            fn = torch.compile(model, backend="moe_fx", options={"inner": "eager"})
            outs = fn(x), fn(x)  # the example, then a second call through the compiled graph
            reports, refs = last_reports()[seen:], (ref, ref)
            assert len(reports) == 1, f"{params}: {len(reports)} graphs compiled, one expected"
            report = reports[0]
        else:
            report = moe_fx.apply(model, x)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outs, refs = (model(x), model(x2)), (ref, ref2)  # apply's graph serves any T, T = 1 captures too
            stats["fallback"] += sum(FALLBACK in str(w.message) for w in caught)
    stats["examples"] += 1
    stats.update([f"form={params['form']}", f"E={params['num_experts']}", f"router={params['router']}", str(dtype)])
    stats.update([f"act={params['activation']}", f"entry={entry}"] + [k for k in ("bias", "shared") if params[k]])
    stats["verify_failed"] += counters["moe_fx"]["verify_failed"]
    if counters["moe_fx"]["verify_failed"]:  # identified, then refused by verification: name the case
        why = "; ".join(r.reason for r in report.rejections)[:300]
        stats[f"verify_failed case: {params} {dtype} T={T} {entry} seed={seed}: {why}"] += 1
    errs = [rel_err(o, r) for o, r in zip(outs, refs)]
    if report.matches:
        stats["rewritten"] += 1
    else:  # left untouched: Dynamo's trace of the original (the same ops, up to its own reordering)
        stats["refused"] += 1
        assert report.rejections and all(r.reason for r in report.rejections), (params, str(report))
        stats.update(f"refused: {r.reason[:70]}" for r in report.rejections)
    if max(errs) > TOLERANCE[dtype] or any(o.shape != r.shape for o, r in zip(outs, refs)):
        stats["wrong"] += 1
        raise AssertionError(f"wrong output {params} {dtype} T={T} {entry}: rel errs {errs}\n{report}")


def test_random_naive_blocks_are_rewritten_right_or_refused():
    stats = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=not RANDOMIZED,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure prints its (small) case at once
        suppress_health_check=list(HealthCheck),
    )
    @given(naive_blocks())
    def check(case):
        _run(*case, stats)

    check()
    print(f"\nmoe_fx fuzz: {dict(stats)}")
    assert stats["wrong"] == 0 and stats["verify_failed"] == 0 and stats["fallback"] == 0, dict(stats)
    assert stats["examples"] >= EXAMPLES
    assert stats["rewritten"] >= EXAMPLES // 2, "the fuzzer should mostly generate blocks moe_fx handles"
