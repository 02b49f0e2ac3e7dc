"""Checkpoints that hold their experts quantised: the rewrite feeds the model's own quantised parameters and scales.

The model dequantises its weights exactly, so against its eager forward the rewritten block differs only by
moe_fx's dynamic activation quantisation (x and the intermediate activation, e4m3 per 1x128 group or per
token): measured rel err (E=4, D=160, F=96, T=32, 3 seeds) fp8_block 4.2-4.3e-2, fp8 4.3-4.4e-2, int8
1.5-1.7e-2, fp8_block in bf16 4.2e-2; bounded by `quant.EXPECTED_ERROR`. Against the reference quantised
computation on the same parameters it is exact (rel err < 1e-6).
"""

import pytest
import torch

import moe_fx
from moe_fx import examples as ex
from moe_fx.backend import last_reports
from moe_fx.lowering import reference
from moe_fx.lowering.quant import BLOCK, EXPECTED_ERROR, FP8, quantize_weight
from moe_fx.lowering.registry import register_lowering, unregister_lowering
from moe_fx.ops import combine_args, dispatch_args, experts_args, route_args
from tests.conftest import rel_err

SEEN = []  # (w13, w13_scale, w2, w2_scale) data pointers the experts op received


@pytest.fixture
def spy():
    """An experts lowering that records what it receives, then runs the reference."""

    @register_lowering("experts", device="cpu", name="spy", priority=-1)
    def _spy(**kw):
        SEEN.append(tuple(None if kw[k] is None else kw[k].data_ptr() for k in ("w13", "w13_scale", "w2", "w2_scale")))
        return reference.experts(**kw)

    SEEN.clear()
    yield {"experts": "spy"}
    unregister_lowering("experts", device="cpu", name="spy")


def _pointers(model):
    return tuple(getattr(model, n).data_ptr() for n in ("w13_q", "w13_scale_inv", "w2_q", "w2_scale_inv"))


def _reference(model, x, spec):
    """The reference quantised block (`spec`) on the model's own parameters, through the ops."""
    ops = torch.ops.moe_fx
    x_TD = x.reshape(-1, x.shape[-1])
    weights_TK, ids_TK = ops.route(*route_args(spec.router, model.gate(x_TD), None, "reference"))
    dispatched = ops.quantize_dispatch(*dispatch_args(spec, x_TD, ids_TK, weights_TK, "reference"))
    args = experts_args(spec, x_TD, dispatched, model.w13_q, None, model.w2_q, None, None, x.dtype, "reference",
                        model.w13_scale_inv, model.w2_scale_inv)  # fmt: skip
    return ops.combine(*combine_args(spec, ops.experts(*args), weights_TK, dispatched, "reference"))


F32, BF16 = torch.float32, torch.bfloat16
CASES = [(FP8, 128, "fp8_block", F32), (FP8, None, "fp8", F32), (torch.int8, None, "int8", F32),
         (FP8, 128, "fp8_block", BF16)]  # fmt: skip


@pytest.mark.parametrize("qdtype, block, mode, dtype", CASES, ids=[f"{c[2]}-{c[3]}" for c in CASES])
def test_quantised_checkpoint_is_used_as_it_is(spy, qdtype, block, mode, dtype):
    torch.manual_seed(0)
    model = ex.QuantisedCheckpointMoE(qdtype=qdtype, block=block, dtype=dtype).eval()
    x = torch.randn(11, 160, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend="moe_fx", options={"inner": "eager", "lowerings": spy})
        out = compiled(x)
    report = last_reports()[-1]
    assert len(report.matches) == 1, str(report)
    m = report.matches[0]
    assert m.spec.quant.mode == mode and m.unquantised_bytes == 0
    assert f"pre-quantised {mode} weights taken as they are" in str(report), str(report)
    assert m.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters() if p is not model.gate.weight)
    assert SEEN and all(seen == _pointers(model) for seen in SEEN)  # the model's own storage
    with torch.no_grad():
        exact = _reference(model, x, m.spec)
    assert rel_err(out, exact) < 1e-6  # the same quantised arithmetic
    err = rel_err(out, ref)  # only the activations are quantised
    assert 1e-3 < err < EXPECTED_ERROR[mode], err


def test_apply_reads_the_parameters_so_updates_reach_it(spy):
    model, other = ex.QuantisedCheckpointMoE().eval(), ex.QuantisedCheckpointMoE()
    x = torch.randn(7, 160)
    with torch.no_grad():
        report = moe_fx.apply(model, x, options={"lowerings": spy})
        spec = report.matches[0].spec
        assert rel_err(model(x), _reference(model, x, spec)) < 1e-6
        model.load_state_dict(other.state_dict())  # in place: the rewritten block reads the new weights
        assert rel_err(model(x), _reference(model, x, spec)) < 1e-6
    assert SEEN and all(seen == _pointers(model) for seen in SEEN)


def test_an_unread_format_runs_as_the_model_dequantises_or_is_refused_with_quant():
    model = ex.QuantisedCheckpointMoE(block=64).eval()  # 64x64 tiles: no quant format of moe_fx's
    x = torch.randn(9, 160)
    with torch.no_grad():
        ref = model(x)
        report = moe_fx.explain(model, x, options={"quant": "fp8_block"})
        assert not report.matches and "cannot be used as they are" in report.rejections[-1].reason, str(report)
        assert "are not e4m3 with [E, H/128, D/128]" in report.rejections[-1].reason
        out = torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x)
    report = last_reports()[-1]
    assert report.matches[0].spec.quant.mode == "none"
    assert "quantised weights run as the model dequantises them" in str(report), str(report)
    assert rel_err(out, ref) < 1e-5


def test_another_mode_than_the_checkpoints_is_refused():
    model = ex.QuantisedCheckpointMoE().eval()
    report = moe_fx.explain(model, torch.randn(5, 160), options={"quant": "int8"})
    assert not report.matches
    assert "already quantised as fp8_block; quant='int8' would re-quantise" in report.rejections[-1].reason


def test_hf_fp8_experts_storage_is_the_fp8_block_layout():
    """transformers' FP8Experts (FineGrainedFP8Config, DeepSeek-V3 checkpoints) stores gate_up_proj
    [E, 2F, D] e4m3 and gate_up_proj_scale_inv [E, 2F/128, D/128] float32, as moe_fx's fp8_block. Its forward
    needs CUDA and the hub `finegrained-fp8` kernel (and on a CPU-only host the quantizer dequantises to
    bf16 at load), so only its storage is checked here."""
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    E, H, D = 2, 2 * 96, 160
    weight, scale_inv = fp8._alloc_expert_proj(E, H, D, FP8, torch.float32, sf_gran_n=BLOCK, sf_gran_k=BLOCK)
    q, scale = quantize_weight(torch.randn(E, H, D), "fp8_block")
    assert (weight.shape, weight.dtype) == (q.shape, q.dtype)
    assert (scale_inv.shape, scale_inv.dtype) == (scale.shape, scale.dtype)
