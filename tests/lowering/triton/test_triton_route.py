"""Triton route kernel against a float64 per-token oracle: every scoring/order/group/bias/scale form."""

import pytest
import torch

from moe_fx.lowering import quant, reference
from moe_fx.lowering.triton.route import PROJECT_MAX_T, project, project_quantised, route
from tests.conftest import rel_err
from tests.lowering.test_reference import oracle_route
from tests.lowering.triton.conftest import DEVICE, DTYPES

CASES = {  # k, scoring, order, renormalize, n_group, topk_group, scale, bias
    "softmax_renorm": (2, "softmax", "score_then_topk", True, 1, 1, 1.0, False),
    "softmax_plain": (4, "softmax", "score_then_topk", False, 1, 1, 1.0, False),
    "k1": (1, "softmax", "score_then_topk", True, 1, 1, 1.0, False),
    "sigmoid_groups_bias_scale": (3, "sigmoid", "score_then_topk", True, 4, 2, 2.5, True),
    "sigmoid_bias": (2, "sigmoid", "score_then_topk", False, 1, 1, 1.0, True),
    "topk_then_softmax": (2, "softmax", "topk_then_score", False, 1, 1, 1.0, False),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [0, 1, 13])
@pytest.mark.parametrize("E", [16, 12])
def test_route_against_oracle(case, T, E):
    k, scoring, order, renorm, n_group, topk_group, scale, has_bias = CASES[case]
    logits = torch.randn(T, E, device=DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    bias = torch.randn(E, device=DEVICE) * 0.1 if has_bias else None
    w, ids = route(logits, bias, k, scoring, order, renorm, n_group, topk_group, 2, scale)
    assert w.shape == ids.shape == (T, k) and w.dtype == torch.float32 and ids.dtype == torch.int32
    if not T:
        return
    if order == "topk_then_score":
        v, ref_ids = logits.double().topk(k, dim=-1)
        ref_w = v.softmax(-1)
    else:
        ref_w, ref_ids = oracle_route(logits.cpu(), k, None if bias is None else bias.cpu(), n_group, topk_group,
                                      scale, renorm=renorm, sigmoid=scoring == "sigmoid")  # fmt: skip
    assert torch.equal(ids.long().cpu(), ref_ids.cpu())  # same set and same (descending) order
    assert rel_err(w.cpu(), ref_w.cpu()) < 1e-6


@pytest.mark.parametrize("T", [1, 13])
def test_route_group_fill_neg_inf(T):
    """DeepSeek's own gate writes -inf over the dropped groups: with a bias that makes every value negative the
    picks stay in the kept groups, in the oracle's order."""
    logits = torch.randn(T, 16, device=DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    bias = torch.randn(16, device=DEVICE) * 0.1 - 2.0
    w, ids = route(logits, bias, 3, "sigmoid", "score_then_topk", True, 4, 2, 2, 2.5, group_fill=float("-inf"))
    ref_w, ref_ids = oracle_route(logits.cpu(), 3, bias.cpu(), 4, 2, 2.5, renorm=True, sigmoid=True, fill=float("-inf"))
    assert torch.equal(ids.long().cpu(), ref_ids)
    assert rel_err(w.cpu(), ref_w) < 1e-6


def test_route_orders_ties_nans_and_signed_zeros():
    """The top-k keys: equal values go lowest index first (-0.0 equal to +0.0), a NaN ranks above every number
    as in torch.topk, and every token's ids are k distinct experts in range."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # all equal: 0, 1, 2
        [-0.0, 0.0, -0.0, -1.0, -inf, -inf],  # signed zeros equal: 0, 1, 2
        [1.0, 2.0, nan, 3.0, -inf, 0.0],  # NaN first, then 3, 1
        [-inf, -inf, -inf, -inf, -inf, -inf],  # nothing finite: still 0, 1, 2
        [nan, -nan, 1.0, 0.0, 2.0, nan],  # NaNs of both signs first, by index
    ], device=DEVICE)  # fmt: skip
    w, ids = route(logits, None, 3, "none", "score_then_topk", False, 1, 1, 2, 1.0)
    expected = [[0, 1, 2], [0, 1, 2], [2, 3, 1], [0, 1, 2], [0, 1, 5]]
    assert ids.long().cpu().tolist() == expected
    torch.testing.assert_close(w.cpu(), logits.cpu().gather(1, torch.tensor(expected)), equal_nan=True)


def test_group_choice_orders_nans_and_ties_like_torch():
    """Group-limited top-k (4 groups of 2, keep 2): a group whose best scores hold a NaN ranks first, and equal
    group scores go to the lower group, as torch.topk does in the reference."""
    nan = float("nan")
    logits = torch.tensor([
        [0.1, 0.2, 0.3, 0.0, 0.25, 0.26, 0.1, 0.4],  # group sums 0.3, 0.3, 0.51, 0.5: groups 2, 3
        [0.1, 0.2, nan, 0.0, 0.9, 0.8, 0.1, 0.4],  # group 1's NaN first, then group 2
        [0.375, 0.125, 0.25, 0.25, 0.5, 0.0, 0.125, 0.125],  # sums 0.5, 0.5, 0.5, 0.25: groups 0, 1
    ], device=DEVICE)  # fmt: skip
    w, ids = route(logits, None, 2, "none", "score_then_topk", False, 4, 2, 2, 1.0)
    expected = [[7, 5], [2, 4], [0, 2]]
    assert ids.long().cpu().tolist() == expected
    ref_w, ref_ids = reference.route(logits.cpu(), None, 2, "none", "score_then_topk", False, 4, 2, 2, 1.0,
                                     torch.float32)  # fmt: skip
    assert ref_ids[:2].tolist() == expected[:2]  # the last row ties at its second pick: torch's choice may differ
    torch.testing.assert_close(w.cpu(), logits.cpu().gather(1, torch.tensor(expected)), equal_nan=True)


def test_route_rejects_bad_sizes():
    logits = torch.randn(3, 6, device=DEVICE)
    with pytest.raises(ValueError, match="moe_fx: router k \\(7\\)"):
        route(logits, None, 7, "softmax", "score_then_topk", False, 1, 1, 2, 1.0)
    with pytest.raises(ValueError, match="divisible by n_group \\(4\\)"):
        route(logits, None, 2, "sigmoid", "score_then_topk", False, 4, 2, 2, 1.0)


@pytest.mark.parametrize("score_dtype", [torch.bfloat16, torch.float16])
def test_scores_rounded_like_a_low_precision_router(score_dtype):
    """Scores rounded to the router's dtype before top-k: the same values as the reference; where they tie at
    the k-th place either expert is a valid pick (torch's own choice differs between CPU and CUDA)."""
    logits = (torch.randn(64, 8) * 0.05).to(score_dtype).to(DEVICE)  # near-uniform scores: many ties
    w, ids = route(logits, None, 2, "softmax", "score_then_topk", False, 1, 1, 2, 1.0, score_dtype)
    scores = logits.float().softmax(-1).to(score_dtype).float().cpu()
    picked = scores.gather(1, ids.long().cpu())
    kth = scores.topk(2, dim=-1).values
    ulp = torch.finfo(score_dtype).eps * kth.max()  # the kernel's exp may round across a boundary of torch's
    torch.testing.assert_close(picked.sort(-1, descending=True).values, kth, rtol=0, atol=ulp)  # the k best
    torch.testing.assert_close(w.cpu(), picked, rtol=0, atol=ulp)
    assert (w.cpu() == w.cpu().to(score_dtype).float()).all()  # weights are the rounded scores


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32])
def test_biased_sum_rounded_like_the_original(bias_dtype):
    """bf16 sigmoid scores + a correction bias: a bf16 bias makes the original's sum bf16 (rounded, with its
    ties), a float32 one keeps it float32. The reference picks the k best of that sum exactly; Triton within
    one bf16 step (its sigmoid may round across a boundary of torch's, as in the test above)."""
    from moe_fx.lowering.reference import route as reference_route

    logits = (torch.randn(64, 8) * 0.05).to(torch.bfloat16).to(DEVICE)
    bias = (torch.randn(8) * 0.01).to(bias_dtype).to(DEVICE)
    select = (logits.float().sigmoid().to(torch.bfloat16) + bias).float().cpu()  # torch's own promotion
    kth = select.topk(2, dim=-1).values
    ulp = torch.finfo(torch.bfloat16).eps * kth.abs().max().item()
    for impl, atol in ((reference_route, 0.0), (route, ulp)):
        w, ids = impl(logits, bias, 2, "sigmoid", "score_then_topk", False, 1, 1, 2, 1.0, torch.bfloat16)
        picked = select.gather(1, ids.long().cpu()).sort(-1, descending=True).values
        torch.testing.assert_close(picked, kth, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)  # bf16 on the GPU: the kernel has no tl.dot, but the GPU runs it
@pytest.mark.parametrize("T", [0, 1, 3, PROJECT_MAX_T])
@pytest.mark.parametrize("E, D", [(16, 40), (12, 300), (130, 64), (8, 9000)])  # 9000: two steps over D at T = 1
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_project_against_float64(dtype, T, E, D, bias):
    """The decode GEMV of the router's projection (odd E and D, more experts than its programs aim at), with
    outputs poisoned by the conftest: fp32 sums rounded once to the tokens' dtype."""
    x_TD = torch.randn(T, D, device=DEVICE, dtype=dtype)
    w_ED = (torch.randn(E, D, device=DEVICE) / D**0.5).to(dtype)
    b_E = (torch.randn(E, device=DEVICE) * 0.1).to(dtype) if bias else None
    logits = project(x_TD, w_ED, b_E)
    assert logits.shape == (T, E) and logits.dtype == dtype
    if T:
        ref = torch.nn.functional.linear(x_TD.double(), w_ED.double(), None if b_E is None else b_E.double())
        assert rel_err(logits, ref) < {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


def test_project_beyond_its_tokens_is_torchs_linear():
    x_TD, w_ED = torch.randn(PROJECT_MAX_T + 1, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE)
    assert torch.equal(project(x_TD, w_ED, None), torch.nn.functional.linear(x_TD, w_ED))


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("T,D", [(1, 300), (PROJECT_MAX_T, 40), (PROJECT_MAX_T + 1, 40)])  # the last: torch's linear
def test_project_quantised_rows_are_quantize_rows(mode, T, D):
    """`project_quantised`: the GEMV's logits, and x's rows quantised per token by more programs of its launch (or,
    past its tokens, by `quantize_rows`), bit for bit the reference's quantisation; one token's Inf leaves the
    others' scales alone."""
    x_TD = torch.randn(T, D, device=DEVICE, dtype=torch.float16)
    x_TD[0, 3] = float("inf")
    w_ED = (torch.randn(12, D, device=DEVICE) / D**0.5).half()
    logits, xq, xscale = project_quantised(x_TD, w_ED, None, mode)
    assert torch.equal(logits, project(x_TD, w_ED, None))
    # the reference on x's own device: on an H100 the CUDA scales and the CPU reference's differed in low bits
    ref_q, ref_scale = quant.quantize_rows(x_TD, mode)
    assert torch.equal(xscale, ref_scale) and torch.isfinite(xscale[1:]).all()
    # the Inf row's values are not compared (its zeros' signs and NaN's encoding differ from torch's)
    assert torch.equal(xq[1:].view(torch.uint8), ref_q[1:].view(torch.uint8))
    with pytest.raises(ValueError, match="moe_fx: route's projection quantises x per token, .* got 'fp8_block'"):
        project_quantised(x_TD, w_ED, None, "fp8_block")


def test_project_rejects_a_weight_of_another_width():
    with pytest.raises(ValueError, match=r"moe_fx: route's projection expects weight \[E, 32\]"):
        project(torch.randn(2, 32, device=DEVICE), torch.randn(8, 33, device=DEVICE), None)
