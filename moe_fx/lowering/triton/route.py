"""Triton `route`: scoring, (group-limited) top-k, renormalisation and scaling in one kernel.

Legend: T tokens, E experts, K top-k, G expert groups.

One program per token holds its E logits in registers. Top-k is K rounds of "take the maximum,
lowest index first", so on tie-free data the expert set equals `torch.topk`'s, in the same
(descending) order. All math is fp32; ids are int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_fx.lowering.triton.launch import launch
from moe_fx.lowering.triton.sizes import next_power_of_2

SCORING_CODES = {"none": 0, "softmax": 1, "sigmoid": 2}


ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round(x, ROUND: tl.constexpr):
    """fp32 scores rounded to the original router's score dtype (ROUND: 0 none, 1 bf16, 2 fp16)."""
    if ROUND == 1:
        return x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _score(x, valid, SCORING: tl.constexpr, ROUND: tl.constexpr):
    if SCORING == 1:
        z = tl.where(valid, tl.exp(x - tl.max(tl.where(valid, x, -float("inf")), axis=0)), 0.0)
        return _round(z / tl.sum(z, axis=0), ROUND)
    elif SCORING == 2:
        return _round(tl.sigmoid(x), ROUND)
    else:
        return _round(x, ROUND)


@triton.jit
def _group_keep(select_E, e, valid, EG, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                GROUP_TOPK: tl.constexpr, BLOCK_G: tl.constexpr):  # fmt: skip
    """Experts in the TOPK_GROUP groups with the largest sum of their GROUP_TOPK best scores."""
    group_E = e // EG
    g = tl.arange(0, BLOCK_G)
    group_score_G = tl.full((BLOCK_G,), -float("inf"), tl.float32)
    for gi in tl.static_range(N_GROUP):
        v = tl.where(valid & (group_E == gi), select_E, -float("inf"))
        s = 0.0
        for _ in tl.static_range(GROUP_TOPK):
            m = tl.max(v, axis=0)
            s += m
            v = tl.where(e == tl.min(tl.where(v == m, e, 1 << 30), axis=0), -float("inf"), v)
        group_score_G = tl.where(g == gi, s, group_score_G)
    keep_E = e < 0
    for _ in tl.static_range(TOPK_GROUP):
        m = tl.max(group_score_G, axis=0)
        best = tl.min(tl.where(group_score_G == m, g, 1 << 30), axis=0)
        keep_E = keep_E | (group_E == best)
        group_score_G = tl.where(g == best, -float("inf"), group_score_G)
    return keep_E


@triton.jit
def _route_kernel(
    # pointers
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    # sizes
    E, EG, scale,
    # strides
    stride_lt, stride_le,
    # meta-parameters
    K: tl.constexpr, SCORING: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOPK: tl.constexpr,
    ROUND: tl.constexpr, ROUND_SUM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    valid = e < E
    x_E = tl.load(logits_ptr + t * stride_lt + e * stride_le, mask=valid, other=0.0).to(tl.float32)
    if TOPK_FIRST:
        source_E = x_E
        select_E = x_E
    else:
        source_E = _score(x_E, valid, SCORING, ROUND)
        select_E = source_E
        if HAS_BIAS:  # the sum rounded as the original's was (bf16 scores + a bf16 bias: bf16)
            select_E = _round(select_E + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32), ROUND_SUM)
        if N_GROUP > 1:
            keep_E = _group_keep(select_E, e, valid, EG, N_GROUP, TOPK_GROUP, GROUP_TOPK, BLOCK_G)
            select_E = tl.where(keep_E, select_E, 0.0)
    select_E = tl.where(valid, select_E, -float("inf"))

    k = tl.arange(0, BLOCK_K)
    ids_K = tl.zeros((BLOCK_K,), tl.int32)
    w_K = tl.zeros((BLOCK_K,), tl.float32)
    for i in tl.static_range(K):
        m = tl.max(select_E, axis=0)
        best = tl.min(tl.where(select_E == m, e, BLOCK_E), axis=0)
        ids_K = tl.where(k == i, best, ids_K)
        w_K = tl.where(k == i, tl.sum(tl.where(e == best, source_E, 0.0), axis=0), w_K)
        select_E = tl.where(e == best, -float("inf"), select_E)
    if TOPK_FIRST:
        w_K = _score(w_K, k < K, SCORING, ROUND)
    w_K = tl.where(k < K, w_K, 0.0)
    if RENORMALIZE:
        w_K = w_K / (tl.sum(w_K, axis=0) + 1e-20)
    w_K = w_K * scale
    tl.store(weights_ptr + t * K + k, w_K, mask=k < K)
    tl.store(ids_ptr + t * K + k, ids_K, mask=k < K)


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    scoring: str,
    order: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    group_score_topk: int,
    scale: float,
    score_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits_TE [, bias_E] -> (weights_TK fp32, ids_TK int32), the `moe_fx::route` contract."""
    T, E = logits.shape
    if k > E:
        raise ValueError(f"moe_fx: router k ({k}) must be <= the number of experts ({E})")
    if n_group > 1 and E % n_group:
        raise ValueError(f"moe_fx: experts ({E}) must be divisible by n_group ({n_group})")
    weights_TK = torch.empty((T, k), dtype=torch.float32, device=logits.device)
    ids_TK = torch.empty((T, k), dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights_TK, ids_TK
    BLOCK_E = next_power_of_2(E)
    launch(
        _route_kernel, (T,),
        logits, bias if bias is not None else logits, weights_TK, ids_TK,
        E, E // max(n_group, 1), float(scale),
        logits.stride(0), logits.stride(1),
        K=k, SCORING=SCORING_CODES[scoring], TOPK_FIRST=order == "topk_then_score", RENORMALIZE=renormalize,
        HAS_BIAS=bias is not None, ROUND=ROUND_CODES[score_dtype],
        ROUND_SUM=ROUND_CODES.get(torch.promote_types(score_dtype, bias.dtype), 0) if bias is not None else 0,
        N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_TOPK=group_score_topk,
        BLOCK_E=BLOCK_E, BLOCK_K=next_power_of_2(k), BLOCK_G=next_power_of_2(max(n_group, 1)),
        num_warps=1 if BLOCK_E <= 128 else 2,
    )  # fmt: skip
    return weights_TK, ids_TK
