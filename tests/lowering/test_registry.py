"""The lowering registry: selection by (op, device, layout), priorities, supports(), third-party entries."""

import pytest
import torch

import moe_fx
from moe_fx.lowering import reference, registry
from moe_fx.spec import ExpertsSpec, MoESpec, QuantSpec, RouterSpec

SPEC = MoESpec(experts=ExpertsSpec(num_experts=4, hidden=8, ffn=12), top_k=2)


def test_reference_runs_everywhere():
    for device in ("cpu", "npu"):  # cuda picks triton (tests/lowering/triton/test_registration.py)
        for op in registry.OPS:
            sel = registry.select(op, device, SPEC)
            assert sel.chosen.name == "reference", (op, device)


def test_unsupported_spec_is_rejected_with_reason():
    sel = registry.select("experts", "cuda", SPEC.replace(quant=QuantSpec("fp8")))  # no GPU needed to select
    assert sel.chosen.name == "reference"
    assert "quant='fp8'" in dict(sel.rejected)["triton"]
    # the reference lowering runs every quant mode on one device, the expert-parallel dispatches too; tp refuses
    for layout, name in (("ep_alltoall", "ep_all_to_all"), ("ep_allgather", "ep_all_gather")):
        sel = registry.select("quantize_dispatch", "cpu", SPEC.replace(layout=layout, quant=QuantSpec("fp8")))
        assert sel.chosen.name == name
    sel = registry.select("quantize_dispatch", "cpu", SPEC.replace(layout="tp", quant=QuantSpec("fp8")))
    assert sel.chosen is None
    assert "quant='fp8' is not implemented for layout 'tp'" in sel.reason and "tp_all_reduce" in sel.reason
    for layout in ("ep_alltoall", "ep_allgather", "tp"):  # capacity is routed on one device only
        sel = registry.select("quantize_dispatch", "cpu", SPEC.replace(layout=layout, router=RouterSpec(2, capacity=3)))
        expected = f"token capacity (3, dropped picks) is not implemented for layout {layout!r}"
        assert sel.chosen is None and expected in sel.reason


def test_route_and_experts_reuse_single_device_lowerings_under_parallel_layouts():
    for layout in ("ep_alltoall", "ep_allgather", "tp"):
        spec = SPEC.replace(layout=layout)
        assert registry.select("experts", "cpu", spec).chosen.layout == "single"
        assert registry.select("route", "cpu", spec).chosen.layout == "single"
        assert registry.select("combine", "cpu", spec).chosen.layout == layout


def test_third_party_lowering_wins_by_priority_and_runs():
    calls = []

    @moe_fx.register_lowering(
        "experts",
        device="cpu",
        name="plugin",
        priority=50,
        supports=lambda s: None if s.experts.activation == "silu_gated" else "silu only",
    )
    def plugin_experts(**kwargs):
        calls.append(kwargs["activation"])
        return reference.experts(**kwargs)

    try:
        assert registry.select("experts", "cpu", SPEC).chosen.name == "plugin"
        relu = SPEC.replace(experts=ExpertsSpec(num_experts=4, hidden=8, ffn=12, activation="relu"))
        sel = registry.select("experts", "cpu", relu)
        assert sel.chosen.name == "reference" and sel.rejected == (("plugin", "silu only"),)
        m = moe_fx.examples.LoopMoE().eval()
        x = torch.randn(5, 32)
        with torch.no_grad():
            ref = m(x)
            report = moe_fx.apply(m, x)
            out = m(x)
        assert report.matches[0].lowerings["experts"].name == "plugin"
        assert calls and torch.allclose(out, ref, atol=1e-5)
    finally:
        registry.unregister_lowering("experts", device="cpu", name="plugin")
    with pytest.raises(ValueError, match="moe_fx: no lowering named 'plugin' is registered for experts"):
        registry.lookup("experts", "plugin")  # the op calls' lookup cache forgets an unregistered entry


def test_forced_lowering_must_support_the_spec():
    with pytest.raises(ValueError, match="moe_fx: forced lowering 'triton' cannot run experts .*: quant='int8'"):
        registry.select("experts", "cuda", SPEC.replace(quant=QuantSpec("int8")), force="triton")
    spec = SPEC.replace(layout="tp", quant=QuantSpec("int8"))
    with pytest.raises(ValueError, match="moe_fx: forced lowering 'tp_all_reduce' cannot run quantize_dispatch"):
        registry.select("quantize_dispatch", "cpu", spec, force="tp_all_reduce")
    with pytest.raises(ValueError, match="moe_fx: forced lowering 'triton' .* is not registered"):
        registry.select("experts", "cpu", SPEC, force="triton")


def test_registration_errors_name_the_value():
    with pytest.raises(ValueError, match="moe_fx: op='gemm'"):
        moe_fx.register_lowering("gemm", device="cpu", name="x")
    with pytest.raises(ValueError, match="moe_fx: layout='ring'"):
        moe_fx.register_lowering("experts", device="cpu", layout="ring", name="x")
    with pytest.raises(ValueError, match="already registered"):
        moe_fx.register_lowering("experts", device="*", name="reference")(lambda **kw: None)
    with pytest.raises(ValueError, match="moe_fx: reduces=True is for experts lowerings, not 'route'"):
        moe_fx.register_lowering("route", device="cpu", name="x", reduces=True)(lambda **kw: None)
