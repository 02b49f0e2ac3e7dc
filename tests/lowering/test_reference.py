"""The reference lowering against a float64 per-token oracle written independently of it.

Outputs are poisoned (deterministic mode fills torch.empty with NaN), so an unwritten row shows.
"""

import itertools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from moe_fx.ops import combine_args, dispatch_args, experts_args
from moe_fx.spec import ExpertsSpec, MoESpec
from tests.conftest import TOLERANCE, rel_err

OPS = torch.ops.moe_fx
E, D, FF = 4, 16, 24
ACT = {
    "silu_gated": lambda g, u: F.silu(g) * u,
    "gelu_gated": lambda g, u: F.gelu(g) * u,
    "gelu_tanh_gated": lambda g, u: F.gelu(g, approximate="tanh") * u,
    "clamped_swiglu": lambda g, u: (u.clamp(-7, 7) + 1) * g.clamp(max=7) * torch.sigmoid(g.clamp(max=7) * 1.702),
    "clamped_silu_gated": lambda g, u: F.silu(g.clamp(max=7)) * u.clamp(-7, 7),  # limit: ExpertsSpec's default
}
PLAIN = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu2": lambda h: F.relu(h) ** 2,
}
# the clamped activations without their clamps: an oracle that differs from them shows the inputs reach the limit
UNCLAMPED = {
    "clamped_swiglu": lambda g, u: (u + 1) * g * torch.sigmoid(g * 1.702),
    "clamped_silu_gated": ACT["silu_gated"],
}


pytestmark = pytest.mark.usefixtures("poison_outputs")


def oracle_mlp(x_D, e, act, w1, w3, w2, b1, b3, b2):
    """One token through expert e, float64, from separate gate/up/down weights."""
    g = x_D @ w1[e].T + (b1[e] if b1 is not None else 0)
    if act in PLAIN:
        h = PLAIN[act](g)
    else:
        u = x_D @ w3[e].T + (b3[e] if b3 is not None else 0)
        h = ACT[act](g, u)
    return h @ w2[e].T + (b2[e] if b2 is not None else 0)


def oracle(x, weights, ids, act, w1, w3, w2, b1=None, b3=None, b2=None, weight_on_input=False):
    args = [t.double() if t is not None else None for t in (w1, w3, w2, b1, b3, b2)]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, k in itertools.product(range(x.shape[0]), range(ids.shape[1])):
        w = weights[t, k].double()
        xt = x[t].double() * (w if weight_on_input else 1)
        out[t] += oracle_mlp(xt, int(ids[t, k]), act, *args) * (1 if weight_on_input else w)
    return out


def unclamped_oracle(*args, **kwargs):
    """`oracle` with its activation's clamps left out (`UNCLAMPED`)."""
    act = args[3]
    with mock.patch.dict(ACT, {act: UNCLAMPED[act]}):
        return oracle(*args, **kwargs)


def run(x, weights, ids, w13, w3, w2, b13, b2, act, gate_up="concat", t13=False, t2=False, weight_on_input=False):
    F_ = w2.shape[1] if t2 else w2.shape[2]
    experts = ExpertsSpec(E, x.shape[1], F_, act, gate_up, t13, t2, b13 is not None, b2 is not None)
    spec = MoESpec(experts, ids.shape[1], weight_placement="input" if weight_on_input else "output")
    dispatched = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, weights, "reference"))
    y = OPS.experts(*experts_args(spec, x, dispatched, w13, w3, w2, b13, b2, x.dtype, "reference"))
    return OPS.combine(*combine_args(spec, y, weights, dispatched, "reference"))


def make_routing(T, K, pattern):
    if pattern == "random":
        ids = torch.rand(T, E).argsort(dim=-1)[:, :K]
    elif pattern == "one_expert":  # every token's first choice is expert 2
        ids = (torch.arange(K).view(1, K) + 2).expand(T, K) % E
    else:  # "empty": experts 0 and 1 never get a token
        ids = (torch.arange(K).view(1, K) % (E - 2) + 2).expand(T, K)
    return torch.rand(T, K) + 0.1, ids.to(torch.int32).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [0, 1, 7])
@pytest.mark.parametrize("K", [1, 2, E])
@pytest.mark.parametrize("pattern", ["random", "one_expert", "empty"])
def test_silu_gated_against_oracle(dtype, T, K, pattern):
    if pattern == "empty" and K > E - 2:
        pytest.skip("needs K <= E - 2")
    x = torch.randn(T, D).to(dtype)
    w1, w3, w2 = (
        (torch.randn(E, FF, D) / 4).to(dtype),
        (torch.randn(E, FF, D) / 4).to(dtype),
        (torch.randn(E, D, FF) / 5).to(dtype),
    )
    weights, ids = make_routing(T, K, pattern)
    out = run(x, weights, ids, torch.cat([w1, w3], 1), None, w2, None, None, "silu_gated")
    assert out.shape == (T, D) and out.dtype == dtype
    if T:
        assert rel_err(out, oracle(x, weights, ids, "silu_gated", w1, w3, w2)) < TOLERANCE[dtype]


@pytest.mark.parametrize("act", [*ACT, *PLAIN])
@pytest.mark.parametrize("layout", ["concat", "interleaved", "up_first", "separate", "transposed"])
@pytest.mark.parametrize("bias", [False, True])
def test_activations_layouts_biases(act, layout, bias):
    T, K = 9, 2
    gated = act in ACT
    if not gated and layout != "concat":
        pytest.skip("layouts only differ for gated experts")
    x = torch.randn(T, D) * 2
    w1, w3, w2 = torch.randn(E, FF, D) / 3, torch.randn(E, FF, D) / 3, torch.randn(E, D, FF) / 4
    b1, b3, b2 = (torch.randn(E, FF), torch.randn(E, FF), torch.randn(E, D)) if bias else (None, None, None)
    weights, ids = make_routing(T, K, "random")
    ref = oracle(x, weights, ids, act, w1, w3, w2, b1, b3, b2)
    w3_arg, t13, t2, gate_up = None, False, False, layout
    if not gated:
        w13, b13 = w1, b1
    elif layout == "interleaved":
        w13 = torch.stack([w1, w3], dim=2).reshape(E, 2 * FF, D)
        b13 = torch.stack([b1, b3], dim=2).reshape(E, 2 * FF) if bias else None
    elif layout == "up_first":
        w13, b13 = torch.cat([w3, w1], 1), torch.cat([b3, b1], 1) if bias else None
    elif layout == "separate":
        w13, w3_arg, b13 = w1, w3, torch.cat([b1, b3], 1) if bias else None
    else:
        w13, b13, gate_up = torch.cat([w1, w3], 1), torch.cat([b1, b3], 1) if bias else None, "concat"
    w2_arg = w2
    if layout == "transposed":
        w13, w2_arg, t13, t2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(), True, True
    out = run(x, weights, ids, w13, w3_arg, w2_arg, b13, b2, act, gate_up, t13, t2)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]
    if act in UNCLAMPED:  # the inputs reach the limit (7): the clamps change the result
        assert rel_err(unclamped_oracle(x, weights, ids, act, w1, w3, w2, b1, b3, b2), ref) > 1e-3


def test_weight_on_input():
    T, K = 6, 2
    x = torch.randn(T, D)
    w1, w3, w2 = torch.randn(E, FF, D), torch.randn(E, FF, D), torch.randn(E, D, FF)
    weights, ids = make_routing(T, K, "random")
    out = run(x, weights, ids, torch.cat([w1, w3], 1), None, w2, None, None, "silu_gated", weight_on_input=True)
    ref = oracle(x, weights, ids, "silu_gated", w1, w3, w2, weight_on_input=True)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]
    assert rel_err(out, oracle(x, weights, ids, "silu_gated", w1, w3, w2)) > 1e-2  # the placement matters


def oracle_route(logits, k, bias=None, n_group=1, topk_group=1, scale=1.0, renorm=False, sigmoid=False, fill=0.0):
    out_w, out_ids = [], []
    for row in logits.double():
        scores = row.sigmoid() if sigmoid else row.softmax(-1)
        choice = scores + (bias.double() if bias is not None else 0)
        if n_group > 1:
            groups = choice.view(n_group, -1).topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros(n_group, dtype=torch.bool)
            keep[groups.topk(topk_group).indices] = True
            choice = torch.where(keep.repeat_interleave(len(row) // n_group), choice, torch.full_like(choice, fill))
        ids = choice.topk(k).indices
        w = scores[ids]
        w = w / w.sum() if renorm else w
        out_w.append(w * scale)
        out_ids.append(ids)
    return torch.stack(out_w), torch.stack(out_ids)


@pytest.mark.parametrize("T", [0, 1, 13])
@pytest.mark.parametrize("fill, shift", [(0.0, 0.0), (float("-inf"), 0.0), (float("-inf"), -2.0)])
def test_route_group_limited_against_oracle(T, fill, shift):
    """shift -2: every biased value is negative, so -inf over the dropped groups keeps the picks in the kept
    ones where 0.0 would not (a 0.0 fill then ties among the dropped experts: not an oracle case)."""
    logits, bias = torch.randn(T, 16), torch.randn(16) * 0.1 + shift
    args = (logits, bias, 3, "sigmoid", "score_then_topk", True, 4, 2, 2, 2.5, "reference")
    w, ids = OPS.route(*args, group_fill=fill)
    assert w.shape == ids.shape == (T, 3)
    if T:
        ref_w, ref_ids = oracle_route(logits, 3, bias, 4, 2, 2.5, renorm=True, sigmoid=True, fill=fill)
        assert torch.equal(ids.long().sort(-1).values, ref_ids.sort(-1).values)
        assert rel_err(w.sort(-1).values, ref_w.sort(-1).values) < 1e-6
    if T and shift:  # and the fill matters here
        zero_ids = OPS.route(*args)[1].long().sort(-1).values
        assert not torch.equal(zero_ids, ids.long().sort(-1).values)


def test_route_topk_then_softmax():
    logits = torch.randn(11, 8)
    w, ids = OPS.route(logits, None, 2, "softmax", "topk_then_score", False, 1, 1, 2, 1.0, "reference")
    v, ref_ids = logits.topk(2, dim=-1)
    assert torch.equal(ids.long(), ref_ids) and rel_err(w, v.softmax(-1)) < 1e-6


def test_route_rounds_scores_like_a_low_precision_router():
    """A router that takes softmax in bf16 ranks bf16-rounded scores: rounding them reproduces its picks
    exactly, where float32 scores break its ties differently."""
    logits = torch.randn(1000, 8, dtype=torch.bfloat16) * 0.05
    eager_ids = logits.softmax(-1).topk(2).indices.sort(-1).values
    args = (logits, None, 2, "softmax", "score_then_topk", False, 1, 1, 2, 1.0, "reference")
    rounded = OPS.route(*args, torch.bfloat16)[1].long().sort(-1).values
    fp32 = OPS.route(*args)[1].long().sort(-1).values
    assert torch.equal(rounded, eager_ids) and not torch.equal(fp32, eager_ids)


# ---------------------------------------------------------------- token capacity (Switch, NLLB-MoE)
def oracle_capacity(ids_GSK, capacity):
    """keep [G, S, K]: a plain loop, first choices first, then token order, one queue per (group, expert)."""
    G, S, K = ids_GSK.shape
    keep = torch.zeros(G, S, K, dtype=torch.bool)
    for g in range(G):
        taken = {}
        for k, t in itertools.product(range(K), range(S)):
            e = int(ids_GSK[g, t, k])
            taken[e] = taken.get(e, 0) + 1
            keep[g, t, k] = taken[e] <= capacity
    return keep


def route_capacity(logits, k, capacity, scoring="softmax", renormalize=False):
    return OPS.route(logits, None, k, scoring, "score_then_topk", renormalize, 1, 1, 2, 1.0, "reference",
                     torch.float32, capacity)  # fmt: skip


@pytest.mark.parametrize(("shape", "k", "capacity"), [((1, 23, 4), 2, 5), ((3, 9, 4), 2, 3), ((2, 16, 4), 1, 3)])
def test_route_capacity_drops_in_token_order_first_choices_first(shape, k, capacity):
    logits = torch.randn(shape)
    w, ids = route_capacity(logits, k, capacity)
    w0, ids0 = route_capacity(logits, k, 0)
    keep = oracle_capacity(ids0.view(*shape[:2], k), capacity).view(-1, k)
    assert not keep.all() and keep.any()  # the case really drops
    assert torch.equal(ids, torch.where(keep, ids0, -1))
    assert torch.equal(w, torch.where(keep, w0, 0.0))
    for ids_N in ids.view(shape[0], -1):  # per group, no expert holds more than its capacity
        assert torch.bincount(ids_N[ids_N >= 0].long(), minlength=shape[2]).max() <= capacity


def test_route_capacity_with_every_token_on_one_expert():
    logits = torch.randn(10, 4)
    logits[:, 2] += 100.0
    w, ids = route_capacity(logits, 1, 3)
    assert ids.view(-1).tolist() == [2, 2, 2] + [-1] * 7
    assert (w[:3] > 0).all() and (w[3:] == 0).all()


@pytest.mark.parametrize("capacity", [13, 100])
def test_route_capacity_at_least_the_tokens_drops_nothing(capacity):
    logits = torch.randn(13, 4)
    logits[:, 1] += 100.0  # every token's first choice is expert 1: capacity 13 still holds them all
    assert all(torch.equal(a, b) for a, b in zip(route_capacity(logits, 2, capacity), route_capacity(logits, 2, 0)))


@pytest.mark.parametrize("weight_on_input", [False, True])
def test_dropped_picks_contribute_nothing(weight_on_input):
    """Dropped picks (id -1) are not run and add nothing, even through biases or a weight on the input."""
    T, K = 12, 2
    logits = torch.randn(T, E)
    logits[:, 0] += 4.0
    weights, ids = route_capacity(logits, K, 2)
    assert (ids == -1).any()
    x = torch.randn(T, D)
    w1, w3, w2 = torch.randn(E, FF, D) / 4, torch.randn(E, FF, D) / 4, torch.randn(E, D, FF) / 4
    b1, b3, b2 = torch.randn(E, FF), torch.randn(E, FF), torch.randn(E, D)
    out = run(x, weights, ids, torch.cat([w1, w3], 1), None, w2, torch.cat([b1, b3], 1), b2, "silu_gated",
              weight_on_input=weight_on_input)  # fmt: skip
    kept = ids >= 0
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):  # only kept picks, one token at a time
        one = oracle(x[t : t + 1], weights[t : t + 1, kept[t]], ids[t : t + 1, kept[t]], "silu_gated", w1, w3, w2,
                     b1, b3, b2, weight_on_input)  # fmt: skip
        ref[t] = one[0]
    dropped_everywhere = ~kept.any(1)
    assert dropped_everywhere.any()
    assert rel_err(out, ref) < TOLERANCE[torch.float32]
    assert (out[dropped_everywhere] == 0).all()
    assert (out[dropped_everywhere] == 0).all()
