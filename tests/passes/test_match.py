"""Every naive form, in two or more coding styles, rewritten under torch.compile and apply; near-misses refused."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moe_fx
from moe_fx import examples as ex
from moe_fx.backend import last_reports
from tests.conftest import TOLERANCE, no_fallback, rel_err

FORMS = {
    "loop_modulelist_where_index_add": (ex.LoopMoE, "expert_loop"),
    "loop_3d_nonzero_setitem": (ex.IndexedLoopMoE, "expert_loop"),
    "loop_group_router_shared_expert": (ex.DeepSeekStyleMoE, "expert_loop"),
    "gather_einsum": (ex.GatherEinsumMoE, "gather_einsum"),
    "gather_matmul_fused_w13_gelu": (ex.GatherMatmulMoE, "gather_matmul"),
    "dense_scatter_gates": (ex.DenseMoE, "dense"),
    "dense_gates_like_logits": (ex.DenseLikeLogitsMoE, "dense"),
    "dense_top1_masked_sum": (ex.MaskedSumMoE, "dense"),
    "torchtitan_split_loop_scatter_add_shared": (ex.TorchtitanStyleMoE, "expert_loop"),
}
TOL = {torch.float32: TOLERANCE[torch.float32], torch.bfloat16: TOLERANCE[torch.bfloat16]}


def tokens(cls, T, dtype, D=32):
    if cls in (ex.IndexedLoopMoE, ex.TorchtitanStyleMoE):  # take [B, S, D]
        return torch.randn(1, T, D, dtype=dtype)
    return torch.randn(T, D, dtype=dtype)


def compiled(model, x):
    counters.clear()
    with torch.no_grad():
        return torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [0, 1, 7])
@pytest.mark.parametrize("form", FORMS)
def test_compile_rewrites_every_form(form, T, dtype):
    cls, label = FORMS[form]
    if T == 0 and cls is ex.TorchtitanStyleMoE:
        pytest.skip("Dynamo (torch 2.13) fails tracing `x[: sum(sizes)]` of a 0-row tensor with unbacked sizes")
    model = cls().eval().to(dtype)
    x = tokens(cls, T, dtype)
    with torch.no_grad():
        ref = model(x)
    out = compiled(model, x)
    report = last_reports()[-1]
    if T == 0:  # nothing to verify a rewrite on: the block is left as it is, with the reason
        assert counters["moe_fx"]["rewritten"] == 0 and "empty" in report.rejections[0].reason
        assert out.shape == ref.shape
        return
    assert counters["moe_fx"]["rewritten"] == 1, str(report)
    assert [m.form for m in report.matches] == [label]
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
def test_apply_rewrites_every_form_for_any_token_count(form, dtype):
    cls, label = FORMS[form]
    model = cls().eval().to(dtype)
    originals = {T: tokens(cls, T, dtype) for T in (0, 1, 7, 13)}
    with torch.no_grad():
        refs = {T: model(x) for T, x in originals.items()}
        report = moe_fx.apply(model, originals[7])
        assert [m.form for m in report.matches] == [label], str(report)
        for T, x in originals.items():
            with no_fallback():  # the graph serves every T
                out = model(x)
            assert out.shape == refs[T].shape
            if T:
                assert rel_err(out, refs[T]) < TOL[dtype], T


@pytest.mark.parametrize("fill", ["new_zeros", "full_like"])
def test_gates_made_like_the_logits(fill):
    """A fill like the logits reads only their shape: rebuilt from the top-k ids' sizes before matching
    (`router.fills_from_scatter_index`), so that no router value but the top-k reaches the experts."""
    model = ex.DenseLikeLogitsMoE(fill=fill).eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        ref = model(x)
        report = moe_fx.apply(model, x)
        out = model(x)
    assert [m.form for m in report.matches] == ["dense"], str(report)
    assert fill not in model.forward.gm.code and rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("k", [1, 4])
def test_k_one_and_k_equals_e(k):
    model = ex.LoopMoE(num_experts=4, k=k).eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
    out = compiled(model, x)
    assert counters["moe_fx"]["rewritten"] == 1 and last_reports()[-1].matches[0].spec.top_k == k
    assert rel_err(out, ref) < TOL[torch.float32]


def test_all_tokens_on_one_expert_and_empty_experts():
    model = ex.LoopMoE(num_experts=8, k=2).eval()
    with torch.no_grad():
        model.gate.weight[3] = 0
        model.gate.weight[3, 0] = 50.0  # x[:, 0] > 0 below: expert 3 is every token's first choice
    x = torch.randn(6, 32)
    x[:, 0] = x[:, 0].abs() + 1
    with torch.no_grad():
        ref = model(x)
        assert (model.gate(x).topk(2).indices[:, 0] == 3).all()
    out = compiled(model, x)
    assert counters["moe_fx"]["rewritten"] == 1
    assert rel_err(out, ref) < TOL[torch.float32]


def test_two_blocks_of_different_forms_in_one_graph():
    model = ex.TwoFormModel().eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = model(x)
    out = compiled(model, x)
    assert counters["moe_fx"]["rewritten"] == 2
    assert sorted(m.form for m in last_reports()[-1].matches) == ["expert_loop", "gather_einsum"]
    assert rel_err(out, ref) < TOL[torch.float32]


class PreNormExpertsMoE(ex.GatherEinsumMoE):
    """Gemma4's layout: the router reads the tokens, the experts a normalised copy; and AFMoE's: a shared
    expert reads the same flattened tokens as the routed ones."""

    def forward(self, x):
        x_TD = x.view(-1, x.shape[-1])
        weights_TK, ids_TK = ex.softmax_topk(self.gate(x_TD), self.k)
        xn_TD = F.rms_norm(x_TD, (x_TD.shape[-1],))
        w1_TKFD, w3_TKFD, w2_TKDF = self.w1[ids_TK], self.w3[ids_TK], self.w2[ids_TK]
        h_TKF = F.silu(torch.einsum("td,tkfd->tkf", xn_TD, w1_TKFD)) * torch.einsum("td,tkfd->tkf", xn_TD, w3_TKFD)
        y_TKD = torch.einsum("tkf,tkdf->tkd", h_TKF, w2_TKDF)
        return torch.einsum("tkd,tk->td", y_TKD, weights_TK).view(x.shape) + torch.tanh(x_TD).view(x.shape)


def test_experts_read_their_own_view_of_the_tokens():
    model = PreNormExpertsMoE().eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        ref = model(x)
    out = compiled(model, x)
    assert counters["moe_fx"]["rewritten"] == 1, str(last_reports()[-1])
    assert rel_err(out, ref) < TOL[torch.float32]


# shapes that made a [T, D] tensor look like another: E = 1 masked sum, its one expert's output (run on every
# token) taken for the experts' tokens; E = D dense, the scattered gates_TE [T, E] taken for the block's output
ALIASED_SHAPES = {
    "one_expert_masked_sum": dict(num_experts=1, k=1, form="masked_sum"),
    "one_expert_masked_sum_shared": dict(num_experts=1, k=1, form="masked_sum", shared=True),
    "experts_equal_dim_dense": dict(num_experts=8, k=2, dim=8, form="dense", shared=True),
}


@pytest.mark.parametrize("stacked", [False, True], ids=["modulelist", "stacked"])
@pytest.mark.parametrize("case", ALIASED_SHAPES)
def test_tensors_of_the_tokens_shape_are_not_taken_for_tokens_or_output(case, stacked):
    """Rewritten under torch.compile (the example's T) and apply (a symbolic T: gates_TE's zeros then read T
    from the tokens' size, which carries no token values)."""
    torch.manual_seed(0)
    model = ex.NaiveMoE(**ALIASED_SHAPES[case], stacked=stacked, bias=True).eval()
    D = model.gate.weight.shape[1]
    x, x13 = torch.randn(7, D), torch.randn(13, D)
    with torch.no_grad():
        ref, ref13 = model(x), model(x13)
        out = compiled(model, x)
        assert counters["moe_fx"]["rewritten"] == 1, str(last_reports()[-1])
        assert rel_err(out, ref) < TOL[torch.float32]
        report = moe_fx.apply(model, x)
        assert len(report.matches) == 1, str(report)
        assert report.matches[0].spec.experts.num_experts == model.gate.weight.shape[0]
        with no_fallback():
            assert rel_err(model(x), ref) < TOL[torch.float32]
            assert rel_err(model(x13), ref13) < TOL[torch.float32]


class OpaqueRouterMoE(ex.LoopMoE):
    """A router no recognised form reproduces (tanh scores, |v| normalised): it stays in the graph."""

    def forward(self, x):
        values_TK, ids_TK = (self.gate(x) * 0.5).tanh().topk(self.k, dim=-1)
        weights_TK = values_TK.abs() / (values_TK.abs().sum(dim=-1, keepdim=True) + 0.1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where(ids_TK == e)
            out.index_add_(0, token_idx, expert(x[token_idx]) * weights_TK[token_idx, slot_idx, None])
        return out


def moe_fx_ops(gm) -> list[str]:
    return [n.target._opname for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "moe_fx"]


def test_opaque_router_stays_and_experts_are_rewritten():
    model = OpaqueRouterMoE().eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
        report = moe_fx.apply(model, x)
        out = model(x)
    assert len(report.matches) == 1 and report.matches[0].spec.router is None, str(report)
    assert "opaque" in report.matches[0].spec.summary()
    assert moe_fx_ops(model.forward.gm) == ["quantize_dispatch", "experts", "combine"]
    assert "tanh" in model.forward.gm.code
    assert rel_err(out, ref) < TOL[torch.float32]


def test_recognised_router_becomes_four_nodes():
    model = ex.DeepSeekStyleMoE().eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
        report = moe_fx.apply(model, x)
        out = model(x)
    router = report.matches[0].spec.router
    assert (router.scoring, router.has_bias, router.n_group, router.topk_group, router.renormalize, router.scale) == (
        "sigmoid",
        True,
        4,
        2,
        True,
        2.5,
    )
    assert moe_fx_ops(model.forward.gm) == ["route", "quantize_dispatch", "experts", "combine"]
    assert "shared_expert" in model.forward.gm.code  # the shared expert stays an ordinary node
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("gate, fill", [("transformers", 0.0), ("deepseek", float("-inf"))])
def test_group_fill_read_off_the_graph(gate, fill):
    """The value over the dropped groups is read off the graph (the probes cannot tell 0.0 from -inf): with a bias
    that makes every kept value negative the two pick different experts, and the rewrite follows the original."""
    torch.manual_seed(0)
    model = ex.DeepSeekStyleMoE(num_experts=16, k=4, gate=gate).eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        report = moe_fx.apply(model, x)
        assert report.matches[0].spec.router.group_fill == fill, str(report)
        assert ("others -inf" in str(report)) == (fill != 0.0)
        model.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.1 - 2.0)
        x = torch.randn(33, 32)
        out, ref = model(x), model.forward.original(x)
    assert rel_err(out, ref) < TOL[torch.float32]


# ---------------------------------------------------------------- near-misses: never rewritten


class DenseMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Sampler(nn.Module):
    """Attention-free LM head with softmax + top-k for sampling: top-k, but no experts."""

    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(32, 50)

    def forward(self, h):
        probs = self.lm_head(h).softmax(dim=-1)
        values, idx = probs.topk(5, dim=-1)
        return h + values.sum(dim=-1, keepdim=True), idx


class WeightAsBiasMoE(ex.LoopMoE):
    """Routing weights also added as a bias: the combine cannot reproduce this."""

    def forward(self, x):
        weights_TK, ids_TK = ex.softmax_topk(self.gate(x), self.k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where(ids_TK == e)
            w = weights_TK[token_idx, slot_idx, None]
            out.index_add_(0, token_idx, expert(x[token_idx]) * w + w)
        return out


class RoutedScaleMoE(ex.LoopMoE):
    """Routing weights scale the tokens themselves: a combine, but no expert weights to bind."""

    def forward(self, x):
        weights_TK, ids_TK = ex.softmax_topk(self.gate(x), self.k)
        return x * (weights_TK * (ids_TK == 0)).sum(dim=-1, keepdim=True)


class UnequalExpertsMoE(ex.LoopMoE):
    def __init__(self):
        super().__init__()
        self.experts[1] = ex.SwiGLU(32, 40)


class GateClampedSiLU(ex.SwiGLU):
    """The gate clamped as clamped_silu_gated clamps it, the up projection not: no spec has that. Below 50,
    clamped_silu_gated agrees; only probes past the limit tell them apart."""

    def forward(self, x):
        return self.w2(F.silu(self.w1(x).clamp(max=50.0)) * self.w3(x))


class GateClampedBelowSiLU(ex.SwiGLU):
    """silu's gate clamped below, at -50: no spec has that clamp, and no probe shows it (silu(-50) is -1e-20, as
    silu of anything below), so silu_gated agrees everywhere: the clamp check refuses it."""

    def forward(self, x):
        return self.w2(F.silu(self.w1(x).clamp(min=-50.0)) * self.w3(x))


class ClampAfterSiLU(ex.SwiGLU):
    """Ling's experts when they clip: silu(gate).clamp(max=L) * clamp(up, -L, L), the gate's clamp after the
    activation. Past L it differs from clamped_silu_gated by L·σ(-L) (4.5e-4 at L = 10), which probes within the
    tolerance cannot see: the clamp check refuses a clamp that is not on a projection."""

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)).clamp(max=10.0) * self.w3(x).clamp(min=-10.0, max=10.0))


class NormalisedClampedSiLU(ex.SwiGLU):
    """The experts normalise their tokens, so scaling the tokens never takes the clamps' inputs to 50: what the
    block computes past the limit is unknown."""

    def forward(self, x):
        x = F.normalize(x, dim=-1)
        return self.w2(F.silu(self.w1(x).clamp(max=50.0)) * self.w3(x).clamp(min=-50.0, max=50.0))


@pytest.mark.parametrize(
    "model, expect",
    [
        (DenseMLP(), None),
        (Sampler(), "no MoE combine found"),
        (WeightAsBiasMoE(), "no experts spec reproduces the block"),
        (RoutedScaleMoE(), "(mul_1) reads no expert weights"),
        (UnequalExpertsMoE(), "not per-expert"),
        (ex.LoopMoE(expert=ex.TanhExpert), "no experts spec reproduces the block"),
        (ex.LoopMoE(expert=GateClampedSiLU), "no experts spec reproduces the block"),
        (ex.LoopMoE(expert=GateClampedBelowSiLU), "(clamp(min=-50.0)) and no experts spec has that clamp"),
        (ex.LoopMoE(expert=ClampAfterSiLU), "(clamp(max=10.0)) and no experts spec has that clamp"),
        (ex.LoopMoE(expert=NormalisedClampedSiLU), "no probe goes past the bounds"),
    ],
    ids=[
        "dense_mlp",
        "sampling_topk",
        "weight_used_as_bias",
        "no_expert_weights",
        "unequal_experts",
        "tanh_expert",
        "clamped_gate_only",
        "clamped_gate_below",
        "clamp_after_silu",
        "clamp_out_of_reach",
    ],
)
def test_near_misses_are_left_untouched(model, expect):
    model.eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        ref = model(x)
    out = compiled(model, x)
    report = last_reports()[-1]
    assert counters["moe_fx"]["rewritten"] == 0 and not report.matches
    if expect is None:
        assert not report.rejections
    else:
        assert any(expect in r.reason for r in report.rejections), str(report)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["clamped_silu_gated", "relu2"])
@pytest.mark.parametrize("form", ex.FORMS)
def test_every_form_with_clamped_silu_and_squared_relu(form, activation):
    """NaiveMoE's clamped_silu_gated clamps at examples.CLAMP_LIMIT (1), which its tokens pass."""
    stacked = form in ("gather_einsum", "masked_sum")  # 3-D parameters; ModuleList experts in the other forms
    model = ex.NaiveMoE(activation=activation, form=form, stacked=stacked, bias=True).eval()
    x = torch.randn(9, 32) * 2
    with torch.no_grad():
        ref = model(x)
    out = compiled(model, x)
    report = last_reports()[-1]
    assert counters["moe_fx"]["rewritten"] == 1, str(report)
    experts = report.matches[0].spec.experts
    assert experts.activation == activation and (activation == "relu2" or experts.limit == ex.CLAMP_LIMIT)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("activation", ["silu_gated", "gelu"])
@pytest.mark.parametrize("form", ex.FORMS)
def test_stacked_parameters_with_biases_in_every_form(form, activation):
    """3-D w1, w3, w2 with [E, F] / [E, D] biases b1, b3, b2, paired by name (w1 <-> b1). Gated, the separate
    stacked biases are concatenated by the graph per call, so an in-place update of b3 reaches it."""
    torch.manual_seed(0)
    model = ex.NaiveMoE(activation=activation, form=form, stacked=True, bias=True).eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, x)
        report = last_reports()[-1]
        assert counters["moe_fx"]["rewritten"] == 1, str(report)
        experts = report.matches[0].spec.experts
        gated = activation.endswith("_gated")
        layout = "separate" if gated else "concat"
        assert (experts.gate_up, experts.has_w13_bias, experts.has_w2_bias) == (layout, True, True)
        assert rel_err(out, ref) < TOL[torch.float32]
        moe_fx.apply(model, x)
        (model.b3 if gated else model.b1).add_(0.5)
        with no_fallback():
            out = model(x)
    ref_model = ex.NaiveMoE(activation=activation, form=form, stacked=True, bias=True).eval()
    ref_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(out, ref_model(x)) < TOL[torch.float32]
