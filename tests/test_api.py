"""moe_fx.explain and moe_fx.apply on naive models: reports, memory, weight updates, grad mode."""

import functools

import pytest
import torch

import moe_fx
from moe_fx import examples as ex
from moe_fx.api import _RewrittenForward
from tests.conftest import rel_err


def test_explain_lists_two_forms_with_specs_and_lowerings():
    model = ex.TwoFormModel().eval()
    report = moe_fx.explain(model, torch.randn(2, 5, 64))
    assert [(m.module_path, m.form) for m in report.matches] == [("moe1", "expert_loop"), ("moe2", "gather_einsum")]
    for m in report.matches:
        assert m.spec.experts.num_experts == 8 and m.spec.top_k == 2 and m.spec.router.scoring == "softmax"
        assert {op: c.name for op, c in m.lowerings.items()} == dict.fromkeys(
            ("route", "quantize_dispatch", "experts", "combine"), "reference"
        )
        assert all(c.reason for c in m.lowerings.values())
    text = str(report)
    assert "moe1" in text and "gather_einsum" in text and "softmax→top2→renorm" in text
    assert "<table>" in report._repr_html_()
    assert report.graphs == 1 and report.graph_breaks == 0


def test_explain_does_not_rewrite():
    model = ex.LoopMoE().eval()
    forward = model.forward
    moe_fx.explain(model, torch.randn(4, 32))
    assert model.forward == forward and not hasattr(model, "_moe_fx_report")


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_apply_keeps_one_copy_of_the_weights():
    model = ex.LoopMoE(dim=64, ffn=128, num_experts=8).eval()
    before = _storage_bytes(model.parameters())
    moe_fx.apply(model, torch.randn(6, 64))
    gm = model.forward.gm
    stacked = [t for name, t in gm.named_buffers() if name.startswith("moe_fx_block")]
    assert stacked, "per-expert weights are stacked"
    after = _storage_bytes([*model.parameters(), *stacked])
    assert after <= before * 1.05, (before, after)
    assert model.experts[3].w1.weight.untyped_storage().data_ptr() == stacked[0].untyped_storage().data_ptr()


def test_apply_twice_is_a_no_op_and_state_dict_round_trips():
    model = ex.LoopMoE().eval()
    x = torch.randn(6, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = moe_fx.apply(model, x)
    assert moe_fx.apply(model, x) is report and len(report.matches) == 1
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    fresh = ex.LoopMoE().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(model(x), fresh(x)) < 1e-6


def test_weights_loaded_after_apply_are_used():
    model, other = ex.LoopMoE().eval(), ex.LoopMoE().eval()
    x = torch.randn(8, 32)
    moe_fx.apply(model, x)
    model.load_state_dict(other.state_dict())  # copies into the parameters, now views of the stack
    with torch.no_grad():
        assert rel_err(model(x), other(x)) < 1e-5


def test_grad_mode_runs_the_original_block_with_a_warning():
    model = ex.LoopMoE().eval()
    x = torch.randn(5, 32)
    moe_fx.apply(model, x)
    with pytest.warns(UserWarning, match="grad mode"):
        out = model(x)
    out.sum().backward()
    assert model.experts[0].w1.weight.grad is not None


def test_compile_in_grad_mode_refuses_with_reason():
    from moe_fx.backend import last_reports

    model = ex.LoopMoE().eval()
    x = torch.randn(5, 32)
    out = torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x)
    assert "grad mode" in last_reports()[-1].rejections[0].reason
    out.sum().backward()


def test_apply_needs_inputs_for_a_plain_module():
    with pytest.raises(ValueError, match="moe_fx: LoopMoE needs example inputs"):
        moe_fx.apply(ex.LoopMoE())


def _passes_through(forward):
    """A decorator like transformers' `deprecate_kwarg`: Dynamo sees the module as `args[0]` of the wrapper."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class _DecoratedForward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(32, 32), ex.LoopMoE())

    @_passes_through
    def forward(self, x):
        return self.inner(x)


def test_apply_finds_blocks_under_a_decorated_forward():
    model = _DecoratedForward().eval()
    x = torch.randn(6, 32)
    with torch.no_grad():
        expected = model(x)
        report = moe_fx.apply(model, x)
        out = model(x)
    assert [m.module_path for m in report.matches] == ["inner.1"], str(report)
    assert "L[" not in str(report), str(report)
    assert isinstance(model.inner[1].forward, _RewrittenForward)
    assert rel_err(out, expected) < 1e-5
