"""Verified rewrites: a wrong, crashing or input-mutating lowering is caught at compile time and its
block is left untouched with the reason; the other blocks are still rewritten."""

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import moe_fx
from moe_fx import examples as ex
from moe_fx.backend import last_reports
from moe_fx.lowering import reference, registry
from tests.conftest import rel_err


def _wrong(**kwargs):  # drops the last expert's rows: plausible, and wrong
    y = reference.experts(**kwargs)
    offsets = kwargs["expert_offsets"]
    y[offsets[-2] :] = 0
    return y


def _raises(**kwargs):
    raise RuntimeError("kernel launch failed")


def _mutates(**kwargs):
    kwargs["w13"].mul_(1.0)  # right values, but it writes to the weights
    return reference.experts(**kwargs)


@pytest.fixture
def bad_lowering(request):
    fn, supports = request.param
    moe_fx.register_lowering("experts", device="cpu", name="bad", priority=100, supports=supports)(fn)
    yield
    registry.unregister_lowering("experts", device="cpu", name="bad")
    assert "bad" not in registry.names("experts")


def _gelu_only(spec):
    return None if spec.experts.activation == "gelu" else "gelu only"


class LoopThenMaskedSum(nn.Module):
    """Two blocks: a SwiGLU loop, then a top-1 GELU masked sum."""

    def __init__(self):
        super().__init__()
        self.moe1, self.moe2 = ex.LoopMoE(), ex.MaskedSumMoE()

    def forward(self, x):
        return self.moe2(x + self.moe1(x))


def _compile(model, x, **options):
    counters.clear()
    with torch.no_grad():
        return torch.compile(model, backend="moe_fx", options={"inner": "eager", **options})(x)


@pytest.mark.parametrize(
    "bad_lowering, why",
    [
        ((_wrong, None), "rel err"),
        ((_raises, None), "kernel launch failed"),
        ((_mutates, None), "modified its inputs or weights"),
    ],
    indirect=["bad_lowering"],
    ids=["wrong", "raises", "mutates"],
)
def test_bad_lowering_is_caught_and_the_block_left_untouched(bad_lowering, why):
    model = ex.LoopMoE().eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
    out = _compile(model, x)
    report = last_reports()[-1]
    assert counters["moe_fx"]["rewritten"] == 0 and counters["moe_fx"]["verify_failed"] == 1
    (rejection,) = report.rejections
    assert "verification failed (route=reference, quantize_dispatch=reference, experts=bad" in rejection.reason
    assert why in rejection.reason
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the original block ran


@pytest.mark.parametrize("bad_lowering", [(_wrong, None)], indirect=True)
def test_without_verify_the_wrong_lowering_runs(bad_lowering):
    """The control: what verification prevents."""
    model = ex.LoopMoE().eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
    out = _compile(model, x, verify=False)
    assert counters["moe_fx"]["rewritten"] == 1 and counters["moe_fx"]["verify_failed"] == 0
    assert rel_err(out, ref) > 1e-2


@pytest.mark.parametrize("bad_lowering", [(_wrong, _gelu_only)], indirect=True)
def test_only_the_failing_block_is_reverted(bad_lowering):
    model = LoopThenMaskedSum().eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        ref = model(x)
    out = _compile(model, x)
    report = last_reports()[-1]
    assert [m.module_path for m in report.matches] == ["moe1"]
    assert report.matches[0].errors["verified"] < 1e-5
    assert [r.module_path for r in report.rejections] == ["moe2"] and "experts=bad" in report.rejections[0].reason
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("bad_lowering", [(_wrong, None)], indirect=True)
def test_apply_and_explain_verify_too(bad_lowering):
    model = ex.GatherEinsumMoE().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model(x)
    assert "verification failed" in moe_fx.explain(model, x).rejections[0].reason
    report = moe_fx.apply(model, x)
    assert not report.matches and "experts=bad" in report.rejections[0].reason
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_verified_error_is_reported():
    model = ex.TwoFormModel().eval()
    report = moe_fx.explain(model, torch.randn(2, 3, 64))
    assert len(report.matches) == 2 and all(m.errors["verified"] < 1e-5 for m in report.matches)
    assert "verified" in str(report)
    report = moe_fx.explain(model, torch.randn(2, 3, 64), options={"verify": False})
    assert len(report.matches) == 2 and not any("verified" in m.errors for m in report.matches)
