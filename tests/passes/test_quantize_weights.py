"""Quantised rewrites end to end: weights quantised once, errors bounded per mode, updates followed."""

import pytest
import torch
from torch._dynamo.utils import counters

import moe_fx
from moe_fx import examples as ex
from moe_fx import hf_models
from moe_fx.backend import last_reports
from moe_fx.lowering import quant
from moe_fx.lowering.quant import EXPECTED_ERROR
from tests.conftest import rel_err

# rel err of the quantised block against the unquantised model, on random inputs: measured (fp32 models,
# D=32..64) fp8 5.5-6.5e-2, fp8_block 5.7-6.4e-2, int8 1.5-1.7e-2, int4_weight 1.2-2.0e-1. e4m3 keeps 3
# mantissa bits, so each quantised operand carries ~2.6% RMS relative error, and a block has four.
BOUND = EXPECTED_ERROR
MODES = tuple(BOUND)


def compile_quant(model, x, mode, **options):
    counters.clear()
    with torch.no_grad():
        return torch.compile(model, backend="moe_fx", options={"inner": "eager", "quant": mode, **options})(x)


CASES = [(ex.LoopMoE, mode) for mode in MODES] + [
    (ex.GatherEinsumMoE, "fp8_block"),  # stacked 3-D weights, separate gate/up
    (ex.GatherMatmulMoE, "int4_weight"),  # fused gate/up, GELU
    (ex.DeepSeekStyleMoE, "fp8"),  # group-limited router, shared expert
]


@pytest.mark.parametrize("cls, mode", CASES, ids=[f"{c.__name__}-{m}" for c, m in CASES])
def test_quantised_block_is_close_to_and_differs_from_the_model(cls, mode):
    model = cls().eval()
    x = torch.randn(11, 32)
    with torch.no_grad():
        ref = model(x)
    out = compile_quant(model, x, mode)
    report = last_reports()[-1]
    assert counters["moe_fx"]["rewritten"] == 1, str(report)
    block = report.matches[0]
    assert block.spec.quant.mode == mode and mode in str(report) and "(was " in str(report)
    fraction = {"fp8": 0.25, "fp8_block": 0.25, "int8": 0.25, "int4_weight": 0.125}[mode]  # of fp32 weights
    assert fraction < block.weight_bytes / block.unquantised_bytes < fraction * 1.5
    err = rel_err(out, ref)
    assert 1e-3 < err < BOUND[mode], err


@pytest.mark.parametrize("mode", ["fp8"])
def test_hf_mixtral_apply_quantised(mode):
    model = hf_models.build("mixtral")
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
        report = moe_fx.apply(model, options={"quant": mode})
        out = model(ids).logits
    assert len(report.matches) == 2 and all(m.spec.quant.mode == mode for m in report.matches)
    assert 1e-4 < rel_err(out, ref) < BOUND[mode]


def test_weights_quantised_once_across_recompiles():
    model = ex.LoopMoE().eval()
    with torch.no_grad():
        for T in (5, 9):  # dynamic=False: one graph per T, both rewritten
            torch.compile(model, backend="moe_fx", dynamic=False, options={"inner": "eager", "quant": "fp8"})(
                torch.randn(T, 32)
            )
    cache = model.experts[0].w1.weight.__dict__["_moe_fx_quantised"]
    assert len(last_reports()) >= 2 and len(cache) == 1


@pytest.mark.parametrize("cls", [ex.LoopMoE, ex.GatherEinsumMoE], ids=["per_expert", "stacked_3d"])
def test_quantised_weights_follow_load_state_dict(cls):
    model, other = cls().eval(), cls().eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        moe_fx.apply(model, x, options={"quant": "int8"})
        before = model(x)
        model.load_state_dict(other.state_dict())
        after, ref = model(x), other(x)
    assert rel_err(after, ref) < BOUND["int8"]
    assert rel_err(before, ref) > 0.3  # the old weights would be far off


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_w2_stored_in_column_blocks_computes_the_canonical_block(mode, monkeypatch):
    """F = 128: the rewrite stores w2 in column blocks ([E, 1, D, 128], `quant.stored_w2`); the block computes what
    it computes with w2 as [E, D, F], and follows the model's weights into the same buffer after load_state_dict."""
    model, other = ex.LoopMoE(ffn=128).eval(), ex.LoopMoE(ffn=128).eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        moe_fx.apply(model, x, options={"quant": mode})
        blocked = model(x)
        w2_q = next(iter(model.experts[0].w1.weight.__dict__["_moe_fx_quantised"].values())).tensors[2]
        assert w2_q.shape == (4, 1, 32, 128)
        monkeypatch.setattr(quant, "W2_BLOCKED_MODES", ())
        canonical = ex.LoopMoE(ffn=128).eval()
        canonical.load_state_dict(model.state_dict())
        moe_fx.apply(canonical, x, options={"quant": mode})
        assert torch.equal(blocked, canonical(x))
        model.load_state_dict(other.state_dict())
        assert rel_err(model(x), other(x)) < BOUND[mode] and w2_q.shape == (4, 1, 32, 128)


def test_nan_token_does_not_touch_other_tokens():
    model = ex.LoopMoE().eval()
    x = torch.randn(6, 32)
    with torch.no_grad():
        moe_fx.apply(model, x, options={"quant": "fp8"})
        clean = model(x)
        x[3, 5] = float("nan")
        poisoned = model(x)
    others = [0, 1, 2, 4, 5]
    assert torch.equal(poisoned[others], clean[others])
    assert torch.isnan(poisoned[3]).all()  # as in eager: the token's own output is NaN


def test_fallback_option_must_be_a_bool():
    with pytest.raises(ValueError, match="moe_fx: option allow_reference_fallback='yes' must be a bool"):
        moe_fx.explain(ex.LoopMoE().eval(), torch.randn(3, 32), options={"allow_reference_fallback": "yes"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantised_block_on_gpu_runs_triton_or_names_the_capability(monkeypatch):
    model = ex.LoopMoE().eval().cuda()
    x = torch.randn(5, 32, device="cuda")
    with torch.no_grad():
        ref = model(x)
        if torch.cuda.get_device_capability() >= (8, 9):  # fp8 tensor cores: the native Triton lowering
            report = moe_fx.explain(model, x, options={"quant": "fp8"})
            assert report.matches[0].lowerings["experts"].name == "triton"
            assert 1e-3 < rel_err(compile_quant(model, x, "fp8"), ref) < BOUND["fp8"]
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
        explained = moe_fx.explain(model, x, options={"quant": "fp8", "allow_reference_fallback": True})
        rejected = dict(explained.matches[0].lowerings["experts"].rejected)
        assert (
            rejected["triton"] == "quant='fp8' needs compute capability >= 8.9 (fp8 tensor cores), this device has 8.0"
        )
        with pytest.raises(ValueError, match=r"moe_fx: quant='fp8' has no native experts lowering .*capability 8\.0"):
            moe_fx.explain(model, x, options={"quant": "fp8"})
        out = compile_quant(model, x, "fp8", allow_reference_fallback=True)
    assert 1e-3 < rel_err(out, ref) < BOUND["fp8"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs fp8")
@pytest.mark.parametrize("mode", ["fp8", "fp8_block"])
def test_quantised_block_deeper_than_a_scale_block_runs_triton_on_gpu(mode):
    """Native Triton GEMMs end to end, D and F three and two 128-wide scale blocks deep (fp8_block's K-loop
    rescales its accumulator between them), against the unquantised model."""
    model = ex.LoopMoE(dim=384, ffn=256, num_experts=8).eval().cuda()
    x = torch.randn(37, 384, device="cuda")
    with torch.no_grad():
        ref = model(x)
    report = moe_fx.explain(model, x, options={"quant": mode})
    assert all(report.matches[0].lowerings[op].name == "triton" for op in ("quantize_dispatch", "experts"))
    assert 1e-3 < rel_err(compile_quant(model, x, mode), ref) < BOUND[mode]


@pytest.mark.parametrize("cls", [ex.LoopMoE, ex.GatherEinsumMoE], ids=["per_expert", "stacked_3d"])
def test_unquantised_weights_freed_on_request(cls):
    model = cls(dim=64, ffn=128, num_experts=8).eval()
    x = torch.randn(7, 64)
    expert_params = [p for name, p in model.named_parameters() if not name.startswith("gate")]
    before = sum(p.numel() * p.element_size() for p in expert_params)
    with torch.no_grad():
        ref = model(x)
        report = moe_fx.apply(model, x, options={"quant": "fp8", "keep_original_weights": False})
        out = model(x)
    assert sum(p.numel() for p in expert_params) == 0
    kept = model.forward.gm.named_buffers()
    assert sum(t.numel() * t.element_size() for _, t in kept) == report.matches[0].weight_bytes < before / 3
    assert rel_err(out, ref) < BOUND["fp8"]


def test_freeing_weights_under_compile_is_refused():
    with pytest.raises(Exception, match="moe_fx: keep_original_weights=False needs moe_fx.apply"):
        compile_quant(ex.LoopMoE().eval(), torch.randn(3, 32), "fp8", keep_original_weights=False)
