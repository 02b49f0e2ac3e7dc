"""The op contract: schemas, fake implementations and opcheck for the four moe_fx ops and the ordering edge."""

import pytest
import torch

from moe_fx.ops import ROUTED_QUANT, combine_args, dispatch_args, experts_args, routed_args
from moe_fx.spec import ExpertsSpec, MoESpec, QuantSpec, RouterSpec

OPS = torch.ops.moe_fx
T, E, K, D, F = 7, 4, 2, 16, 24


def _routed(T=T):
    logits = torch.randn(T, E)
    weights, ids = OPS.route(logits, None, K, "softmax", "score_then_topk", True, 1, 1, 2, 1.0, "reference")
    return logits, weights, ids


def test_route_schema_and_opcheck():
    logits, weights, ids = _routed()
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (T, K)
    bias = torch.randn(E)
    torch.library.opcheck(OPS.route, (logits, bias, K, "sigmoid", "score_then_topk", True, 2, 1, 2, 2.5, "reference"))
    torch.library.opcheck(OPS.route, (logits, None, K, "softmax", "topk_then_score", False, 1, 1, 2, 1.0, "reference"))
    # token capacity, counted per row of [G, S, E] logits: dropped picks come back as id -1, weight 0
    grouped = torch.randn(3, T, E)
    capped = (grouped, None, K, "softmax", "score_then_topk", False, 1, 1, 2, 1.0, "reference", torch.float32, 3)
    torch.library.opcheck(OPS.route, capped)
    weights, ids = OPS.route(*capped)
    assert ids.shape == (3 * T, K) and (ids == -1).any() and (weights[ids == -1] == 0).all()


@pytest.mark.parametrize("impl", ["reference", "triton"])  # triton: the interpreter on the CPU
def test_route_with_the_routers_projection(impl):
    """route(x, proj_weight=w, proj_bias=b) is route(linear(x, w, b)): the reference lowering (no `projects`) has the
    op apply torch's linear; Triton's projects itself (a GEMV at decode sizes)."""
    x_TD, w_ED, b_E = torch.randn(5, D), torch.randn(E, D), torch.randn(E)
    args = (K, "sigmoid", "score_then_topk", True, 1, 1, 2, 2.5, impl, torch.float32, 0)
    weights, ids = OPS.route(x_TD, None, *args, w_ED, b_E)
    ref_weights, ref_ids = OPS.route(torch.nn.functional.linear(x_TD, w_ED, b_E), None, *args)
    assert torch.equal(ids, ref_ids) and (weights - ref_weights).abs().max() < 1e-6
    torch.library.opcheck(OPS.route, (x_TD, None, *args, w_ED, b_E))


def test_dispatch_experts_combine_with_dropped_picks_opcheck():
    logits = torch.randn(T, E)
    weights, ids = OPS.route(logits, None, K, "softmax", "score_then_topk", False, 1, 1, 2, 1.0, "reference",
                             torch.float32, 2)  # fmt: skip
    assert (ids == -1).any()
    x = torch.randn(T, D)
    args = dispatch_args(SPEC, x, ids, weights, "reference")
    torch.library.opcheck(OPS.quantize_dispatch, args)
    dispatched = OPS.quantize_dispatch(*args)
    assert dispatched[2][-1] == (ids >= 0).sum()  # dropped rows lie past the last expert's group
    w13, w2 = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    eargs = experts_args(SPEC, x, dispatched, w13, None, w2, None, None, x.dtype, "reference")
    torch.library.opcheck(OPS.experts, eargs)
    y = OPS.experts(*eargs)
    assert (y[dispatched[2][-1] :] == 0).all()


SPEC = MoESpec(ExpertsSpec(E, D, F, activation="clamped_swiglu", gate_up="interleaved"), K)


def test_dispatch_experts_combine_opcheck():
    _, weights, ids = _routed()
    x = torch.randn(T, D)
    args = dispatch_args(SPEC, x, ids, weights, "reference")
    torch.library.opcheck(OPS.quantize_dispatch, args)
    dispatched = OPS.quantize_dispatch(*args)
    xq, xscale, offsets, gather, row_w, rows, splits = dispatched
    assert xq.shape == (0, D) and offsets.shape == (E + 1,) and splits.numel() == 0  # no rows: experts reads x
    assert gather.shape == row_w.shape == rows.shape == (T * K,)
    w13, w2 = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    b13, b2 = torch.randn(E, 2 * F), torch.randn(E, D)
    for spec in (SPEC, SPEC.replace(weight_placement="input")):
        experts_args_ = experts_args(spec, x, dispatched, w13, None, w2, b13, b2, torch.float32, "reference")
        torch.library.opcheck(OPS.experts, experts_args_)
        y = OPS.experts(*experts_args_)
        torch.library.opcheck(OPS.combine, combine_args(spec, y, weights, dispatched, "reference"))
    # the ordering edges of an overlapped shared expert: a copy of x after the handle; `after` changes nothing
    shared = torch.randn(T, D)
    torch.library.opcheck(OPS.after_dispatch, (x, splits))
    assert torch.equal(OPS.after_dispatch(x, splits), x)
    torch.library.opcheck(OPS.experts, experts_args_, {"after": shared})
    assert torch.equal(OPS.experts(*experts_args_, after=shared), y)


def test_fake_shapes_under_fake_mode():
    from torch._subclasses import FakeTensorMode

    spec = MoESpec(ExpertsSpec(E, D, F), K)
    with FakeTensorMode():
        logits, x = torch.empty(5, E), torch.empty(5, D)
        w, ids = OPS.route(logits, None, K, "softmax", "score_then_topk", False, 1, 1, 2, 1.0, "reference")
        dispatched = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, w, "reference"))
        w13, w2 = torch.empty(E, 2 * F, D), torch.empty(E, D, F)
        y = OPS.experts(*experts_args(spec, x, dispatched, w13, None, w2, None, None, torch.bfloat16, "reference"))
        out = OPS.combine(*combine_args(spec, y, w, dispatched, "reference"))
    xq, offs = dispatched[0], dispatched[2]
    assert (w.shape, ids.dtype, xq.shape, offs.shape, y.shape, y.dtype, out.shape) == (
        (5, K),
        torch.int32,
        (0, D),
        (E + 1,),
        (5 * K, D),
        torch.bfloat16,
        (5, D),
    )


def test_unknown_lowering_is_a_clear_error():
    logits = torch.randn(3, E)
    with pytest.raises(ValueError, match="moe_fx: no lowering named 'nope'"):
        OPS.route(logits, None, K, "softmax", "score_then_topk", False, 1, 1, 2, 1.0, "nope")


@pytest.mark.parametrize("quant", ["fp8_block", "int4_weight"])
def test_routed_experts_takes_per_token_quant_only(quant):
    """`routed_experts` is route, dispatch and experts for activations unquantised or quantised per token
    (ROUTED_QUANT); a block of 1×128 groups or packed weights is refused by name (the rewrite keeps its three ops)."""
    assert quant not in ROUTED_QUANT
    spec = MoESpec(ExpertsSpec(4, 8, 8, dtype="float32"), 2, router=RouterSpec(2), quant=QuantSpec(quant))
    x, logits, w13, w2 = torch.randn(2, 8), torch.randn(2, 4), torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    impl = dict.fromkeys(("route", "quantize_dispatch", "experts"), "reference")
    with pytest.raises(ValueError, match=f"moe_fx: routed_experts takes quant in .*, got '{quant}'"):
        OPS.routed_experts(*routed_args(spec, x, logits, None, w13, None, w2, None, None, x.dtype, impl))
