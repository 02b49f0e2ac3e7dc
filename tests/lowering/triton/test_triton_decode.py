"""Triton's decode step in two kernels (`decode.routed_experts`): the GEMV, then the fused experts kernel that
routes each pick itself, against the four-op chain's own kernels and the float64 oracle."""

import pytest
import torch

from moe_fx.lowering import quant
from moe_fx.lowering.triton import decode, grouped_gemm, quantize, route, tuning
from moe_fx.lowering.triton.dispatch import dispatch
from tests.conftest import TOLERANCE, fuse_every_config, rel_err
from tests.lowering.test_reference import oracle
from tests.lowering.triton.conftest import DEVICE, DTYPES
from tests.lowering.triton.test_triton_experts_quant import AGREE, FUSED_AGREE, HALF, fused_config, per_slice_oracle
from tests.lowering.triton.test_triton_route import CASES

E, D, FF = 12, 24, 40  # FF: three ragged F-slices of the interpreter's 16-wide tiles


@pytest.fixture
def fused(monkeypatch):
    """Every chosen config fused: the decode kernel's precondition."""
    fuse_every_config(monkeypatch)


def experts_kw(dtype, w2_bias=None, weight_at="none", activation="silu_gated"):
    torch.manual_seed(1)
    H = 2 * FF if activation == "silu_gated" else FF
    w13 = (torch.randn(E, H, D) / 4).to(dtype).to(DEVICE)
    w2 = (torch.randn(E, D, FF) / 5).to(dtype).to(DEVICE)
    return dict(w13=w13, w3=None, w2=w2, w13_bias=None, w2_bias=w2_bias, weight_at=weight_at, activation=activation,
                gate_up="concat", w13_transposed=False, w2_transposed=False, alpha=1.702, limit=7.0,
                out_dtype=dtype)  # fmt: skip


def routing_of(case: str, bias=None) -> grouped_gemm.Routing:
    k, scoring, order, renorm, n_group, topk_group, scale, _ = CASES[case]
    return grouped_gemm.Routing(None, bias, k, scoring, order, renorm, n_group, topk_group, 2, scale, torch.float32,
                                0.0)  # fmt: skip


def chain(x, tokens, w_router, routing, kw):
    """What the op runs without the decode kernel: GEMV, route, the sort, experts(reduce=True)."""
    r = routing
    logits = route.project(tokens, w_router, None)
    w, ids = route.route(logits, r.bias, r.k, r.scoring, r.order, r.renormalize, r.n_group, r.topk_group,
                         r.group_score_topk, r.scale)  # fmt: skip
    _, _, offsets, gather, row_weights, _, _ = dispatch(x, ids, w, E)
    return grouped_gemm.experts(x, offsets, gather, row_weights, **kw, reduce=True), w, ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, decode.MAX_TOKENS])
@pytest.mark.parametrize("case", ["softmax_renorm", "sigmoid_groups_bias_scale", "topk_then_softmax", "k1"])
def test_routed_decode_equals_the_chain_and_the_oracle(dtype, T, case, fused):
    """One routing launch (the GEMV zeroing the sums, then the kernel that routes each pick itself) gives the
    chain's picks and sums (to fp32 atomics' order) and the float64 oracle's output, outputs poisoned."""
    x = torch.randn(T, D).to(dtype).to(DEVICE)
    w_router = (torch.randn(E, D) / 2).to(dtype).to(DEVICE)
    bias = torch.randn(E, device=DEVICE) * 0.1 if CASES[case][-1] else None
    routing, kw = routing_of(case, bias), experts_kw(dtype, w2_bias=torch.randn(E, D).to(dtype).to(DEVICE))
    before = grouped_gemm.loads.copy()
    out = decode.routed_experts(x, x, w_router, None, routing, kw)
    assert [k.split("/")[0] for k in (grouped_gemm.loads - before).elements()] == ["routed"]  # no sort, one GEMM
    assert out.shape == (T, D) and out.dtype == dtype and torch.isfinite(out).all()
    ref, w, ids = chain(x, x, w_router, routing, kw)
    assert rel_err(out.cpu(), ref.cpu()) < TOLERANCE[dtype]
    w13, w2 = kw["w13"].cpu(), kw["w2"].cpu()
    expected = oracle(x.cpu(), w.cpu(), ids.cpu(), "silu_gated", w13[:, :FF], w13[:, FF:], w2, b2=kw["w2_bias"].cpu())
    assert rel_err(out.cpu(), expected) < TOLERANCE[dtype]


def test_routed_decode_on_every_load_path(gemm_path, monkeypatch):
    """The routing kernel through pointers, TMA descriptors, swapped operands and persistent programs (the
    `gemm_path` fixture's configs, made fused here), against the chain."""
    fuse_every_config(monkeypatch)  # over the gemm_path fixture's choice
    T, dtype = 3, torch.float16
    x, w_router = torch.randn(T, D).to(dtype).to(DEVICE), (torch.randn(E, D) / 2).to(dtype).to(DEVICE)
    routing, kw = routing_of("softmax_renorm"), experts_kw(dtype)
    out = decode.routed_experts(x, x, w_router, None, routing, kw)
    ref, _, _ = chain(x, x, w_router, routing, kw)
    assert rel_err(out.cpu(), ref.cpu()) < TOLERANCE[dtype]


@pytest.mark.parametrize("weight_at", ["input", "output"])
def test_routed_decode_weighs_where_the_spec_says(weight_at, fused):
    """The routing weight the kernel finds for its pick scales the expert's input (Llama4) or output."""
    T = 2
    x, w_router = torch.randn(T, D).to(DEVICE), (torch.randn(E, D) / 2).to(DEVICE)
    routing, kw = routing_of("softmax_renorm"), experts_kw(torch.float32, weight_at=weight_at)
    out = decode.routed_experts(x, x, w_router, None, routing, kw)
    ref, w, ids = chain(x, x, w_router, routing, kw)
    assert rel_err(out.cpu(), ref.cpu()) < TOLERANCE[torch.float32]


def test_routed_decode_reads_given_logits(fused):
    """A router that is not a plain linear: the kernel routes logits given to it (the sums zeroed by a fill)."""
    T = 3
    x = torch.randn(T, D).to(DEVICE)
    logits = torch.randn(T, E).to(DEVICE)
    routing, kw = routing_of("softmax_renorm")._replace(logits=logits), experts_kw(torch.float32)
    out = decode.routed_experts(x, None, None, None, routing, kw)
    w, ids = route.route(logits, None, 2, "softmax", "score_then_topk", True, 1, 1, 1, 1.0)
    _, _, offsets, gather, row_weights, _, _ = dispatch(x, ids, w, E)
    ref = grouped_gemm.experts(x, offsets, gather, row_weights, **kw, reduce=True)
    assert rel_err(out.cpu(), ref.cpu()) < TOLERANCE[torch.float32]


def test_routed_decode_declines_where_the_chain_runs(fused, monkeypatch):
    """None (the op then runs route, dispatch and experts): more tokens than the GEMV's, a config that is not
    fused."""
    x, w_router = torch.randn(decode.MAX_TOKENS + 1, D).to(DEVICE), torch.randn(E, D).to(DEVICE)
    routing, kw = routing_of("softmax_renorm"), experts_kw(torch.float32)
    assert decode.routed_experts(x, x, w_router, None, routing, kw) is None
    assert decode.routed_experts(x[:1], x[:1], w_router, None, routing, kw) is not None
    monkeypatch.setattr(tuning, "_choose", lambda *args: tuning.default_config(1, torch.float32))
    assert decode.routed_experts(x[:1], x[:1], w_router, None, routing, kw) is None


def test_the_gemv_zeroes_what_it_is_given():
    """`project(zero=...)`: the GEMV's programs write zeros over the buffer (poisoned first), beside the logits."""
    x, w = torch.randn(2, D).to(DEVICE), torch.randn(E, D).to(DEVICE)
    zero = torch.full((1000,), -7, dtype=torch.int32, device=DEVICE)
    logits = route.project(x, w, None, zero=zero)
    assert torch.equal(zero, torch.zeros_like(zero))
    assert rel_err(logits.cpu(), (x.double() @ w.double().T).cpu()) < 1e-6


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("T", [1, decode.MAX_TOKENS])
def test_routed_decode_quantised_per_token(mode, T, monkeypatch):
    """fp8 / int8: the GEMV's launch quantises x per token as well (no launch of its own), and the kernel that
    routes each pick gives the fused config's arithmetic over route's picks (`per_slice_oracle`). Tokens for the
    router that are not the experts' (another tensor) are quantised by a launch of their own, as given logits are."""
    fused_config(monkeypatch)
    x, w_router = torch.randn(T, D).to(HALF).to(DEVICE), (torch.randn(E, D) / 2).to(HALF).to(DEVICE)
    routing, kw = routing_of("softmax_renorm"), experts_kw(HALF)
    (w13q, s13), (w2q, s2) = quant.quantize_weight(kw["w13"], mode), quant.quantize_weight(kw["w2"], mode)
    kw |= dict(w13=w13q, w2=w2q, w13_scale=s13, w2_scale=s2, quant=mode)
    rows = quantize.quantize_rows
    monkeypatch.setattr(quantize, "quantize_rows", lambda *a: pytest.fail("x quantised outside the GEMV"))
    before = grouped_gemm.loads.copy()
    out = decode.routed_experts(x, x.view(T, D), w_router, None, routing, kw)
    assert [k.split("/")[0] for k in (grouped_gemm.loads - before).elements()] == ["routed"]
    assert out.shape == (T, D) and out.dtype == HALF and torch.isfinite(out).all()
    w, ids = route.route(route.project(x, w_router, None), None, 2, "softmax", "score_then_topk", True, 1, 1, 1, 1.0)
    assert rel_err(out.cpu(), per_slice_oracle(x, w, ids, w13q, s13, w2q, s2, mode)) < FUSED_AGREE[HALF]
    monkeypatch.setattr(quantize, "quantize_rows", rows)
    assert rel_err(decode.routed_experts(x, x.clone(), w_router, None, routing, kw).cpu(), out.cpu()) < AGREE[HALF]
    logits = route.project(x, w_router, None)
    given = decode.routed_experts(x, None, None, None, routing._replace(logits=logits), kw)
    assert rel_err(given.cpu(), out.cpu()) < AGREE[HALF]
