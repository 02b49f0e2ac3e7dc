"""The op contract: schemas, fake implementations and opcheck for the four moe_fx ops."""

import pytest
import torch

import moe_fx  # noqa: F401

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


def test_dispatch_experts_combine_opcheck():
    _, weights, ids = _routed()
    x = torch.randn(T, D)
    args = (x, ids, weights, E, "none", False, "single", "", None, "reference")
    torch.library.opcheck(OPS.quantize_dispatch, args)
    xq, xscale, offsets, rows, splits = OPS.quantize_dispatch(*args)
    assert xq.shape == (T * K, D) and offsets.shape == (E + 1,) and rows.shape == (T * K,) and splits.numel() == 0
    w13, w2 = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    b13, b2 = torch.randn(E, 2 * F), torch.randn(E, D)
    experts_args = (
        xq,
        xscale,
        offsets,
        w13,
        None,
        w2,
        b13,
        b2,
        None,
        None,
        None,
        "clamped_swiglu",
        "interleaved",
        False,
        False,
        1.702,
        7.0,
        "none",
        torch.float32,
        "reference",
    )
    torch.library.opcheck(OPS.experts, experts_args)
    y = OPS.experts(*experts_args)
    torch.library.opcheck(OPS.combine, (y, weights, rows, splits, True, "single", "", "reference"))


def test_fake_shapes_under_fake_mode():
    from torch._subclasses import FakeTensorMode

    with FakeTensorMode():
        logits, x = torch.empty(5, E), torch.empty(5, D)
        w, ids = OPS.route(logits, None, K, "softmax", "score_then_topk", False, 1, 1, 2, 1.0, "reference")
        xq, xs, offs, rows, splits = OPS.quantize_dispatch(x, ids, w, E, "none", False, "single", "", None, "reference")
        y = OPS.experts(
            xq,
            xs,
            offs,
            torch.empty(E, 2 * F, D),
            None,
            torch.empty(E, D, F),
            None,
            None,
            None,
            None,
            None,
            "silu_gated",
            "concat",
            False,
            False,
            1.702,
            7.0,
            "none",
            torch.bfloat16,
            "reference",
        )
        out = OPS.combine(y, w, rows, splits, True, "single", "", "reference")
    assert (w.shape, ids.dtype, xq.shape, offs.shape, y.dtype, out.shape) == (
        (5, K),
        torch.int32,
        (5 * K, D),
        (E + 1,),
        torch.bfloat16,
        (5, D),
    )


def test_unknown_lowering_is_a_clear_error():
    logits = torch.randn(3, E)
    with pytest.raises(ValueError, match="moe_fx: no lowering named 'nope'"):
        OPS.route(logits, None, K, "softmax", "score_then_topk", False, 1, 1, 2, 1.0, "nope")
