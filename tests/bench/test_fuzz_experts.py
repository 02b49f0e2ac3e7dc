"""bench/fuzz_experts.py: random experts problems and tiles agree with the reference lowering (a few seeded cases,
interpreted on the CPU, compiled in bf16 on a GPU), and a wrong result is reported as one."""

import pytest
import torch

from tests.bench.scripts import load
from tests.lowering.triton.conftest import DEVICE, DTYPES

CASES = 12


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_cases_agree_with_the_reference(dtype):
    fuzz = load("fuzz_experts")
    results = [fuzz.check(fuzz.draw(seed, DEVICE, dtype), DEVICE) for seed in range(CASES)]
    assert all(r["status"] in ("right", "no_fit") for r in results), results
    assert sum(r["status"] == "right" for r in results) >= CASES // 2


def test_a_case_draws_every_knob_and_a_wrong_result_shows(monkeypatch):
    fuzz = load("fuzz_experts")
    cases = [fuzz.draw(seed, "cpu", torch.float16) for seed in range(200)]
    drawn = {
        "quant": {"none", "fp8", "int8", "int4_weight", "fp8_block"},
        "routing": set(fuzz.ROUTINGS),
        "gate_up": {"concat", "interleaved", "separate", "up_first"},
        "weight_at": {"none", "input", "output"},
        "reduce": {True, False},
    }
    for knob, values in drawn.items():
        assert {c[knob] for c in cases} == values, knob
    assert any(c["config"]["fused"] for c in cases) and any(c["D"] % 2 for c in cases)
    case = next(c for c in cases if c["quant"] == "none" and not c["reduce"])
    experts = fuzz.grouped_gemm.experts
    monkeypatch.setattr(fuzz.grouped_gemm, "experts", lambda *a, **kw: experts(*a, **kw) * 1.5)
    assert fuzz.check(case, DEVICE)["status"] == "wrong"
