"""Triton `route`: scoring, (group-limited) top-k, renormalisation and scaling in one kernel.

Legend: T tokens, D model dim, E experts, K top-k, G expert groups.

One program per token holds its E logits in registers. Top-k is K rounds of "take the maximum,
lowest index first", each one reduction over int64 keys that hold the value and the index
(`_order_key`, `_pop_max`), so on tie-free data the expert set equals `torch.topk`'s, in the same
(descending) order; the group-limited choice of groups picks the same way. All math is fp32; ids are int32.
Every tensor of a row has a leading axis of COPIES identical rows: a program of several warps that routes a
token (the fused decode kernel) holds one copy per warp, so each reduction stays within a warp (shuffles, no
shared memory and barrier between the warps).

The router's projection, when `route` is given it (`project`): up to PROJECT_MAX_T tokens, a GEMV kernel
whose ~64 programs each read a few experts' rows of the [E, D] weight (cuBLAS ran Qwen3's [1, 2048] x
[2048, 128] as two 64x8 tiles in 4.9 us, GPT-OSS's with split-K plus a reduce in 4.4 + 1.5 us on an H100:
bench/NOTES.md); above, torch's linear. Its fp32 sums are rounded to the tokens' dtype, as the original
linear's output was.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_fx.lowering.quant import PER_TOKEN
from moe_fx.lowering.triton import quantize
from moe_fx.lowering.triton.launch import launch
from moe_fx.lowering.triton.quantize import _quantize_block
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
def _score(x, valid, SCORING: tl.constexpr, ROUND: tl.constexpr):
    if SCORING == 1:
        z = tl.where(valid, tl.exp(x - tl.max(tl.where(valid, x, -float("inf")), axis=-1, keep_dims=True)), 0.0)
        return _round(z / tl.sum(z, axis=-1, keep_dims=True), ROUND)
    elif SCORING == 2:
        return _round(tl.sigmoid(x), ROUND)
    else:
        return _round(x, ROUND)


@triton.jit
def _order_key(v_E, e, BLOCK_E: tl.constexpr):
    """int64 keys whose order is v's, ties broken towards the lower index: v's fp32 bits made to order as
    signed integers (-0 as +0, NaN above +inf as in torch.topk) in the high half, BLOCK_E - 1 - e in the low."""
    bits = (v_E + 0.0).to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    bits = tl.where(v_E != v_E, 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (BLOCK_E - 1 - e).to(tl.int64)


@triton.jit
def _pop_max(key):
    """(the largest of the keys along the last axis, the keys with it taken out)."""
    best = tl.max(key, axis=-1, keep_dims=True)
    return best, tl.where(key == best, -(2**63), key)


@triton.jit
def _key_value(key):
    """The fp32 value an `_order_key` key holds (-0.0 read back as +0.0, a NaN as a NaN)."""
    bits = (key >> 32).to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)


@triton.jit
def _group_keep(select_CE, e, valid, EG, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOPK: tl.constexpr,
                COPIES: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr):  # fmt: skip
    """Experts in the TOPK_GROUP groups with the largest sum of their GROUP_TOPK best scores: each pick one max
    over `_order_key` keys, so NaNs rank first and ties go to the lower index, as torch.topk does."""
    group_E = e // EG
    g = tl.arange(0, BLOCK_G)
    group_score_CG = tl.full((COPIES, BLOCK_G), -float("inf"), tl.float32)
    for gi in tl.static_range(N_GROUP):
        key_CE = _order_key(tl.where(valid & (group_E == gi), select_CE, -float("inf")), e, BLOCK_E)
        s = tl.zeros((COPIES, 1), tl.float32)
        for _ in tl.static_range(GROUP_TOPK):
            best, key_CE = _pop_max(key_CE)
            s += _key_value(best)
        group_score_CG = tl.where(g == gi, s, group_score_CG)
    key_CG = _order_key(group_score_CG, g, BLOCK_G)
    keep_CE = tl.zeros((COPIES, BLOCK_E), tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        best, key_CG = _pop_max(key_CG)
        keep_CE = keep_CE | (group_E == BLOCK_G - 1 - best.to(tl.int32))
    return keep_CE


@triton.jit
def _route_row(
    logits_ptr, bias_ptr, t, E, EG, scale, group_fill, stride_lt, stride_le,
    K: tl.constexpr, SCORING: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOPK: tl.constexpr,
    ROUND: tl.constexpr, ROUND_SUM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, COPIES: tl.constexpr,
):  # fmt: skip
    """Token t's route: (w_CK fp32, ids_CK int32, k), its K picks in the lanes k < K of each of COPIES identical
    rows: the `route` contract for one row of logits (run by `_route_kernel`, one copy, and by each program of
    the experts kernel that routes its own pick, a copy per warp)."""
    e = tl.arange(0, BLOCK_E)
    valid = e < E
    e_CE = tl.broadcast_to(e[None, :], (COPIES, BLOCK_E))
    x_CE = tl.load(logits_ptr + t * stride_lt + e_CE * stride_le, mask=e_CE < E, other=0.0).to(tl.float32)
    if TOPK_FIRST:
        source_CE = x_CE
        select_CE = x_CE
    else:
        source_CE = _score(x_CE, valid, SCORING, ROUND)
        select_CE = source_CE
        if HAS_BIAS:  # the sum rounded as the original's was (bf16 scores + a bf16 bias: bf16)
            bias_E = tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
            select_CE = _round(select_CE + bias_E, ROUND_SUM)
        if N_GROUP > 1:
            keep_CE = _group_keep(select_CE, e, valid, EG, N_GROUP, TOPK_GROUP, GROUP_TOPK, COPIES, BLOCK_E, BLOCK_G)
            select_CE = tl.where(keep_CE, select_CE, group_fill)
    select_CE = tl.where(valid, select_CE, -float("inf"))

    # top-k: K rounds of one max over keys that order the values and, among equal values, the lower index first
    # (the weight is the key's value where the selection is the source, else the source's at the pick)
    k = tl.arange(0, BLOCK_K)
    ids_CK = tl.zeros((COPIES, BLOCK_K), tl.int32)
    w_CK = tl.zeros((COPIES, BLOCK_K), tl.float32)
    key_CE = _order_key(select_CE, e, BLOCK_E)
    for i in tl.static_range(K):
        best_C1, key_CE = _pop_max(key_CE)
        id_C1 = BLOCK_E - 1 - best_C1.to(tl.int32)
        if TOPK_FIRST or (not HAS_BIAS and N_GROUP == 1):
            w_C1 = _key_value(best_C1)
        else:
            w_C1 = tl.sum(tl.where(e == id_C1, source_CE, 0.0), axis=1, keep_dims=True)
        ids_CK = tl.where(k == i, id_C1, ids_CK)
        w_CK = tl.where(k == i, w_C1, w_CK)
    if TOPK_FIRST:
        w_CK = _score(w_CK, k < K, SCORING, ROUND)
    w_CK = tl.where(k < K, w_CK, 0.0)
    if RENORMALIZE:
        w_CK = w_CK / (tl.sum(w_CK, axis=1, keep_dims=True) + 1e-20)
    return w_CK * scale, ids_CK, k


@triton.jit
def _route_kernel(
    # pointers
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    # sizes
    E, EG, scale, group_fill,
    # strides
    stride_lt, stride_le,
    # meta-parameters
    K: tl.constexpr, SCORING: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOPK: tl.constexpr,
    ROUND: tl.constexpr, ROUND_SUM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    w_CK, ids_CK, k = _route_row(logits_ptr, bias_ptr, t, E, EG, scale, group_fill, stride_lt, stride_le, K, SCORING,
                                 TOPK_FIRST, RENORMALIZE, HAS_BIAS, N_GROUP, TOPK_GROUP, GROUP_TOPK, ROUND, ROUND_SUM,
                                 BLOCK_E, BLOCK_K, BLOCK_G, 1)  # fmt: skip
    tl.store(weights_ptr + t * K + k[None, :], w_CK, mask=k[None, :] < K)
    tl.store(ids_ptr + t * K + k[None, :], ids_CK, mask=k[None, :] < K)


@triton.jit
def _project_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, out_ptr, zero_ptr, q_ptr, xs_ptr,
    # sizes
    T, E, D, ZERO_NUMEL,
    # strides
    stride_xt, stride_we, stride_ot, stride_qt,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANTIZE: tl.constexpr = False, QMAX: tl.constexpr = 1.0, IS_INT: tl.constexpr = False,
    ONE_TILE: tl.constexpr = True, ROWS_N: tl.constexpr = 1, ROWS_D: tl.constexpr = 16,
):  # fmt: skip
    """logits[t, e] = x[t, :] . w[e, :] (+ b[e]) for a block of tokens and experts: fp32 sums over D. The programs
    also write zeros over zero_ptr's ZERO_NUMEL int32s, a share each (the next kernel's sums: no fill launch).
    QUANTIZE: the programs past the experts' blocks quantise x's rows per token into q_ptr and xs_ptr instead
    (`quantize._quantize_block`, ROWS_N rows by ROWS_D columns each; the grid has one column of token blocks)."""
    if ZERO_NUMEL > 0:
        programs = tl.num_programs(0) * tl.num_programs(1)
        chunk = tl.cdiv(tl.cdiv(ZERO_NUMEL, programs), 256) * 256
        first = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * chunk
        for z0 in range(first, tl.minimum(ZERO_NUMEL, first + chunk), 256):
            z = z0 + tl.arange(0, 256)
            tl.store(zero_ptr + z, tl.zeros((256,), tl.int32), mask=z < ZERO_NUMEL)
    expert_blocks = tl.cdiv(E, BLOCK_E)
    if QUANTIZE and tl.program_id(0) >= expert_blocks:
        _quantize_block(x_ptr, q_ptr, xs_ptr, T, D, stride_xt, stride_qt, 1, tl.program_id(0) - expert_blocks, 0,
                        QMAX, IS_INT, ONE_TILE, ROWS_N, ROWS_D)  # fmt: skip
    else:
        e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        acc_TE = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x_TD = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_xt + d[None, :],
                           mask=(t[:, None] < T) & (d[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
            w_ED = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_we + d[None, :],
                           mask=(e[:, None] < E) & (d[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
            acc_TE += tl.sum(x_TD[:, None, :] * w_ED[None, :, :], axis=2)
        if HAS_BIAS:
            acc_TE += tl.load(b_ptr + e, mask=e < E, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + t[:, None].to(tl.int64) * stride_ot + e[None, :]
        tl.store(out, acc_TE.to(out_ptr.dtype.element_ty), mask=(t[:, None] < T) & (e[None, :] < E))


# Tokens up to which `project` runs its GEMV (decode). Measured on an H100 (bench/NOTES.md, 2026-12-06): 2.2-2.9 us
# at T = 1 against cuBLAS's 4.1-5.0 us plus a split-K reduce; at T = 4 the layers within 2 us of cuBLAS's.
# Its loop over D is not pipelined, so each step costs a memory round trip: one step per row at T = 1 for every
# benchmark shape, two for Qwen3 at T = 4; above, cuBLAS's tensor-core tiles win.
PROJECT_MAX_T = 4
PROJECT_PROGRAMS = 64  # expert blocks the GEMV aims at: enough programs to stream the weight, few enough to share x
PROJECT_TILE = 8192  # fp32 products a program holds per step (BLOCK_T * BLOCK_E * BLOCK_D): 64 a thread at 4 warps


def project(x_TD: torch.Tensor, w_ED: torch.Tensor, b_E: torch.Tensor | None, zero: torch.Tensor | None = None
            ) -> torch.Tensor:  # fmt: skip
    """The router's logits_TE = linear(x_TD, w_ED, b_E), in x's dtype (a GEMV kernel up to PROJECT_MAX_T tokens).
    `zero` (int32, contiguous): written with zeros too, by the GEMV's programs (or a fill above PROJECT_MAX_T)."""
    return project_quantised(x_TD, w_ED, b_E, "none", zero)[0]


def project_quantised(x_TD: torch.Tensor, w_ED: torch.Tensor, b_E: torch.Tensor | None, quant: str,
                      zero: torch.Tensor | None = None) -> tuple:  # fmt: skip
    """(logits_TE, xq_TD, xscale_T): `project`'s logits and, under quant "fp8" / "int8", x's rows quantised per
    token as `quantize.quantize_rows` does, by more programs of the GEMV's launch (None, None unquantised)."""
    T, D = x_TD.shape
    E = w_ED.shape[0]
    if w_ED.shape[1] != D or (b_E is not None and b_E.shape != (E,)):
        raise ValueError(
            f"moe_fx: route's projection expects weight [E, {D}] and bias [E], got {tuple(w_ED.shape)} and "
            f"{None if b_E is None else tuple(b_E.shape)}"
        )
    if quant not in ("none", *PER_TOKEN):
        raise ValueError(f"moe_fx: route's projection quantises x per token, quant in {PER_TOKEN}, got {quant!r}")
    if T > PROJECT_MAX_T or x_TD.dtype != w_ED.dtype or T == 0 or E == 0:
        if zero is not None:
            zero.zero_()
        rows = quantize.quantize_rows(x_TD, quant) if quant != "none" else (None, None)
        return torch.nn.functional.linear(x_TD, w_ED, b_E), *rows
    x_TD = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    w_ED = w_ED if w_ED.stride(-1) == 1 else w_ED.contiguous()
    logits_TE = torch.empty((T, E), dtype=x_TD.dtype, device=x_TD.device)
    BLOCK_T = next_power_of_2(T)
    BLOCK_E = min(next_power_of_2(cdiv(E, PROJECT_PROGRAMS)), 16)
    BLOCK_D = max(16, min(PROJECT_TILE // (BLOCK_T * BLOCK_E), next_power_of_2(D)))
    xq = xscale = None
    row_programs, rows = 0, {}
    if quant != "none":
        xq, xscale = quantize.new_rows(x_TD, quant)
        tiling = quantize.row_tiling(D, quant)
        row_programs = tiling.programs(T)
        c = quantize.row_constexprs(quant, tiling)
        rows = dict(QUANTIZE=True, QMAX=c["QMAX"], IS_INT=c["IS_INT"], ONE_TILE=c["ONE_TILE"], ROWS_N=c["BLOCK_N"],
                    ROWS_D=c["BLOCK_D"])  # fmt: skip
    launch(
        _project_kernel, (cdiv(E, BLOCK_E) + row_programs, cdiv(T, BLOCK_T)),
        x_TD, w_ED, b_E if b_E is not None else w_ED, logits_TE, zero if zero is not None else logits_TE,
        xq if xq is not None else logits_TE, xscale if xscale is not None else logits_TE, T, E, D,
        zero.numel() if zero is not None else 0,
        x_TD.stride(0), w_ED.stride(0), logits_TE.stride(0), xq.stride(0) if xq is not None else 0,
        HAS_BIAS=b_E is not None, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D, **rows, num_warps=4,
    )  # fmt: skip
    return logits_TE, xq, xscale


def route_meta(E: int, bias: torch.Tensor | None, k: int, scoring: str, order: str, renormalize: bool, n_group: int,
               topk_group: int, group_score_topk: int, score_dtype: torch.dtype) -> dict:  # fmt: skip
    """`_route_row`'s meta-parameters for `route`'s arguments (E experts)."""
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
    if k > E:
        raise ValueError(f"moe_fx: router k ({k}) must be <= the number of experts ({E})")
    if n_group > 1 and E % n_group:
        raise ValueError(f"moe_fx: experts ({E}) must be divisible by n_group ({n_group})")
    weights_TK = torch.empty((T, k), dtype=torch.float32, device=logits.device)
    ids_TK = torch.empty((T, k), dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights_TK, ids_TK
    launch(
        _route_kernel, (T,),
        logits, bias if bias is not None else logits, weights_TK, ids_TK,
        E, E // max(n_group, 1), float(scale), float(group_fill),
        logits.stride(0), logits.stride(1),
        **route_meta(E, bias, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, score_dtype),
        num_warps=1 if E <= 128 else 2,
    )  # fmt: skip
    return weights_TK, ids_TK
