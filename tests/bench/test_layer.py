"""bench/layer.py's moe_fx variants on the CPU (Triton under the interpreter): one `routed_experts` op (what the
rewrite emits), route on the router's linear by torch, and the four ops with combine's node compute the same layer
as the reference lowerings."""

from types import SimpleNamespace

import pytest
import torch

from moe_fx.lowering import quant
from moe_fx.lowering.triton import decode, grouped_gemm
from moe_fx.ops import combine_args, dispatch_args, experts_args, route_args
from moe_fx.spec import ExpertsSpec, MoESpec, RouterSpec
from tests.bench.scripts import load
from tests.conftest import fuse_every_config, rel_err

OPS = torch.ops.moe_fx
E, K, D, F = 8, 2, 32, 48


def block_and_spec(g: torch.Generator, f: int = F):
    """The attributes moe_fx_layer reads of transformers' Mixtral block (ffn dim f), random, and its spec."""
    block = SimpleNamespace(
        experts=SimpleNamespace(gate_up_proj=torch.randn(E, 2 * f, D, generator=g) / D**0.5,
                                down_proj=torch.randn(E, D, f, generator=g) / f**0.5),
        gate=SimpleNamespace(weight=torch.randn(E, D, generator=g) / D**0.5),
    )  # fmt: skip
    return block, MoESpec(ExpertsSpec(E, D, f, dtype="float32"), K, router=RouterSpec(K, renormalize=True))


def reference_layer(block, spec, x):
    """The four ops with the reference lowerings."""
    weights, ids = OPS.route(*route_args(spec.router, x, None, "reference", block.gate.weight))
    d = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, weights, "reference"))
    w13, w2 = block.experts.gate_up_proj, block.experts.down_proj
    y = OPS.experts(*experts_args(spec, x, d, w13, None, w2, None, None, x.dtype, "reference"))
    return OPS.combine(*combine_args(spec, y, weights, d, "reference"))


def test_moe_fx_variants_compute_the_layer():
    layer = load("layer")
    g = torch.Generator().manual_seed(0)
    block, spec = block_and_spec(g)
    x = torch.randn(5, D, generator=g)
    ref = reference_layer(block, spec, x)
    for kw in ({}, {"linear_outside": True}, {"combine_node": True}):
        out = layer.moe_fx_layer(block, spec, "triton", **kw)(x)
        assert rel_err(out, ref) < 1e-5, kw


def test_the_routed_variant_computes_the_layer(monkeypatch):
    """moe_fx_triton: one `routed_experts` op, at decode (every config fused here) the GEMV and the kernel that
    routes each pick, above it route, dispatch and experts; both the reference lowerings' layer."""
    fuse_every_config(monkeypatch)
    layer = load("layer")
    g = torch.Generator().manual_seed(0)
    block, spec = block_and_spec(g)
    for T in (2, decode.MAX_TOKENS + 3):
        x = torch.randn(T, D, generator=g)
        ref = reference_layer(block, spec, x)
        before = grouped_gemm.loads.copy()
        out = layer.moe_fx_layer(block, spec, "triton")(x)
        kinds = {k.split("/")[0] for k in (grouped_gemm.loads - before).elements()}
        assert kinds == ({"routed"} if T <= decode.MAX_TOKENS else {"fused"}), (T, kinds)
        assert rel_err(out, ref) < 1e-5, T


@pytest.mark.parametrize("f", [F, 128])
@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_the_quantised_routed_variants_compute_their_modes_layer(monkeypatch, mode, f):
    """moe_fx_fp8 / moe_fx_int8: one `routed_experts` op under the mode (the GEMV quantising x, the kernel routing
    each pick) with w2 as the rewrite stores it (in column blocks at F=128), the same layer as the mode's three ops
    on the same fused configs with w2 as [E, D, F], to fp32 atomics' order."""
    fuse_every_config(monkeypatch)
    layer = load("layer")
    assert layer.QUANT_VARIANTS[f"moe_fx_{mode}"] == mode and mode in layer.ROUTED_QUANT
    g = torch.Generator().manual_seed(0)
    block, spec = block_and_spec(g, f)
    x = torch.randn(3, D, generator=g)
    before = grouped_gemm.loads.copy()
    stored, store = [], quant.stored_w2
    with monkeypatch.context() as m:
        m.setattr(layer.quant, "stored_w2", lambda w2, mode: stored.append(store(w2, mode)) or stored[-1])
        routed, _ = layer.moe_fx_quant_layer(block, spec, mode)
        m.setattr(layer.quant, "stored_w2", lambda w2, mode: w2)  # the canonical [E, D, F]
        chain, _ = layer.moe_fx_quant_layer(block, spec, mode, routed=False)
    assert [w2.dim() for w2 in stored] == [4 if f == 128 else 3]  # blocked where that pads F little
    out = routed(x)
    assert {k.split("/")[0] for k in (grouped_gemm.loads - before).elements()} == {"routed"}
    assert rel_err(out, chain(x)) < 1e-5
