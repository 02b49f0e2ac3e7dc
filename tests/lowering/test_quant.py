"""Quantisation formats and the reference lowering's quantised arithmetic, against float64 oracles."""

import itertools

import pytest
import torch

from moe_fx.lowering import quant
from moe_fx.lowering.reference import activate
from moe_fx.ops import combine_args, dispatch_args, experts_args
from moe_fx.spec import ExpertsSpec, MoESpec, QuantSpec
from tests.conftest import rel_err

OPS = torch.ops.moe_fx
MODES = ("fp8", "fp8_block", "int8", "int4_weight")


pytestmark = pytest.mark.usefixtures("poison_outputs")


def test_int4_pack_round_trips_every_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)[:, :15]  # odd D
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert torch.equal(quant.unpack_int4(packed, 15), q)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("F", [128, 250, 200, 40])
def test_w2_in_column_blocks_round_trips(mode, F):
    """`block_columns` puts column f of row d at [f // 128, d, f % 128], zeros past F; `unblock_columns` undoes it.
    The rewrite stores one-byte modes' w2 so (`stored_w2`) where the padding is small (F = 128, 250: 2.4 %; not
    200 or 40); D is read off either layout."""
    w = torch.randn(3, 24, F)
    e, d, f = 2, 17, F - 1
    w[e, d, f] = 5.0  # quantised to a value that is not zero
    wq, _ = quant.quantize_weight(w, mode)
    assert (quant.stored_w2(wq, mode).dim() == 4) == (F in (128, 250))
    blocked = quant.block_columns(wq)
    assert blocked.shape == (3, -(-F // 128), 24, 128) and blocked.is_contiguous() and blocked.dtype == wq.dtype
    assert blocked[e, f // 128, d, f % 128].float() == wq[e, d, f].float() != 0
    assert not blocked.float().permute(0, 2, 1, 3).flatten(2)[..., F:].any()
    assert torch.equal(quant.unblock_columns(blocked, F).float(), wq.float())
    assert quant.w2_out_features(blocked, False) == quant.w2_out_features(wq, False) == 24
    assert quant.stored_w2(wq, "fp8_block") is wq and quant.w2_out_features(wq.transpose(1, 2), True) == 24


def element_scale(scale, mode, shape):
    """The scale each element of an [E, H, D] weight was quantised with."""
    E, H, D = shape
    B = quant.BLOCK
    if mode in ("fp8", "int8"):
        return scale[..., None].expand(shape)
    if mode == "fp8_block":
        return scale.repeat_interleave(B, 1)[:, :H].repeat_interleave(B, 2)[..., :D]
    return scale.repeat_interleave(B, 2)[..., :D]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 24, 40), (3, 200, 130)], ids=["small", "partial_blocks"])
def test_weight_quantisation_error_is_bounded_per_scale(mode, shape):
    w = torch.randn(shape) * torch.logspace(-2, 1, shape[1])[None, :, None]  # channels of very different size
    wq, scale = quant.quantize_weight(w, mode)
    back = quant.dequantize_weight(wq, scale, mode, shape[2])
    assert back.shape == w.shape and torch.isfinite(back).all()
    err, s = (back - w.double()).abs(), element_scale(scale, mode, shape).double()
    if mode in ("fp8", "fp8_block"):  # e4m3 round to nearest: 2^-4 relative, or half the 2^-9 subnormal step
        assert (err <= w.double().abs() * 2**-4 + s * 2**-10 + 1e-12).all()
    else:  # a uniform grid of step `scale`
        assert (err <= s / 2 + 1e-9).all()
    assert rel_err(back, w) < {"fp8": 4e-2, "fp8_block": 4e-2, "int8": 1e-2, "int4_weight": 0.2}[mode]


@pytest.mark.parametrize("mode", ["fp8", "fp8_block", "int8"])
def test_activation_scales_are_per_token_so_nan_stays_in_its_row(mode):
    x = torch.randn(5, 300)
    x[2, 7] = float("nan")
    x[3, 1] = float("inf")
    xq, scale = quant.quantize_rows(x, mode)
    clean = [0, 1, 4]
    ref_q, ref_scale = quant.quantize_rows(x[clean], mode)
    assert torch.equal(xq[clean].view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale[clean], ref_scale)
    assert rel_err(quant.dequantize_rows(xq[clean], scale[clean], mode), x[clean]) < 4e-2


def oracle(x, weights, ids, w13, w2, b13, b2, act, mode):
    """Per (token, slot), float64, from dequantised values: what the quantised block must compute."""
    w13q, s13 = quant.quantize_weight(w13, mode)
    w2q, s2 = quant.quantize_weight(w2, mode)
    w13d = quant.dequantize_weight(w13q, s13, mode, w13.shape[2])
    w2d = quant.dequantize_weight(w2q, s2, mode, w2.shape[2])
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, k in itertools.product(range(x.shape[0]), range(ids.shape[1])):
        e = int(ids[t, k])
        xt = x[t : t + 1]
        if mode in quant.ACTIVATION_QUANTISED:
            xt = quant.dequantize_rows(*quant.quantize_rows(xt, mode), mode)
        h = xt.double() @ w13d[e].T + b13[e].double()
        a = activate(h.float(), act, "concat", 1.702, 7.0)
        if mode in quant.ACTIVATION_QUANTISED:
            a = quant.dequantize_rows(*quant.quantize_rows(a, mode), mode)
        else:
            a = a.to(x.dtype)
        out[t] += ((a.double() @ w2d[e].T)[0] + b2[e].double()) * weights[t, k].double()
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [0, 1, 9])
@pytest.mark.parametrize("act", ["silu_gated", "gelu"])
def test_reference_quantised_experts_against_oracle(mode, T, act):
    E, K, D, F = 4, 2, 136, 40  # D spans a full and a partial 128-block
    H = 2 * F if act == "silu_gated" else F
    x = torch.randn(T, D)
    w13, w2 = torch.randn(E, H, D) / D**0.5, torch.randn(E, D, F) / F**0.5
    b13, b2 = torch.randn(E, H) * 0.1, torch.randn(E, D) * 0.1
    ids = torch.rand(T, E).argsort(-1)[:, :K].int()
    ids[:, 0] = 2  # expert 2 gets every token; with K=2 of E=4 another expert may get none
    weights = torch.rand(T, K) + 0.1
    spec = MoESpec(ExpertsSpec(E, D, F, act, has_w13_bias=True, has_w2_bias=True), K, quant=QuantSpec(mode))
    w13q, s13 = quant.quantize_weight(w13, mode)
    w2q, s2 = quant.quantize_weight(w2, mode)
    dispatched = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, weights, "reference"))
    xq, xscale = dispatched[:2]
    assert xq.dtype == quant.activation_dtype(mode, x.dtype)
    args = experts_args(spec, x, dispatched, w13q, None, w2q, b13, b2, torch.float32, "reference", s13, s2)
    y = OPS.experts(*args)
    out = OPS.combine(*combine_args(spec, y, weights, dispatched, "reference"))
    assert out.shape == (T, D) and torch.isfinite(out).all()
    if T:
        assert rel_err(out, oracle(x, weights, ids, w13, w2, b13, b2, act, mode)) < 1e-4
    if T == 9 and act == "silu_gated":  # test_schema needs ops fp8 lacks on the CPU; fake and AOT checks run
        checks = ("test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(
            OPS.quantize_dispatch, dispatch_args(spec, x, ids, weights, "reference"), test_utils=checks
        )
        torch.library.opcheck(OPS.experts, args, test_utils=checks)
