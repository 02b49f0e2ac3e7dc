"""Identification: the probes a block is run on, the tolerance it is held to, and what they tell apart (clamps
past the example's values, a correction bias on one token, bf16 experts under float32 weights, routing weights
that are not in expert-sorted order)."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moe_fx
from moe_fx import examples as ex
from moe_fx.backend import last_reports
from moe_fx.passes import identify
from tests.conftest import no_fallback, rel_err
from tests.passes.test_match import TOL, compiled


@pytest.mark.parametrize("T, K, E", [(1, 1, 2), (1, 2, 8), (3, 1, 2), (4, 2, 16), (64, 8, 128)])
def test_random_cuts_give_every_expert_tokens_in_both_orders(T, K, E):
    """The cyclic probes route to every expert, at least one of them out of expert order (a region that sorts its
    rows must not find them sorted), and every probe has the cut's shapes, dtypes and positive weights."""
    x, w, ids = torch.randn(T, 32, dtype=torch.bfloat16), torch.rand(T, K), torch.zeros(T, K, dtype=torch.int64)
    probes = identify.random_cuts(torch.Generator().manual_seed(0), x, w, ids, E)
    routed = torch.cat([p[2].flatten() for p in probes])
    assert set(routed.tolist()) == set(range(E))
    assert any((p[2].flatten().diff() < 0).any() for p in probes) or T == 1  # one token: no order to flip
    for x_p, w_p, ids_p in probes:
        assert (x_p.shape, x_p.dtype, w_p.shape, w_p.dtype, ids_p.shape, ids_p.dtype) == (
            x.shape, x.dtype, w.shape, w.dtype, ids.shape, ids.dtype)  # fmt: skip
        assert x_p.std() > 0 and (w_p > 0).all() and ids_p.is_contiguous()
        assert (ids_p.sort(dim=-1).values.diff(dim=-1) > 0).all()  # a token's K experts are distinct


def test_probe_rounds_hold_at_least_probe_tokens():
    for T in (0, 1, 3, 63, 64, 1000):
        rounds = identify.probe_rounds(T)
        assert 1 <= rounds <= 16 and (T * rounds >= identify.PROBE_TOKENS or rounds == 16 or T == 0)


def test_block_tolerance_takes_the_loosest_dtype():
    assert identify.block_tolerance(torch.float32) == identify.TOLERANCE[torch.float32]
    assert identify.block_tolerance(torch.float32, torch.bfloat16) == identify.TOLERANCE[torch.bfloat16]
    assert identify.block_tolerance(torch.float8_e4m3fn) == 3e-2


def test_scaled_probes_scale_only_the_tokens():
    probes = [(torch.randn(3, 8, dtype=torch.bfloat16), torch.rand(3, 2), torch.tensor([[0, 1]] * 3))]
    assert identify.scaled_probes(probes, None) == [] and identify.scaled_probes(probes, 1.0) == []
    ((x, w, ids),) = identify.scaled_probes(probes, 4.0)
    assert x.dtype == torch.bfloat16 and torch.equal(x, probes[0][0] * 4) and w is probes[0][1] and ids is probes[0][2]


class ClampedSiLU(ex.SwiGLU):
    """DeepSeek-V4's, HY-V4's and GLM-5-Next's experts: silu(clamp(gate, max=L)) * clamp(up, -L, L), at L = 50,
    which the example's tokens never reach (the matcher's clamp probes do)."""

    def forward(self, x):
        return self.w2(F.silu(self.w1(x).clamp(max=50.0)) * self.w3(x).clamp(min=-50.0, max=50.0))


def test_clamped_silu_experts_are_rewritten_and_exact_past_the_limit():
    """The example's tokens stay far below the limit (50); the rewrite must hold on tokens 100x larger, where the
    gate and up values pass it and the clamps change the result."""
    model = ex.LoopMoE(expert=ClampedSiLU).eval()
    x = torch.randn(7, 32)
    fn = torch.compile(model, backend="moe_fx", options={"inner": "eager"})
    with torch.no_grad():
        assert rel_err(fn(x), model(x)) < TOL[torch.float32]
        report = last_reports()[-1]
        assert counters["moe_fx"]["rewritten"] == 1, str(report)
        experts = report.matches[0].spec.experts
        assert (experts.activation, experts.limit) == ("clamped_silu_gated", 50.0)
        far = x * 100
        ref = model(far)
        assert rel_err(fn(far), ref) < TOL[torch.float32]
        unclamped = ex.LoopMoE(expert=ex.SwiGLU).eval()
        unclamped.load_state_dict(model.state_dict())
        assert rel_err(unclamped(far), ref) > 0.1  # the clamps act on these tokens
    assert counters["moe_fx"]["rewritten"] == 1  # the second call ran the same rewritten graph


@pytest.mark.parametrize("seed", [1, 5, 7, 11])
def test_a_one_token_example_tells_the_correction_bias_apart(seed):
    """apply() on one token, E=4, top-1 of sigmoid scores + a correction bias: a router without the bias picks
    the same expert on one token about half the time, so a few one-token probes let it pass (these seeds gave
    rel err 0.5-1.4 at T=4 before the probes held >= 64 tokens); here it must be told apart."""
    torch.manual_seed(seed)
    model = ex.NaiveMoE(num_experts=4, k=1, dim=4, ffn=2, router="sigmoid_bias_scaled", form="masked_sum").eval()
    x, x4 = torch.randn(1, 4), torch.randn(4, 4)
    with torch.no_grad():
        ref = model(x4)
        report = moe_fx.apply(model, x)
        assert report.matches and report.matches[0].spec.router.has_bias, str(report)
        with no_fallback():
            assert rel_err(model(x4), ref) < TOL[torch.float32]


class Float32WeightsBf16ExpertsMoE(ex.GatherEinsumMoE):
    """HF Mixtral's and DeepSeek-V3's dtypes: float32 routing weights, renormalised in place, scale bf16
    experts, so the weighted sum is float32 (cast back after). The experts sum the down projection in two
    halves, rounded apart: bf16-level differences from moe_fx's experts, as cuBLAS's grouped GEMM gives on
    a GPU, which a float32 tolerance would refuse."""

    def forward(self, x):
        x_TD = x.view(-1, x.shape[-1])
        weights_TK, ids_TK = torch.topk(F.softmax(self.gate(x_TD).float(), dim=-1), self.k, dim=-1)
        weights_TK /= weights_TK.sum(dim=-1, keepdim=True)
        w1_TKFD, w3_TKFD, w2_TKDF = self.w1[ids_TK], self.w3[ids_TK], self.w2[ids_TK]
        h_TKF = F.silu(torch.einsum("td,tkfd->tkf", x_TD, w1_TKFD)) * torch.einsum("td,tkfd->tkf", x_TD, w3_TKFD)
        half = h_TKF.shape[-1] // 2
        y_TKD = torch.einsum("tkf,tkdf->tkd", h_TKF[..., :half], w2_TKDF[..., :half]) + torch.einsum(
            "tkf,tkdf->tkd", h_TKF[..., half:], w2_TKDF[..., half:]
        )
        return (y_TKD * weights_TK.unsqueeze(-1)).sum(dim=1).to(x.dtype).view(x.shape)


def test_bf16_experts_with_float32_weights_take_the_bf16_tolerance():
    model = Float32WeightsBf16ExpertsMoE().eval().to(torch.bfloat16)
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    out = compiled(model, x)
    assert counters["moe_fx"]["rewritten"] == 1, str(last_reports()[-1])
    assert 1e-4 < last_reports()[-1].matches[0].errors["experts"] < TOL[torch.bfloat16]  # bf16-level, not exact
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_low_precision_router_scores_are_rounded_like_the_original():
    model = ex.GatherEinsumMoE().eval().to(torch.bfloat16)  # softmax in bf16
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    out = compiled(model, x)
    assert last_reports()[-1].matches[0].spec.router.score_dtype == "bfloat16"
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert last_reports()[-1].matches[0].spec.router.summary().endswith("bfloat16 scores")


@pytest.mark.parametrize("T", [2, 4, 7])
def test_two_experts_top1_weights_not_taken_in_sorted_order(T):
    """Qwen3-MoE with 2 experts, top-1, no renormalisation: transformers' grouped_mm experts hold the routing
    weights in expert-sorted order as [T·K, 1], which at K=1 has the top-k's shape. The probes' cyclic rows all
    went to expert 0 and their one random probe was often sorted, so that tensor passed for the routing weights
    and the block was refused at verification (rel err ~5e-2). Now rewritten, with eager's logits."""
    pytest.importorskip("transformers")
    import copy

    from moe_fx import hf_models

    torch.manual_seed(0)
    sizes = dict(hidden_size=64, moe_intermediate_size=16, intermediate_size=16)
    model = hf_models.build("qwen3_moe", "grouped_mm", num_experts=2, num_experts_per_tok=1, norm_topk_prob=False,
                            **sizes).eval()  # fmt: skip
    reference = copy.deepcopy(model)
    report = moe_fx.apply(model, **hf_models.example_inputs(model, T=T, seed=0))
    assert len(report.matches) == 1 and not report.rejections, str(report)
    with no_fallback(), torch.no_grad():
        for t in (T, 9):
            x = hf_models.example_inputs(model, T=t, seed=t)
            assert rel_err(hf_models.logits(model(**x)), hf_models.logits(reference(**x))) < 1e-5
