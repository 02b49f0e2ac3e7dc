"""Triton `route`: scoring, (group-limited) top-k, renormalisation and scaling in one kernel.

Legend: T tokens, D model dim, E experts, K top-k, G expert groups.

One program per token holds its E logits in registers (`_route_tokens`, which takes a [T, E]
tile). Top-k is K rounds of "take the maximum, lowest index first", each one reduction over int64
keys that hold the value and the index (`_order_key`), so on tie-free data the expert set equals
`torch.topk`'s, in the same (descending) order. All math is fp32; ids are int32.

The router's projection, when `route` is given it (`project_route`): up to PROJECT_MAX_T tokens, a GEMV
whose ~64 programs each read a few experts' rows of the [E, D] weight (cuBLAS ran Qwen3's [1, 2048] x
[2048, 128] as two 64x8 tiles in 4.9 us, GPT-OSS's with split-K plus a reduce in 4.4 + 1.5 us on an H100:
bench/NOTES.md), in the same launch as the routing: the GEMV's last program to finish routes every token,
all of them in one [T, E] tile. Above, torch's linear and then the route kernel. The GEMV's fp32 sums are
rounded to the tokens' dtype, as the original linear's output was.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_fx.lowering.triton import workspace
from moe_fx.lowering.triton.launch import launch
from moe_fx.lowering.triton.sizes import cdiv, next_power_of_2

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
def _score(x_TE, valid_TE, SCORING: tl.constexpr, ROUND: tl.constexpr):
    if SCORING == 1:
        z = tl.where(valid_TE, tl.exp(x_TE - tl.max(tl.where(valid_TE, x_TE, -float("inf")), axis=1)[:, None]), 0.0)
        total = tl.sum(z, axis=1)
        return _round(z / tl.where(total == 0.0, 1.0, total)[:, None], ROUND)  # 0: a padding row of the tile
    elif SCORING == 2:
        return _round(tl.sigmoid(x_TE), ROUND)
    else:
        return _round(x_TE, ROUND)


@triton.jit
def _group_keep(select_TE, e, valid_TE, EG, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                GROUP_TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):  # fmt: skip
    """Experts in the TOPK_GROUP groups with the largest sum of their GROUP_TOPK best scores, per token."""
    group_E = e // EG
    g = tl.arange(0, BLOCK_G)
    group_score_TG = tl.full((BLOCK_T, BLOCK_G), -float("inf"), tl.float32)
    for gi in tl.static_range(N_GROUP):
        v = tl.where(valid_TE & (group_E == gi)[None, :], select_TE, -float("inf"))
        s = tl.zeros((BLOCK_T,), tl.float32)
        for _ in tl.static_range(GROUP_TOPK):
            m = tl.max(v, axis=1)
            s += m
            first = tl.min(tl.where(v == m[:, None], e[None, :], 1 << 30), axis=1)
            v = tl.where(e[None, :] == first[:, None], -float("inf"), v)
        group_score_TG = tl.where(g[None, :] == gi, s[:, None], group_score_TG)
    keep_TE = tl.zeros(select_TE.shape, tl.int32)
    for _ in tl.static_range(TOPK_GROUP):
        m = tl.max(group_score_TG, axis=1)
        best = tl.min(tl.where(group_score_TG == m[:, None], g[None, :], 1 << 30), axis=1)
        keep_TE = tl.where(group_E[None, :] == best[:, None], 1, keep_TE)
        group_score_TG = tl.where(g[None, :] == best[:, None], -float("inf"), group_score_TG)
    return keep_TE > 0


@triton.jit
def _order_key(v, e, BLOCK_E: tl.constexpr):
    """int64 keys whose order is v's, ties broken towards the lower index: v's fp32 bits made to order as
    signed integers (-0 as +0, NaN above +inf as in torch.topk) in the high half, BLOCK_E - 1 - e in the low."""
    bits = (v + 0.0).to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    bits = tl.where(v != v, 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (BLOCK_E - 1 - e).to(tl.int64)


@triton.jit
def _route_tokens(
    t0, T, logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, EG, scale, group_fill, stride_lt, stride_le,
    K: tl.constexpr, SCORING: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOPK: tl.constexpr,
    ROUND: tl.constexpr, ROUND_SUM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, FROM_L2: tl.constexpr,
):  # fmt: skip
    """Tokens [t0, t0 + BLOCK_T): their E logits in registers, one token a row; FROM_L2: the logits were just
    written by other programs of this launch, read past L1."""
    t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    valid = (t < T)[:, None] & (e < E)[None, :]
    x_ptrs = logits_ptr + t[:, None] * stride_lt + e[None, :] * stride_le
    if FROM_L2:
        x = tl.load(x_ptrs, mask=valid, other=0.0, cache_modifier=".cg").to(tl.float32)
    else:
        x = tl.load(x_ptrs, mask=valid, other=0.0).to(tl.float32)
    if TOPK_FIRST:
        source = x
        select = x
    else:
        source = _score(x, valid, SCORING, ROUND)
        select = source
        if HAS_BIAS:  # the sum rounded as the original's was (bf16 scores + a bf16 bias: bf16)
            bias_E = tl.load(bias_ptr + e, mask=e < E, other=0.0).to(tl.float32)
            select = _round(select + bias_E[None, :], ROUND_SUM)
        if N_GROUP > 1:
            keep = _group_keep(select, e, valid, EG, N_GROUP, TOPK_GROUP, GROUP_TOPK, BLOCK_T, BLOCK_G)
            select = tl.where(keep, select, group_fill)
    select = tl.where(valid, select, -float("inf"))

    # top-k: K rounds of one max over keys that order the values and, among equal values, the lower index first
    k = tl.arange(0, BLOCK_K)
    ids_TK = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    key = _order_key(select, e[None, :], BLOCK_E)
    for i in tl.static_range(K):
        best = tl.max(key, axis=1)
        ids_TK = tl.where(k[None, :] == i, BLOCK_E - 1 - best.to(tl.int32)[:, None], ids_TK)
        key = tl.where(key == best[:, None], -(2**63), key)
    picked = e[None, None, :] == ids_TK[:, :, None]
    w_TK = tl.sum(tl.where(picked, source[:, None, :], 0.0), axis=2)
    k_ok = (t < T)[:, None] & (k < K)[None, :]
    if TOPK_FIRST:
        w_TK = _score(w_TK, k_ok, SCORING, ROUND)
    w_TK = tl.where(k_ok, w_TK, 0.0)
    if RENORMALIZE:
        w_TK = w_TK / (tl.sum(w_TK, axis=1)[:, None] + 1e-20)
    w_TK = w_TK * scale
    out = t[:, None] * K + k[None, :]
    tl.store(weights_ptr + out, w_TK, mask=k_ok)
    tl.store(ids_ptr + out, ids_TK, mask=k_ok)


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, E, EG, scale, group_fill, stride_lt, stride_le,
    K: tl.constexpr, SCORING: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOPK: tl.constexpr,
    ROUND: tl.constexpr, ROUND_SUM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):  # fmt: skip
    """One program per token."""
    _route_tokens(tl.program_id(0), T, logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, EG, scale, group_fill,
                  stride_lt, stride_le, K, SCORING, TOPK_FIRST, RENORMALIZE, HAS_BIAS, N_GROUP, TOPK_GROUP,
                  GROUP_TOPK, ROUND, ROUND_SUM, 1, BLOCK_E, BLOCK_K, BLOCK_G, False)  # fmt: skip


@triton.jit
def _project_route_kernel(
    x_ptr, w_ptr, b_ptr, logits_ptr, done_ptr, bias_ptr, weights_ptr, ids_ptr, T, E, D, EG, scale, group_fill,
    stride_xt, stride_we, stride_lt,
    HAS_B: tl.constexpr, BLOCK_TP: tl.constexpr, BLOCK_EP: tl.constexpr, BLOCK_D: tl.constexpr,
    K: tl.constexpr, SCORING: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOPK: tl.constexpr,
    ROUND: tl.constexpr, ROUND_SUM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """Each program: logits[t, e] = x[t, :] . w[e, :] (+ b[e]) for its block of experts and tokens, fp32 sums
    rounded to the logits' dtype. The program to finish last (a counter at done_ptr, from zero, left zero:
    `workspace.zeroed`) then routes every token. The barrier orders every thread's stores before the counter's
    release."""
    e = tl.program_id(0) * BLOCK_EP + tl.arange(0, BLOCK_EP)
    t = tl.program_id(1) * BLOCK_TP + tl.arange(0, BLOCK_TP)
    acc_TE = tl.zeros((BLOCK_TP, BLOCK_EP), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x_TD = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_xt + d[None, :],
                       mask=(t[:, None] < T) & (d[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
        w_ED = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_we + d[None, :],
                       mask=(e[:, None] < E) & (d[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
        acc_TE += tl.sum(x_TD[:, None, :] * w_ED[None, :, :], axis=2)
    if HAS_B:
        acc_TE += tl.load(b_ptr + e, mask=e < E, other=0.0).to(tl.float32)[None, :]
    out = logits_ptr + t[:, None].to(tl.int64) * stride_lt + e[None, :]
    tl.store(out, acc_TE.to(logits_ptr.dtype.element_ty), mask=(t[:, None] < T) & (e[None, :] < E))
    tl.debug_barrier()
    if tl.atomic_add(done_ptr, 1, sem="acq_rel") == tl.num_programs(0) * tl.num_programs(1) - 1:
        _route_tokens(0, T, logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, EG, scale, group_fill, stride_lt, 1, K,
                      SCORING, TOPK_FIRST, RENORMALIZE, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_TOPK, ROUND,
                      ROUND_SUM, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_G, True)  # fmt: skip
        tl.store(done_ptr, 0)


# Tokens up to which route projects them itself (decode). The GEMV, measured on an H100 (bench/NOTES.md,
# 2026-12-06): 2.2-2.9 us at T = 1 against cuBLAS's 4.1-5.0 us plus a split-K reduce; at T = 4 the layers within
# 2 us of cuBLAS's. Its loop over D is not pipelined, so each step costs a memory round trip: one step per row at
# T = 1 for every benchmark shape, two for Qwen3 at T = 4; above, cuBLAS's tensor-core tiles win.
PROJECT_MAX_T = 4
PROJECT_PROGRAMS = 64  # expert blocks the GEMV aims at: enough programs to stream the weight, few enough to share x
PROJECT_TILE = 8192  # fp32 products a program holds per step (BLOCK_T * BLOCK_E * BLOCK_D): 64 a thread at 4 warps


def _route_meta(E, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, score_dtype, bias) -> dict:
    """The route body's constexprs (and its checks), shared by both kernels."""
    if k > E:
        raise ValueError(f"moe_fx: router k ({k}) must be <= the number of experts ({E})")
    if n_group > 1 and E % n_group:
        raise ValueError(f"moe_fx: experts ({E}) must be divisible by n_group ({n_group})")
    return dict(
        K=k, SCORING=SCORING_CODES[scoring], TOPK_FIRST=order == "topk_then_score", RENORMALIZE=renormalize,
        HAS_BIAS=bias is not None, ROUND=ROUND_CODES[score_dtype],
        ROUND_SUM=ROUND_CODES.get(torch.promote_types(score_dtype, bias.dtype), 0) if bias is not None else 0,
        N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_TOPK=group_score_topk,
        BLOCK_E=next_power_of_2(E), BLOCK_K=next_power_of_2(k), BLOCK_G=next_power_of_2(max(n_group, 1)),
    )  # fmt: skip


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
    group_fill: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits_TE [, bias_E] -> (weights_TK fp32, ids_TK int32), the `moe_fx::route` contract."""
    T, E = logits.shape
    meta = _route_meta(E, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, score_dtype, bias)
    weights_TK = torch.empty((T, k), dtype=torch.float32, device=logits.device)
    ids_TK = torch.empty((T, k), dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights_TK, ids_TK
    launch(
        _route_kernel, (T,),
        logits, bias if bias is not None else logits, weights_TK, ids_TK,
        T, E, E // max(n_group, 1), float(scale), float(group_fill), logits.stride(0), logits.stride(1),
        **meta, num_warps=1 if meta["BLOCK_E"] <= 128 else 2,
    )  # fmt: skip
    return weights_TK, ids_TK


def project_route(
    x_TD: torch.Tensor,
    w_ED: torch.Tensor,
    b_E: torch.Tensor | None,
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
    group_fill: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route` of the router's logits_TE = linear(x_TD, w_ED, b_E), in x's dtype -> (weights_TK, ids_TK,
    logits_TE). Up to PROJECT_MAX_T tokens one launch does both (the GEMV's last program routes); above, or
    for a weight of another dtype, torch's linear and then `route`."""
    T, D = x_TD.shape
    E = w_ED.shape[0]
    if w_ED.shape[1] != D or (b_E is not None and b_E.shape != (E,)):
        raise ValueError(
            f"moe_fx: route's projection expects weight [E, {D}] and bias [E], got {tuple(w_ED.shape)} and "
            f"{None if b_E is None else tuple(b_E.shape)}"
        )
    routing = (bias, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, scale, score_dtype,
               group_fill)  # fmt: skip
    if T > PROJECT_MAX_T or T == 0 or E == 0 or x_TD.dtype != w_ED.dtype:
        logits_TE = torch.nn.functional.linear(x_TD, w_ED, b_E)
        return *route(logits_TE, *routing), logits_TE
    meta = _route_meta(E, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, score_dtype, bias)
    x_TD = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    w_ED = w_ED if w_ED.stride(-1) == 1 else w_ED.contiguous()
    logits_TE = torch.empty((T, E), dtype=x_TD.dtype, device=x_TD.device)
    weights_TK = torch.empty((T, k), dtype=torch.float32, device=x_TD.device)
    ids_TK = torch.empty((T, k), dtype=torch.int32, device=x_TD.device)
    done = workspace.zeroed(1, x_TD.device)
    if done is None:  # captured before this stream had a buffer: the fill is captured too
        done = torch.zeros((1,), dtype=torch.int32, device=x_TD.device)
    BLOCK_TP = next_power_of_2(T)
    BLOCK_EP = min(next_power_of_2(cdiv(E, PROJECT_PROGRAMS)), 16)
    BLOCK_D = max(16, min(PROJECT_TILE // (BLOCK_TP * BLOCK_EP), next_power_of_2(D)))
    launch(
        _project_route_kernel, (cdiv(E, BLOCK_EP), cdiv(T, BLOCK_TP)),
        x_TD, w_ED, b_E if b_E is not None else w_ED, logits_TE, done, bias if bias is not None else w_ED,
        weights_TK, ids_TK, T, E, D, E // max(n_group, 1), float(scale), float(group_fill),
        x_TD.stride(0), w_ED.stride(0), logits_TE.stride(0),
        HAS_B=b_E is not None, BLOCK_TP=BLOCK_TP, BLOCK_EP=BLOCK_EP, BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_TP, **meta,
        num_warps=4,
    )  # fmt: skip
    return weights_TK, ids_TK, logits_TE
