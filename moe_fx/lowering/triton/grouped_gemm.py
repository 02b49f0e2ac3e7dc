"""Triton `experts`: two grouped GEMMs over rows grouped by expert, gather and activation fused.

Legend: T tokens, D model dim, F expert ffn dim, E experts, R routed rows, H = 2F (gated) or F.

    up:   h_RF = act(x[gather_index] · w13[e]ᵀ + b13[e])    gather fused into the A loads, act in the epilogue
    down: y_RD = (h_RF · w2[e]ᵀ + b2[e]) · row_weight?      routing weight fused into the epilogue
    reduce: out_ND[gather_index[r]] += y_r (atomics)      combine's sum in the down epilogue; the up GEMM's
                                                          programs write out's zeros first
    fused (a decode config, with reduce): one kernel      each up tile's h, an F-slice of its rows, times that
                                                          F-slice of w2 in the up epilogue (the down GEMM split
                                                          over its K = F), fp32 atomics into sum_TD, cast by the
                                                          last program to finish; under fp8 / int8 h quantised
                                                          per row of its F-slice (the reference: per row of F)

Tiles: expert e owns cdiv(rows_e, BLOCK_M) M-tiles; the real tiles are numbered in grouped order (GROUP_M
M-tiles share an N-column) so weight tiles and A rows are reused from L2, and a program finds a tile's expert
from expert_offsets with a cumsum over E, in registers. The grid is sized without a host sync: by default
one program per tile that may exist, cdiv(R, BLOCK_M) + min(E, R) M-tiles (at most R experts have rows, each
adds at most one partial tile) times the N-tiles, the programs past the real tiles doing nothing; or, for a
`persistent` config, two programs per SM, each taking every grid-th tile in one loop that Triton flattens
with the K loop (the next tile's first loads in flight during this one's last K-steps and epilogue). The down
GEMM's programs first write zeros over the dropped rows [offsets[E], R), where dispatch puts dropped picks.

Gate/up layouts are pointer arithmetic: the gate of column n is w13 row GATE_ROW + n·ROW_STEP and the
up is UP_ROW + n·ROW_STEP of w13 (or of w3 when "separate"); transposed storage only swaps strides.
A gated up GEMM runs ONE dot per K-step over a [BLOCK_K, 2·BLOCK_N] weight tile and splits the accumulator
into gate and up after the K loop: one code path for every layout (against two dots per K-step it measured
0.92-1.03x on an H200, bench/NOTES.md). The tile's columns are the N-tile's gate rows then its up rows
("blocked"), or, for interleaved
gate/up (GPT-OSS), the 2·BLOCK_N adjacent rows as stored (strided-by-2 loads of transposed storage would
not vectorise).

fp8_block (scales per 128-deep K-block) keeps the accumulator in units of the current K-block's scale, so
the dot accumulates in place: acc = dot(a_k, b_k, acc · s_{k-1} / s_k), times s_last after the loop. A
partial product per K-step (acc += dot(a_k, b_k) · s_k) would hold a second accumulator-sized tile. Each
K-step loads both its own and the previous step's block scales (one weight scale per column; the previous
ones hit L1) before its MMA; no scale vector is carried through the loop. Checked on an H200 (2026-12-05,
bench/NOTES.md). The K-loops that loaded the next K-block's scales after the MMA (per column, or two scalars
per run of 128 columns) were right in the interpreter and wrong on an H100 and an H200.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moe_fx.lowering import quant as quant_fmt
from moe_fx.lowering.triton import quantize, tuning
from moe_fx.lowering.triton.launch import launch
from moe_fx.lowering.triton.quantize import _quantize_tile
from moe_fx.lowering.triton.route import _route_row, route_meta
from moe_fx.lowering.triton.sizes import cdiv, next_power_of_2
from moe_fx.spec import GATED_ACTIVATIONS

ACTIVATION_CODES = {
    "silu_gated": 0, "gelu_gated": 1, "gelu_tanh_gated": 2, "clamped_swiglu": 3,
    "relu": 4, "gelu": 5, "gelu_tanh": 6, "silu": 7, "clamped_silu_gated": 8, "relu2": 9,
}  # fmt: skip


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    if TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * inner)  # 0.5·x·(1 + tanh(u)) = x·sigmoid(2u)
    else:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _activate(gate, up, alpha, limit, ACT: tl.constexpr):
    if ACT == 0:
        return gate * tl.sigmoid(gate) * up
    elif ACT == 1:
        return _gelu(gate, False) * up
    elif ACT == 2:
        return _gelu(gate, True) * up
    elif ACT == 3:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * gate * tl.sigmoid(gate * alpha)
    elif ACT == 4:
        return tl.maximum(gate, 0.0)
    elif ACT == 5:
        return _gelu(gate, False)
    elif ACT == 6:
        return _gelu(gate, True)
    elif ACT == 7:
        return gate * tl.sigmoid(gate)
    elif ACT == 8:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return gate * tl.sigmoid(gate) * up
    else:
        relu = tl.maximum(gate, 0.0)
        return relu * relu


@triton.jit
def _expert_bounds(offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(e, lo_E, hi_E, real_tiles): the experts' row bounds from expert_offsets, once per program, and their
    M-tiles' count (sum_e cdiv(rows_e, BLOCK_M), int32)."""
    e = tl.arange(0, BLOCK_E)
    lo_E = tl.load(offsets_ptr + e, mask=e < E, other=0)
    hi_E = tl.load(offsets_ptr + e + 1, mask=e < E, other=0)
    real_tiles = tl.sum((hi_E - lo_E + BLOCK_M - 1) // BLOCK_M, axis=0).to(tl.int32)
    return e, lo_E, hi_E, real_tiles


@triton.jit
def _tile(t, e, lo_E, hi_E, real_tiles, num_pid_n, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile t's (expert, first row, row end, N-tile), t < real_tiles · num_pid_n, in grouped order (GROUP_M
    M-tiles share an N-column). The expert is found with a cumsum over E, in registers."""
    in_group = GROUP_M * num_pid_n
    first_m = (t // in_group) * GROUP_M
    group_m = min(real_tiles - first_m, GROUP_M)
    pid_m = first_m + (t % in_group) % group_m
    pid_n = (t % in_group) // group_m
    tiles_E = (hi_E - lo_E + BLOCK_M - 1) // BLOCK_M
    tile_end_E = tl.cumsum(tiles_E, axis=0)
    expert = tl.sum((tile_end_E <= pid_m).to(tl.int32), axis=0)
    mine = e == expert
    start = tl.sum(tl.where(mine, lo_E + (pid_m - (tile_end_E - tiles_E)) * BLOCK_M, 0), axis=0)
    end = tl.sum(tl.where(mine, hi_E, 0), axis=0)
    return expert, start, end, pid_n


@triton.jit
def _block_scales(a_scale_ptr, a_rows, stride_ar, a_mask, w_scale_ptr, w_rows, stride_wr, w_mask, stride_ab, stride_wb,
                  kb, G: tl.constexpr):  # fmt: skip
    """fp8_block: K-block kb's scales, 1 where masked: the rows' ([M], per 1×G group) and the columns' ([N], per
    G×G weight block, stored rows w_rows // G)."""
    a_s = tl.load(a_scale_ptr + a_rows * stride_ar + kb * stride_ab, mask=a_mask, other=1.0)
    w_s = tl.load(w_scale_ptr + (w_rows // G) * stride_wr + kb * stride_wb, mask=w_mask, other=1.0)
    return a_s, w_s


@triton.jit
def _block_rescale(acc, a_scale_ptr, a_rows, stride_ar, a_mask, w_scale_ptr, w_rows, stride_wr, w_mask, stride_ab,
                   stride_wb, k0, QUANT: tl.constexpr, SWAP: tl.constexpr, BLOCK_K: tl.constexpr,
                   G: tl.constexpr):  # fmt: skip
    """fp8_block (QUANT 2): acc [M, N], held in units of K-step k0 - 1's block scales, in units of K-step k0's
    (at k0 = 0 acc is zero and the ratio 1). Both steps' scales are loaded here, before the MMA (the previous
    step's again, from L1). Unchanged otherwise."""
    if QUANT == 2:
        tl.static_assert(not SWAP, "fp8_block runs unswapped tiles (tuning.conform)")
        a_p, w_p = _block_scales(a_scale_ptr, a_rows, stride_ar, a_mask, w_scale_ptr, w_rows, stride_wr, w_mask,
                                 stride_ab, stride_wb, (tl.maximum(k0 - 1, 0) * BLOCK_K) // G, G)  # fmt: skip
        a_s, w_s = _block_scales(a_scale_ptr, a_rows, stride_ar, a_mask, w_scale_ptr, w_rows, stride_wr, w_mask,
                                 stride_ab, stride_wb, (k0 * BLOCK_K) // G, G)  # fmt: skip
        return acc * ((a_p / a_s)[:, None] * (w_p / w_s)[None, :])
    else:
        return acc


@triton.jit
def _dequantize(acc, a_scale_ptr, a_rows, stride_ar, a_mask, w_scale_ptr, w_rows, stride_wr, w_mask, stride_ab,
                stride_wb, k_last, QUANT: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr):  # fmt: skip
    """The fp32 value of an accumulator: × the per-token and per-channel scales (QUANT 1), × the scales of the
    last K-step's block (QUANT 2, the units `_block_rescale` left it in), as is otherwise."""
    if QUANT == 1:
        a_s = tl.load(a_scale_ptr + a_rows * stride_ar, mask=a_mask, other=0.0)
        w_s = tl.load(w_scale_ptr + w_rows * stride_wr, mask=w_mask, other=0.0)
        return acc.to(tl.float32) * (a_s[:, None] * w_s[None, :])
    elif QUANT == 2:
        a_s, w_s = _block_scales(a_scale_ptr, a_rows, stride_ar, a_mask, w_scale_ptr, w_rows, stride_wr, w_mask,
                                 stride_ab, stride_wb, (k_last * BLOCK_K) // G, G)  # fmt: skip
        return acc * (a_s[:, None] * w_s[None, :])
    else:
        return acc


@triton.jit
def _tile_mask(ok, k_ok, EVEN_K: tl.constexpr, K_FIRST: tl.constexpr):
    """The load mask of a [M, K] tile (rows masked by ok) or, K_FIRST, a [K, N] one (columns masked by ok);
    K is masked by k_ok unless EVEN_K."""
    if K_FIRST:
        mask = ok[None, :]
        if not EVEN_K:
            mask = k_ok[:, None] & mask
    else:
        mask = ok[:, None]
        if not EVEN_K:
            mask = mask & k_ok[None, :]
    return mask


@triton.jit
def _unpack_int4(w, DTYPE: tl.constexpr):
    """(low, high): the signed int4 values in the low and high nibbles of the bytes w, exactly, as DTYPE, by bit
    operations alone: a nibble n (two's complement) is n ^ 8 in [0, 16) placed in the mantissa of 2^m (m = 23
    fp32, 10 fp16, 7 bf16), minus 2^m + 8. An int-to-float conversion runs at a quarter of the ALU rate on NVIDIA
    GPUs; two per weight bounded the int4 decode GEMMs at the bf16 time (bench/NOTES.md)."""
    if DTYPE == tl.float32:
        BITS: tl.constexpr = tl.uint32
        MAGIC: tl.constexpr = 0x4B000000
        OFFSET: tl.constexpr = 8388616.0
    elif DTYPE == tl.float16:
        BITS: tl.constexpr = tl.uint16
        MAGIC: tl.constexpr = 0x6400
        OFFSET: tl.constexpr = 1032.0
    else:
        BITS: tl.constexpr = tl.uint16
        MAGIC: tl.constexpr = 0x4300
        OFFSET: tl.constexpr = 136.0
    x = w.to(tl.uint8, bitcast=True).to(BITS) ^ 0x88
    low = ((x & 0xF) | MAGIC).to(BITS).to(DTYPE, bitcast=True) - OFFSET
    high = ((x >> 4) | MAGIC).to(BITS).to(DTYPE, bitcast=True) - OFFSET
    return low, high


# the int4 unpack in PTX (`_unpack_int4_bf16`) where kernels are compiled; the interpreter runs no inline PTX
_UNPACK_PTX = tl.constexpr(not tuning.interpreting())


# `_unpack_int4(w, bf16)` on 4 bytes at a time ($4, one 32-bit register) into 8 weights in 4 bf16x2 registers: $0, $1
# the low nibbles of bytes (0, 1), (2, 3), $2, $3 their high nibbles. A byte permute (prmt) puts bytes 0 and 1 in
# the low byte of each half-word; one lop3 (truth table 0x6A: mask ? a ^ c : c) then xors the nibble with 8, drops
# the other bits and ors in 2^7 as the exponent (0x4300: 128 + (n ^ 8) = 136 + n); the high nibbles shift down 4
# first; one packed fma subtracts 136. 12 instructions per 8 weights (tests/lowering/triton/test_int4_ptx.py runs
# this text through a model of the five PTX instructions on every byte value).
_UNPACK_INT4_BF16 = tl.constexpr("""{
        .reg .b32 p, q, t, one, off;
        mov.b32 one, 0x3F803F80;
        mov.b32 off, 0xC308C308;
        prmt.b32 p, $4, 0, 0x4140;
        prmt.b32 q, $4, 0, 0x4342;
        lop3.b32 $0, p, 0x000F000F, 0x43084308, 0x6A;
        lop3.b32 $1, q, 0x000F000F, 0x43084308, 0x6A;
        shr.u32 t, p, 4;
        lop3.b32 $2, t, 0x000F000F, 0x43084308, 0x6A;
        shr.u32 t, q, 4;
        lop3.b32 $3, t, 0x000F000F, 0x43084308, 0x6A;
        fma.rn.bf16x2 $0, $0, one, off;
        fma.rn.bf16x2 $1, $1, one, off;
        fma.rn.bf16x2 $2, $2, one, off;
        fma.rn.bf16x2 $3, $3, one, off;
        }""")


@triton.jit
def _unpack_int4_bf16(w):
    """`_unpack_int4(w, bf16)` in inline PTX (`_UNPACK_INT4_BF16`)."""
    return tl.inline_asm_elementwise(
        asm=_UNPACK_INT4_BF16,
        constraints="=r,=r,=r,=r,r",
        args=[w.to(tl.uint8, bitcast=True)],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _unpack_int4_exact(w, DTYPE: tl.constexpr):
    """(low, high) of the byte tile w as DTYPE, exactly: through inline PTX for bf16 on a GPU (tested there on
    every byte value), through `_unpack_int4` otherwise."""
    if _UNPACK_PTX and DTYPE == tl.bfloat16:
        return _unpack_int4_bf16(w)
    else:
        return _unpack_int4(w, DTYPE)


@triton.jit
def _int4_mma(a, w_ptrs, w_ok, k_left, acc, w_scale_ptr, w_rows, stride_wr, k0, stride_wb, EVEN_K: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr, SWAP: tl.constexpr):  # fmt: skip
    """int4_weight: acc += a [M, BLOCK_K] · the weights packed in the [BLOCK_K // 2, N] byte tile at w_ptrs
    (byte i holds K-elements 2i, low nibble, and 2i + 1, as `quant.pack_int4`), each byte loaded once along
    consecutive addresses and unpacked in registers to its exact int4 values (`_unpack_int4_exact`). A K-step lies
    in one group of G (BLOCK_K divides G), so with few rows (2·BLOCK_M <= BLOCK_K: decode tiles) its group scales
    multiply the K-step's fp32 partial product, once per accumulator element instead of once per weight
    (products of a and the int4 values exact, as in the reference, the scale applied in fp32; the main loop of a
    16×64×128 decode tile issues 0.75× the SASS instructions, bench/NOTES.md). With more rows the weights are
    scaled in a's dtype (each scaled weight rounded to it: ~1e-3 from the reference in bf16), which keeps the
    accumulator in place (wgmma chains its K-steps; a partial product per K-step made a 64-row tile's loop
    longer, not shorter).
    SWAP (acc is [N, M]): the bytes are read as [N, BLOCK_K // 2], each row's nibble pairs joined in place into
    the [N, BLOCK_K] weight tile, the dot's first operand; one full-depth dot per K-step. Otherwise the nibbles
    meet the even and odd K-columns of a in two dots."""
    kp = tl.arange(0, BLOCK_K // 2)
    mask = _tile_mask(w_ok, 2 * kp < k_left, EVEN_K, True)
    w_s = tl.load(w_scale_ptr + w_rows * stride_wr + ((k0 * BLOCK_K) // G) * stride_wb, mask=w_ok, other=0.0)
    SCALE_ACC: tl.constexpr = 2 * a.shape[0] <= BLOCK_K  # a multiply per accumulator element, not per weight
    if SWAP:
        low, high = _unpack_int4_exact(tl.load(tl.trans(w_ptrs), mask=tl.trans(mask), other=0), a.dtype)
        if not SCALE_ACC:
            scale = w_s.to(a.dtype)[:, None]
            low, high = low * scale, high * scale
        w_NK = tl.reshape(tl.join(low, high), (low.shape[0], BLOCK_K))  # column 2i low, 2i + 1 high
        if SCALE_ACC:
            return acc + tl.dot(w_NK, tl.trans(a), input_precision=PRECISION) * w_s[:, None]
        else:
            return tl.dot(w_NK, tl.trans(a), acc, input_precision=PRECISION)
    else:
        low, high = _unpack_int4_exact(tl.load(w_ptrs, mask=mask, other=0), a.dtype)
        a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], BLOCK_K // 2, 2)))
        if SCALE_ACC:
            part = tl.dot(a_even, low, input_precision=PRECISION)
            return acc + tl.dot(a_odd, high, part, input_precision=PRECISION) * w_s[None, :]
        else:
            scale = w_s.to(a.dtype)[None, :]
            acc = tl.dot(a_even, low * scale, acc, input_precision=PRECISION)
            return tl.dot(a_odd, high * scale, acc, input_precision=PRECISION)


@triton.jit
def _mma(a, w, acc, PRECISION: tl.constexpr, SWAP: tl.constexpr):
    """acc += a [M, K] · w [K, N], in place; SWAP: acc is [N, M] and gets wᵀ · aᵀ (the weights are the
    dot's first operand: its 64-row instruction tile spans N, and a decode tile's few rows its narrow side)."""
    if SWAP:
        return tl.dot(tl.trans(w), tl.trans(a), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    else:
        return tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _accumulator(M: tl.constexpr, N: tl.constexpr, IS_INT: tl.constexpr, SWAP: tl.constexpr):
    """A zero [M, N] accumulator (int32 for int8 operands, fp32 otherwise), [N, M] under SWAP."""
    dtype: tl.constexpr = tl.int32 if IS_INT else tl.float32
    if SWAP:
        return tl.zeros((N, M), dtype)
    else:
        return tl.zeros((M, N), dtype)


@triton.jit
def _weight_mma(a, w_ptrs, w_ok, k_left, acc, w_scale_ptr, w_rows, stride_wr, k0, stride_wb, EVEN_K: tl.constexpr,
                QUANT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr,
                SWAP: tl.constexpr):  # fmt: skip
    """acc += a · the weight tile at w_ptrs ([BLOCK_K, N], or [BLOCK_K // 2, N] bytes for int4_weight; columns
    w_rows of the weight, masked by w_ok), k_left K-elements left from this K-block on; in place (int8:
    int32; SWAP: acc is [N, M], see `_mma`)."""
    if QUANT == 3:
        return _int4_mma(a, w_ptrs, w_ok, k_left, acc, w_scale_ptr, w_rows, stride_wr, k0, stride_wb, EVEN_K,
                         PRECISION, BLOCK_K, G, SWAP)  # fmt: skip
    else:
        w = tl.load(w_ptrs, mask=_tile_mask(w_ok, tl.arange(0, BLOCK_K) < k_left, EVEN_K, True), other=0.0)
        return _mma(a, w.to(a.dtype), acc, PRECISION, SWAP)


@triton.jit
def _weight_tile(desc, expert, n0, k0, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, K_MAJOR: tl.constexpr,
                 BLOCK_K: tl.constexpr, COLS: tl.constexpr):  # fmt: skip
    """The [BLOCK_K, COLS] weight tile of the N-tile starting at column n0, K-offset k0, through the tensor
    descriptor `desc` (a TMA copy into shared memory; the views are `_weight_descriptor`'s). Its columns are in
    the pointer path's order: gated, the N-tile's gate rows then its up rows, or interleaved pairs."""
    if K_MAJOR:  # [E, 2, F, D], [E, F, 2, D] (interleaved) or [E, N, D]
        if GATED and INTERLEAVED:
            w = desc.load([expert, n0, 0, k0])
        elif GATED:
            w = desc.load([expert, 0, n0, k0])
        else:
            w = desc.load([expert, n0, k0])
        return tl.reshape(w, (COLS, BLOCK_K)).T
    else:  # transposed storage: [E, D, 2, F], [E, D, 2F] (interleaved) or [E, D, N]
        if GATED and INTERLEAVED:
            w = desc.load([expert, k0, 2 * n0])
        elif GATED:
            w = desc.load([expert, k0, 0, n0])
        else:
            w = desc.load([expert, k0, n0])
        return tl.reshape(w, (BLOCK_K, COLS))


@triton.jit
def _larger_pick(id_a, w_a, id_b, w_b):
    """tl.reduce's combine over (expert id, weight) pairs: the pair of the larger id."""
    a = id_a >= id_b
    return tl.where(a, id_a, id_b), tl.where(a, w_a, w_b)


@triton.jit
def _up_kernel(
    # pointers
    x_ptr, gather_ptr, offsets_ptr, row_weights_ptr, wg_ptr, wu_ptr, bias_ptr, h_ptr,
    xs_ptr, ws_ptr, hs_ptr, out_ptr, w2_ptr, b2_ptr, w2s_ptr, sum_ptr, done_ptr,
    # sizes
    D, F, E, NPROG, alpha, limit, OUT_NUMEL,
    GATE_ROW, UP_ROW, ROW_STEP, BIAS_GATE, BIAS_UP,
    # strides
    stride_xt, stride_xd, stride_we, stride_wh, stride_wd, stride_ue, stride_uh,
    stride_be, stride_bh, stride_hr, stride_hf,
    stride_xst, stride_xsb, stride_wse, stride_wsh, stride_wsb, stride_hsr,
    stride_2e, stride_2d, stride_2f, stride_b2e, stride_b2d, stride_2se, stride_2sd,
    # ROUTED: the router's logits and `route`'s arguments (`route._route_row`), each program routing its token
    logits_ptr, route_bias_ptr, PICKS, EG, route_scale, group_fill, stride_lt, stride_le,
    # meta-parameters
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHT_INPUT: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr,
    PACK: tl.constexpr, INTERLEAVED: tl.constexpr, SEPARATE: tl.constexpr, W_TMA: tl.constexpr,
    W_KMAJOR: tl.constexpr, UP_FIRST: tl.constexpr, SWAP: tl.constexpr,
    PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr, G: tl.constexpr, ZERO_OUT: tl.constexpr,
    FUSED: tl.constexpr, HAS_B2: tl.constexpr, WEIGHT_OUTPUT: tl.constexpr, BLOCK_D: tl.constexpr,
    W2_BLOCK: tl.constexpr, ROUTED: tl.constexpr = False, TOP_K: tl.constexpr = 1, SCORING: tl.constexpr = 0,
    TOPK_FIRST: tl.constexpr = False, RENORMALIZE: tl.constexpr = False, HAS_ROUTE_BIAS: tl.constexpr = False,
    N_GROUP: tl.constexpr = 1, TOPK_GROUP: tl.constexpr = 1, GROUP_TOPK: tl.constexpr = 1, ROUND: tl.constexpr = 0,
    ROUND_SUM: tl.constexpr = 0,
    BLOCK_ER: tl.constexpr = 1, BLOCK_KR: tl.constexpr = 1, BLOCK_G: tl.constexpr = 1,
    ROUTE_COPIES: tl.constexpr = 1,
):  # fmt: skip
    """The up GEMM's tiles (see the module's docstring). ROUTED (fused, decode): no dispatch; program t is the
    F-slice t % cdiv(F, BLOCK_N) of pick t // cdiv(F, BLOCK_N) (token p // TOP_K, its (p % TOP_K)-th expert),
    which it finds by routing the token's logits itself, as `route` does; one row of the tile is real."""
    if ZERO_OUT:  # the down GEMM adds its rows into out (REDUCE): zeros first, a share of them per program
        chunk = tl.cdiv(tl.cdiv(OUT_NUMEL, NPROG), 1024) * 1024
        first = tl.program_id(0).to(tl.int64) * chunk
        for z0 in range(first, tl.minimum(OUT_NUMEL, first + chunk), 1024):
            z = z0 + tl.arange(0, 1024)
            tl.store(out_ptr + z, tl.zeros((1024,), out_ptr.dtype.element_ty), mask=z < OUT_NUMEL)
    num_pid_n = tl.cdiv(F, BLOCK_N)
    if ROUTED:
        tiles = PICKS * num_pid_n
    else:
        e, lo_E, hi_E, real_tiles = _expert_bounds(offsets_ptr, E, BLOCK_M, BLOCK_E)
        tiles = real_tiles * num_pid_n
    pid = tl.program_id(0)
    for i in tl.range(0, tl.cdiv(tiles - pid, NPROG) if PERSISTENT else 1, flatten=PERSISTENT):  # see _down_kernel
        t = pid + i * NPROG
        if PERSISTENT or t < tiles:  # a grid of one program per tile may have more programs than tiles
            row_w = tl.zeros((BLOCK_M,), tl.float32)  # the rows' routing weights, where a weight_at reads them
            if ROUTED:
                pick, pid_n = t // num_pid_n, t % num_pid_n
                token = pick // TOP_K
                # a copy of the route per warp (ROUTE_COPIES = num_warps): its reductions stay within the warp
                w_CK, ids_CK, k_K = _route_row(logits_ptr, route_bias_ptr, token.to(tl.int64), E, EG, route_scale,
                                               group_fill, stride_lt, stride_le, TOP_K, SCORING, TOPK_FIRST,
                                               RENORMALIZE, HAS_ROUTE_BIAS, N_GROUP, TOPK_GROUP, GROUP_TOPK, ROUND,
                                               ROUND_SUM, BLOCK_ER, BLOCK_KR, BLOCK_G, ROUTE_COPIES)  # fmt: skip
                mine = k_K == pick % TOP_K
                expert_C, pick_w_C = tl.reduce((tl.where(mine, ids_CK, -1), w_CK), 1, _larger_pick)
                expert, pick_w = tl.reduce((expert_C, pick_w_C), 0, _larger_pick)  # the copies' (equal) picks
                rows = tl.arange(0, BLOCK_M)
                row_ok = rows == 0
                tokens = tl.zeros((BLOCK_M,), tl.int64) + token
                row_w = tl.where(row_ok, pick_w, 0.0)
            else:
                expert, start, end, pid_n = _tile(t, e, lo_E, hi_E, real_tiles, num_pid_n, BLOCK_M, GROUP_M)
                rows = start + tl.arange(0, BLOCK_M)
                row_ok = rows < end
                tokens = tl.load(gather_ptr + rows, mask=row_ok, other=0)
                if WEIGHT_INPUT or (FUSED and WEIGHT_OUTPUT):
                    row_w = tl.load(row_weights_ptr + rows, mask=row_ok, other=0.0)
            n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < F
            k = tl.arange(0, BLOCK_K)
            a_ptrs = x_ptr + tokens[:, None] * stride_xt + k[None, :] * stride_xd
            # the weight tile's columns j: gated, the N-tile's gate rows then its up rows (or, INTERLEAVED, the
            # 2·BLOCK_N adjacent (gate, up) rows as stored); not gated, its BLOCK_N rows
            COLS: tl.constexpr = 2 * BLOCK_N if GATED else BLOCK_N
            j = tl.arange(0, COLS)
            if INTERLEAVED:
                w_rows = pid_n * 2 * BLOCK_N + j
                w_ok = w_rows < 2 * F
            else:
                is_up = j >= BLOCK_N
                n_j = pid_n * BLOCK_N + j % BLOCK_N
                w_ok = n_j < F
                w_rows = tl.where(is_up, UP_ROW, GATE_ROW) + n_j * ROW_STEP  # SEPARATE: UP_ROW 0, the up rows are w3's
            if not W_TMA:
                w_base = wg_ptr + expert.to(tl.int64) * stride_we + w_rows * stride_wh
                if SEPARATE:
                    w_base = tl.where(is_up, wu_ptr + expert.to(tl.int64) * stride_ue + w_rows * stride_uh, w_base)
                # the weights' K-rows of a K-block (int4_weight: bytes of two elements)
                kw = tl.arange(0, BLOCK_K // PACK)
                w_ptrs = w_base[None, :] + kw[:, None] * stride_wd
            ws_e = ws_ptr + expert.to(tl.int64) * stride_wse  # this expert's weight scales
            acc = _accumulator(BLOCK_M, COLS, IS_INT, SWAP)
            n_k = tl.cdiv(D, BLOCK_K)
            for k0 in range(0, n_k):
                k_left = D - k0 * BLOCK_K
                a = tl.load(a_ptrs, mask=_tile_mask(row_ok, k < k_left, EVEN_K, False), other=0.0)
                acc = _block_rescale(acc, xs_ptr, tokens, stride_xst, row_ok, ws_e, w_rows, stride_wsh, w_ok,
                                     stride_xsb, stride_wsb, k0, QUANT, SWAP, BLOCK_K, G)  # fmt: skip
                if W_TMA:
                    w = _weight_tile(wg_ptr, expert, pid_n * BLOCK_N, k0 * BLOCK_K, GATED, INTERLEAVED, W_KMAJOR,
                                     BLOCK_K, COLS)  # fmt: skip
                    acc = _mma(a, w, acc, PRECISION, SWAP)
                else:
                    acc = _weight_mma(a, w_ptrs, w_ok, k_left, acc, ws_e, w_rows, stride_wsh, k0, stride_wsb, EVEN_K,
                                      QUANT, PRECISION, BLOCK_K, G, SWAP)  # fmt: skip
                    w_ptrs += (BLOCK_K // PACK) * stride_wd
                a_ptrs += BLOCK_K * stride_xd
            if SWAP:
                acc = tl.trans(acc)
            acc = _dequantize(acc, xs_ptr, tokens, stride_xst, row_ok, ws_e, w_rows, stride_wsh, w_ok, stride_xsb,
                              stride_wsb, n_k - 1, QUANT, BLOCK_K, G)  # fmt: skip
            if GATED:
                if INTERLEAVED:
                    acc_g, acc_u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
                else:
                    acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
                    if UP_FIRST:  # a descriptor's tile holds the stored halves in order: up, then gate
                        acc_g, acc_u = acc_u, acc_g
            else:
                acc_g = acc
                acc_u = acc
            if WEIGHT_INPUT:
                acc_g *= row_w[:, None]
                acc_u *= row_w[:, None]
            if HAS_BIAS:
                b_ptrs = bias_ptr + expert.to(tl.int64) * stride_be
                b_gate = tl.load(b_ptrs + (BIAS_GATE + n * ROW_STEP) * stride_bh, mask=n_ok, other=0.0)
                acc_g += b_gate.to(tl.float32)[None, :]
                if GATED:
                    b_up = tl.load(b_ptrs + (BIAS_UP + n * ROW_STEP) * stride_bh, mask=n_ok, other=0.0)
                    acc_u += b_up.to(tl.float32)[None, :]
            h = _activate(acc_g, acc_u, alpha, limit, ACT)
            h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + n[None, :] * stride_hf
            h_scale = row_w  # (unread unless quantised here)
            # fp8_block: the tile is one 1×G group of each row (BLOCK_N == G); fused fp8 / int8: each row's F-slice
            # gets a scale of its own (a 1×BLOCK_N group)
            if QUANT == 2 or (FUSED and QUANT == 1):
                h, h_scale = _quantize_tile(tl.where(n_ok[None, :], h, 0.0), QMAX, IS_INT)
            if QUANT == 2:
                tl.store(hs_ptr + rows.to(tl.int64) * stride_hsr + pid_n, h_scale, mask=row_ok)
            if FUSED:
                if QUANT == 0:
                    h = h.to(w2_ptr.dtype.element_ty)
                _down_slice(h, h_scale, row_ok, tokens, expert, n, n_ok, tl.where(pid_n == 0, D, 0), w2_ptr, b2_ptr,
                            w2s_ptr, row_w, sum_ptr, D, stride_2e, stride_2d, stride_2f, stride_b2e, stride_b2d,
                            stride_2se, stride_2sd, HAS_B2, WEIGHT_OUTPUT, QUANT, IS_INT, PRECISION,
                            BLOCK_D, W2_BLOCK)  # fmt: skip
            else:
                tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
    if FUSED:
        _cast_when_last(sum_ptr, done_ptr, out_ptr, OUT_NUMEL, NPROG)


@triton.jit
def _w2_offsets(f, d, D, stride_2d, stride_2f, W2_BLOCK: tl.constexpr):
    """Offsets of the elements (d, f) (broadcast) within one expert's w2: [D, F] as strided, or (W2_BLOCK > 0)
    in column blocks, [ceil(F / W2_BLOCK), D, W2_BLOCK] contiguous (`quant.block_columns`)."""
    if W2_BLOCK:
        return (f // W2_BLOCK) * (D * W2_BLOCK) + d * W2_BLOCK + f % W2_BLOCK
    else:
        return f * stride_2f + d * stride_2d


@triton.jit
def _down_slice(h, h_scale, row_ok, tokens, expert, f, f_ok, b2_cols, w2_ptr, b2_ptr, w2s_ptr, row_w, sum_ptr, D,
                stride_2e, stride_2d, stride_2f, stride_b2e, stride_b2d, stride_2se, stride_2sd, HAS_B2: tl.constexpr,
                WEIGHT_OUTPUT: tl.constexpr, QUANT: tl.constexpr, IS_INT: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_D: tl.constexpr, W2_BLOCK: tl.constexpr):  # fmt: skip
    """The down GEMM of one up tile (fused): h [M, BLOCK_N], the activations of its rows over the F-slice f,
    times w2[expert, :, f]ᵀ (w2 in column blocks where W2_BLOCK > 0), one BLOCK_D-wide column block at a time,
    each block's product (+ b2's first b2_cols columns: all D in the first F-slice's program, none in the others;
    × the routing weight) added in fp32 into the rows' tokens of sum_TD. The F-slices' partial products meet
    there, in no fixed order.
    QUANT 1 (fp8 / int8): h is quantised per row with h_scale [M], w2 per output channel (w2s_ptr [E, D]); the
    product is dequantised by both before it is added."""
    w2_e = w2_ptr + expert.to(tl.int64) * stride_2e
    sum_rows = sum_ptr + tokens.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        w = tl.load(w2_e + _w2_offsets(f[:, None], d[None, :], D, stride_2d, stride_2f, W2_BLOCK),
                    mask=f_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        y = tl.dot(h, w, input_precision=PRECISION, out_dtype=tl.int32 if IS_INT else tl.float32)
        if QUANT == 1:
            w_s = tl.load(w2s_ptr + expert.to(tl.int64) * stride_2se + d * stride_2sd, mask=d_ok, other=0.0)
            y = y.to(tl.float32) * (h_scale[:, None] * w_s[None, :])
        if HAS_B2:
            b2 = tl.load(b2_ptr + expert.to(tl.int64) * stride_b2e + d * stride_b2d, mask=d < b2_cols, other=0.0)
            y += b2.to(tl.float32)[None, :]
        if WEIGHT_OUTPUT:
            y *= row_w[:, None]
        tl.atomic_add(sum_rows + d[None, :], y, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")


@triton.jit
def _cast_when_last(sum_ptr, done_ptr, out_ptr, NUMEL, NPROG):
    """The program to finish last (a counter at done_ptr, from zero) writes the fp32 sums as out's dtype. The
    barrier orders every thread's atomics before the counter's release; the sums are read from L2 (.cg), where
    the atomics were done."""
    tl.debug_barrier()
    if tl.atomic_add(done_ptr, 1, sem="acq_rel") == NPROG - 1:
        for z0 in range(0, NUMEL, 1024):
            z = z0 + tl.arange(0, 1024)
            total = tl.load(sum_ptr + z, mask=z < NUMEL, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + z, total.to(out_ptr.dtype.element_ty), mask=z < NUMEL)


@triton.jit
def _down_kernel(
    # pointers
    h_ptr, offsets_ptr, row_weights_ptr, w_ptr, bias_ptr, y_ptr, hs_ptr, ws_ptr, gather_ptr,
    # sizes
    D, F, E, R, NPROG,
    # strides
    stride_hr, stride_hf, stride_we, stride_wd, stride_wf, stride_be, stride_bd, stride_yr, stride_yd,
    stride_hsr, stride_hsb, stride_wse, stride_wsd, stride_wsb,
    # meta-parameters
    HAS_BIAS: tl.constexpr, WEIGHT_OUTPUT: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    QUANT: tl.constexpr, IS_INT: tl.constexpr, PACK: tl.constexpr, W_TMA: tl.constexpr, W_KMAJOR: tl.constexpr,
    SWAP: tl.constexpr, PERSISTENT: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    G: tl.constexpr, W2_BLOCK: tl.constexpr,
):  # fmt: skip
    e, lo_E, hi_E, real_tiles = _expert_bounds(offsets_ptr, E, BLOCK_M, BLOCK_E)
    num_pid_n = tl.cdiv(D, BLOCK_N)
    # the dropped rows [offsets[E], R) (dispatch puts dropped picks there) contribute nothing: zeros, first
    # (REDUCE: y is the tokens' out, which they are not added to)
    kept = tl.sum(tl.where(e == E - 1, hi_E, 0), axis=0)
    for z in range(tl.program_id(0), 0 if REDUCE else tl.cdiv(R - kept, BLOCK_M) * num_pid_n, NPROG):
        rows = kept + (z // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = (z % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yr + n[None, :] * stride_yd
        zeros = tl.zeros((BLOCK_M, BLOCK_N), y_ptr.dtype.element_ty)
        tl.store(y_ptrs, zeros, mask=(rows < R)[:, None] & (n < D)[None, :])
    # each program takes every NPROG-th real tile: one or none where the grid covers them all, a share where
    # PERSISTENT (a grid of two programs per SM, whose tile and K loops flatten into one, so that the next
    # tile's first loads are in flight during this one's last steps and epilogue)
    pid, tiles = tl.program_id(0), real_tiles * num_pid_n
    for i in tl.range(0, tl.cdiv(tiles - pid, NPROG) if PERSISTENT else 1, flatten=PERSISTENT):
        t = pid + i * NPROG
        if PERSISTENT or t < tiles:  # a grid of one program per tile may have more programs than tiles
            expert, start, end, pid_n = _tile(t, e, lo_E, hi_E, real_tiles, num_pid_n, BLOCK_M, GROUP_M)
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < D
            y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yr + n[None, :] * stride_yd
            if not W_TMA:
                k = tl.arange(0, BLOCK_K)
                a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + k[None, :] * stride_hf
                kw = tl.arange(0, BLOCK_K // PACK)  # int4_weight: bytes of two elements
                w_e = w_ptr + expert.to(tl.int64) * stride_we
                w_ptrs = w_e + _w2_offsets(kw[:, None], n[None, :], D, stride_wd, stride_wf, W2_BLOCK)
            ws_e = ws_ptr + expert.to(tl.int64) * stride_wse  # this expert's weight scales
            acc = _accumulator(BLOCK_M, BLOCK_N, IS_INT, SWAP)
            n_k = tl.cdiv(F, BLOCK_K)
            for k0 in range(0, n_k):
                k_left = F - k0 * BLOCK_K
                acc = _block_rescale(acc, hs_ptr, rows, stride_hsr, row_ok, ws_e, n, stride_wsd, n_ok, stride_hsb,
                                     stride_wsb, k0, QUANT, SWAP, BLOCK_K, G)  # fmt: skip
                if W_TMA:  # h's rows are contiguous: the rows past this expert's (the next expert's) are never stored
                    a = h_ptr.load([start.to(tl.int32), k0 * BLOCK_K])
                    if W2_BLOCK:  # [E, F / W2_BLOCK, D, W2_BLOCK]: a K-step within one column block
                        w = w_ptr.load([expert, (k0 * BLOCK_K) // W2_BLOCK, pid_n * BLOCK_N, (k0 * BLOCK_K) % W2_BLOCK])
                        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).T
                    else:
                        w = _weight_tile(
                            w_ptr, expert, pid_n * BLOCK_N, k0 * BLOCK_K, False, False, W_KMAJOR, BLOCK_K, BLOCK_N
                        )
                    acc = _mma(a, w, acc, PRECISION, SWAP)
                else:
                    a = tl.load(a_ptrs, mask=_tile_mask(row_ok, k < k_left, EVEN_K, False), other=0.0)
                    acc = _weight_mma(a, w_ptrs, n_ok, k_left, acc, ws_e, n, stride_wsd, k0, stride_wsb, EVEN_K, QUANT,
                                      PRECISION, BLOCK_K, G, SWAP)  # fmt: skip
                    a_ptrs += BLOCK_K * stride_hf
                    if W2_BLOCK:
                        w_ptrs = w_e + _w2_offsets((k0 + 1) * BLOCK_K + kw[:, None], n[None, :], D, stride_wd,
                                                   stride_wf, W2_BLOCK)  # fmt: skip
                    else:
                        w_ptrs += (BLOCK_K // PACK) * stride_wf
            if SWAP:
                acc = tl.trans(acc)
            acc = _dequantize(acc, hs_ptr, rows, stride_hsr, row_ok, ws_e, n, stride_wsd, n_ok, stride_hsb, stride_wsb,
                              n_k - 1, QUANT, BLOCK_K, G)  # fmt: skip
            if HAS_BIAS:
                b_ptrs = bias_ptr + expert.to(tl.int64) * stride_be + n * stride_bd
                acc += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if WEIGHT_OUTPUT:
                acc *= tl.load(row_weights_ptr + rows, mask=row_ok, other=0.0)[:, None]
            if REDUCE:  # y is out_ND: each row added into its token's, in the order the tiles finish
                tokens = tl.load(gather_ptr + rows, mask=row_ok, other=0).to(tl.int64)
                out_ptrs = y_ptr + tokens[:, None] * stride_yr + n[None, :] * stride_yd
                tl.atomic_add(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :],
                              sem="relaxed")  # fmt: skip
            else:
                tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _gate_up_rows(gate_up: str, gated: bool, F: int) -> tuple[int, int, int]:
    """(gate row, up row, row step) of column 0 in the H rows of w13 (or of w3 for "separate")."""
    if not gated or gate_up in ("concat", "separate"):
        return 0, F, 1
    if gate_up == "interleaved":
        return 0, 1, 2
    return F, 0, 1  # up_first


QUANT_CODES = {"none": 0, "fp8": 1, "int8": 1, "fp8_block": 2, "int4_weight": 3}
loads = collections.Counter()  # GEMM launches by operand path, e.g. "up/tma", "down/pointers+swap" (tests read it)


class Routing(NamedTuple):
    """What the fused decode kernel routes each pick by (`experts(routing=...)`): the router's logits_TE and the
    rest of `route`'s arguments (`route.route_meta`)."""

    logits: torch.Tensor
    bias: torch.Tensor | None
    k: int
    scoring: str
    order: str
    renormalize: bool
    n_group: int
    topk_group: int
    group_score_topk: int
    scale: float
    score_dtype: torch.dtype
    group_fill: float


# The routing meta-parameters under the up kernel's names (its own K and BLOCK_K are the GEMM's).
_ROUTED_NAMES = {"K": "TOP_K", "HAS_BIAS": "HAS_ROUTE_BIAS", "BLOCK_E": "BLOCK_ER", "BLOCK_K": "BLOCK_KR"}


def _choice(xq: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w2_transposed: bool, activation: str, R: int,
            quant: str, out_dtype: torch.dtype) -> tuple:  # fmt: skip
    """`tuning.choose`'s arguments for `experts` over R rows of xq's tokens: (E, D, F, K, gated, dtype, device, R,
    quant)."""
    gated, code = activation in GATED_ACTIVATIONS, QUANT_CODES[quant]
    D, F = (w2.shape[2], w2.shape[1]) if w2_transposed else (w2.shape[1], w2.shape[2])
    if code == 3 or w2.dim() == 4:  # w2's F packed two per byte, or in column blocks: F off the canonical w13
        D, F = quant_fmt.w2_out_features(w2, w2_transposed), w13.shape[1] // 2 if gated else w13.shape[1]
    dtype = xq.dtype if code == 0 else out_dtype
    return (w13.shape[0], D, F, R // max(xq.shape[0], 1), gated, dtype, xq.device, R, quant)


def routes_at(x_TD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w2_transposed: bool, activation: str, k: int,
              quant: str = "none", config: tuning.ExpertsConfig | None = None) -> bool:  # fmt: skip
    """Whether `experts(routing=...)` can run for x_TD's tokens (in the model's dtype), k picks each, under `quant`:
    the mode runs fused (`tuning.runs_fused`) and `config`, else the config chosen at this T (the one `experts`
    will choose), is fused."""
    if not tuning.runs_fused(quant):
        return False
    if config is None:
        config = tuning.choose(*_choice(x_TD, w13, w2, w2_transposed, activation, x_TD.shape[0] * k, quant,
                                        x_TD.dtype))  # fmt: skip
    return config.fused


def experts(
    xq: torch.Tensor,
    expert_offsets: torch.Tensor,
    gather_index: torch.Tensor,
    row_weights: torch.Tensor,
    w13: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    weight_at: str,
    activation: str,
    gate_up: str,
    w13_transposed: bool,
    w2_transposed: bool,
    alpha: float,
    limit: float,
    out_dtype: torch.dtype,
    config: tuning.ExpertsConfig | None = None,
    quant: str = "none",
    xscale: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    reduce: bool = False,
    routing: Routing | None = None,
    sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows xq_ND[gather_index_R], grouped by expert_offsets_E1 -> y_RD (see the `moe_fx::experts` contract).

    reduce: -> out_ND instead, each row's y (× its routing weight unless weight_at is "input") added into its
    token's row gather_index[r] by the down GEMM's epilogue, in out_dtype atomics (the up GEMM's programs write
    the zeros first): `combine` done without y's round trip through memory, in no fixed order.

    quant "fp8" | "int8" | "fp8_block": xq, w13, w2 and their scales in the formats of `quant.py`; both GEMMs
    run on e4m3 (fp32 accumulation) or int8 (int32) operands. The activation between them is quantised as
    the reference does: per 1×128 group in the up GEMM's epilogue (fp8_block, BLOCK_N = 128), per token
    otherwise, by `quantize.quantize_rows` on the activation stored in the model's dtype (a row's scale needs
    the whole row; as vLLM does, and half the bytes of an fp32 round trip). A fused config (fp8, int8) has no
    row's whole h in one program: the up epilogue quantises each row of its F-slice with its own scale, finer
    groups than the reference's, and the down slice dequantises its product by that scale and w2's.
    int4_weight (w4a16): each K-step loads its packed weight bytes once, unpacks them in registers to exact int4
    values in the activations' dtype and multiplies the even and odd K-columns of the activations by the low
    and high nibbles; the group scales multiply the K-step's partial product (decode tiles) or the weights
    (`_int4_mma`); the activations stay in their dtype throughout.
    `config` overrides the tuned/default block sizes (used by `tuning.tune`). Without it, a tuned config that
    does not compile on this GPU and Triton (out of shared memory or registers) gives way to the defaults, with
    a warning (`tuning.unfit`).

    routing (reduce, where `routes_at`: a fused config): no dispatch; xq is x_TD (under fp8 / int8 its rows
    quantised, `xscale` theirs: `quantize.quantize_rows`), each of its tokens routed by `routing` (the router's
    logits and `route`'s arguments) inside the fused kernel, whose program for pick p finds its expert by running
    the token's top-k itself (`route._route_row`); the three dispatch tensors are not read. `sums`: the fused
    kernel's fp32 sums and counter, int32 [T·D + 1] of zeros, where the caller zeroed them (the router's GEMV,
    `route.project(zero=...)`); else this call allocates and zeroes them.
    """
    call = dict(locals())  # the arguments, for a second run with the defaults
    if routing is not None:  # placeholders: the routing kernel reads none of the dispatch tensors
        expert_offsets = gather_index = row_weights = routing.logits
    if quant not in QUANT_CODES:
        raise NotImplementedError(f"moe_fx: triton experts runs quant in {tuple(QUANT_CODES)}, got {quant!r}")
    if quant != "none" and (w3 is not None or w13_scale is None or w2_scale is None):
        raise ValueError(f"moe_fx: quant={quant!r} experts take canonical w13 (no w3) and both weight scales")
    R = xq.shape[0] * routing.k if routing is not None else gather_index.shape[0]
    shape = _choice(xq, w13, w2, w2_transposed, activation, R, quant, out_dtype)  # `tuning.choose`'s arguments
    E, D, F, _, gated = shape[:5]
    w2_EDF = w2.transpose(1, 2) if w2_transposed else w2  # strides only
    code, G = QUANT_CODES[quant], quant_fmt.BLOCK
    w2_block = _column_blocks(w2, w2_transposed, code, D, F)
    # w2's (expert, D, F) strides: a blocked w2's D stride is its block width, its F stride 1 within a block
    w2_strides = (w2.stride(0), w2.stride(2), 1) if w2_block else w2_EDF.stride()
    h_dtype = {0: xq.dtype, 1: out_dtype, 2: xq.dtype, 3: xq.dtype}[code]  # 1: stored, then quantised per row
    h_RF = torch.empty((R, F), dtype=h_dtype, device=xq.device)  # (fused: never written)
    h_scale = torch.empty((R, cdiv(F, G)) if code == 2 else (0,), dtype=torch.float32, device=xq.device)
    y = torch.empty((xq.shape[0] if reduce else R, D), dtype=out_dtype, device=xq.device)  # y_RD, or out_ND
    if R == 0:
        return y.zero_()
    chosen = None  # `tuning.choose`'s config, where it chose
    if config is None:
        config = chosen = tuning.choose(*shape)
    try:
        config = tuning.conform(config, quant)
        w13_EHD = w13.transpose(1, 2) if w13_transposed else w13
        gate_row, up_row, step = _gate_up_rows(gate_up, gated, F)
        bias_gate, bias_up = gate_row, up_row
        c = config.up
        interleaved = gated and gate_up == "interleaved"
        wg = None
        if _tma_fits(c, code, xq.device) and not (gated and gate_up == "separate"):
            wg = _weight_descriptor(w13, gated, interleaved, not w13_transposed, c)
        up_tma = wg is not None
        up_first = up_tma and gated and gate_up == "up_first"
        if up_first:  # the descriptor's tile holds the halves as stored; the kernel swaps them after the K loop
            gate_row, up_row = 0, F
        wu = w13_EHD
        if gate_up == "separate" and gated:
            wu = w3.transpose(1, 2) if w13_transposed else w3
            up_row = 0
            if wu.stride(2) != w13_EHD.stride(2):  # one K-stride for the whole weight tile
                w13_EHD, wu = w13_EHD.contiguous(), wu.contiguous()
        precision = "ieee" if xq.dtype == torch.float32 or code in (1, 2) else "tf32"
        is_int = quant == "int8"
        BLOCK_E = next_power_of_2(E)
        bias13 = w13_bias if w13_bias is not None else w13
        xs = _scale_strides(xscale, row_weights)
        ws13, ws2 = _scale_strides(w13_scale, row_weights), _scale_strides(w2_scale, row_weights)
        bias2 = w2_bias if w2_bias is not None else w2
        weight_output = weight_at == "output" or (reduce and weight_at == "none")
        fused = config.fused and reduce and tuning.runs_fused(quant)
        if routing is not None and not fused:
            raise ValueError(f"moe_fx: experts routes its picks in a fused config only, got {tuning.describe(config)}")
        # fused: the F-slices' fp32 partial sums sum_TD, then the count of programs done (int32, the last element);
        # otherwise the kernel never reads them (row_weights stands in: no allocation, no fill)
        sum_TD, done = row_weights, gather_index
        if fused:
            if sums is None:
                sums = torch.zeros((y.numel() + 1,), dtype=torch.int32, device=xq.device)
            sum_TD, done = sums[:-1].view(torch.float32), sums[-1:]
        loads[load_path("routed" if routing is not None else "fused" if fused else "up", up_tma, c)] += 1
        grid, route_args, route_kw = _programs(c, R, E, F, xq.device), (row_weights,) * 2 + (0, 1, 1.0, 0.0, 0, 0), {}
        if routing is not None:  # a program per F-slice of each pick, which routes its token itself
            r, logits = routing, routing.logits
            grid = R * cdiv(F, c.block_n)
            route_args = (logits, r.bias if r.bias is not None else logits, R, logits.shape[1] // max(r.n_group, 1),
                          float(r.scale), float(r.group_fill), logits.stride(0), logits.stride(1))  # fmt: skip
            meta = route_meta(logits.shape[1], r.bias, r.k, r.scoring, r.order, r.renormalize, r.n_group,
                              r.topk_group, r.group_score_topk, r.score_dtype)  # fmt: skip
            route_kw = dict(ROUTED=True, ROUTE_COPIES=c.num_warps,
                            **{_ROUTED_NAMES.get(name, name): value for name, value in meta.items()})  # fmt: skip
        launch(
            _up_kernel, (grid,),
            xq, gather_index, expert_offsets, row_weights, wg if up_tma else w13_EHD, wu, bias13, h_RF, xs[0], ws13[0],
            h_scale if code == 2 else row_weights, y, w2, bias2, ws2[0], sum_TD, done,
            D, F, E, grid, float(alpha), float(limit), y.numel() if reduce else 0,
            gate_row, up_row, step, bias_gate, bias_up,
            xq.stride(0), xq.stride(1), w13_EHD.stride(0), w13_EHD.stride(1), w13_EHD.stride(2),
            wu.stride(0), wu.stride(1),
            bias13.stride(0), bias13.stride(-1), h_RF.stride(0), h_RF.stride(1),
            xs[1], xs[2], ws13[1], ws13[2], ws13[3], h_scale.stride(0),
            *w2_strides, bias2.stride(0), bias2.stride(-1), ws2[1], ws2[2],
            *route_args,
            GATED=gated, ACT=ACTIVATION_CODES[activation], HAS_BIAS=w13_bias is not None,
            WEIGHT_INPUT=weight_at == "input", EVEN_K=D % c.block_k == 0, PRECISION=precision,
            QUANT=code, QMAX=quant_fmt.QMAX.get(quant, 1.0), IS_INT=is_int, PACK=2 if code == 3 else 1,
            INTERLEAVED=interleaved, SEPARATE=gated and gate_up == "separate", W_TMA=up_tma,
            W_KMAJOR=not w13_transposed, UP_FIRST=up_first, SWAP=c.swap_ab, PERSISTENT=c.persistent,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_E=BLOCK_E, GROUP_M=c.group_m, G=G,
            ZERO_OUT=reduce and not fused, FUSED=fused, HAS_B2=w2_bias is not None, WEIGHT_OUTPUT=weight_output,
            BLOCK_D=config.down.block_n, W2_BLOCK=w2_block, **route_kw, num_warps=c.num_warps,
            num_stages=c.num_stages,
        )  # fmt: skip
        if fused:
            return y
        if code == 1:
            h_RF, h_scale = quantize.quantize_rows(h_RF, quant)
        hs = _scale_strides(h_scale, row_weights)
        c = config.down
        h_in = w_in = None
        if _tma_fits(c, code, xq.device):
            k_major = not w2_transposed
            h_in = _descriptor(h_RF, list(h_RF.shape), list(h_RF.stride()), [c.block_m, c.block_k])
            w_in = _blocked_descriptor(w2, c) if w2_block else _weight_descriptor(w2, False, False, k_major, c)
        down_tma = h_in is not None and w_in is not None
        if not down_tma:
            h_in, w_in = h_RF, w2_EDF
        loads[load_path("down", down_tma, c)] += 1
        grid = _programs(c, R, E, D, xq.device)
        launch(
            _down_kernel, (grid,),
            h_in, expert_offsets, row_weights, w_in, bias2, y, hs[0], ws2[0], gather_index,
            D, F, E, R, grid,
            h_RF.stride(0), h_RF.stride(1), *w2_strides,
            bias2.stride(0), bias2.stride(-1), y.stride(0), y.stride(1),
            hs[1], hs[2], ws2[1], ws2[2], ws2[3],
            HAS_BIAS=w2_bias is not None, WEIGHT_OUTPUT=weight_output,
            EVEN_K=F % c.block_k == 0,
            PRECISION=precision, QUANT=code, IS_INT=is_int, PACK=2 if code == 3 else 1, W_TMA=down_tma,
            W_KMAJOR=not w2_transposed, SWAP=c.swap_ab, PERSISTENT=c.persistent, REDUCE=reduce,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_E=BLOCK_E, GROUP_M=c.group_m, G=G,
            W2_BLOCK=w2_block, num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip
        return y
    except triton.runtime.errors.OutOfResources as err:  # a chosen tuned config this GPU and Triton cannot compile
        fallback = None if chosen is None else tuning.unfit(chosen, err, *shape)
        if fallback is None or fallback == chosen or routing is not None:  # given, or the default (a config the
            raise  # tests compile), or routed (a fused config only: the caller then runs route and dispatch)
        args = {name: value for name, value in call.items() if name != "config"}
        return experts(**args, config=fallback)


def load_path(gemm: str, tma: bool, c: tuning.GemmConfig) -> str:
    """The `loads` key of one launch: the GEMM, how its operands load, whether the dot's operands are swapped,
    whether its programs are persistent."""
    return f"{gemm}/{'tma' if tma else 'pointers'}{'+swap' if c.swap_ab else ''}{'+persistent' if c.persistent else ''}"


def _programs(c: tuning.GemmConfig, R: int, E: int, N: int, device: torch.device) -> int:
    """The grid of a GEMM over N output columns: a program per tile that may do work (M-tiles: at most
    cdiv(R, BLOCK_M) + min(E, R), as at most R experts are hit and each adds at most one partial tile; the
    dropped rows' zero tiles are fewer), sized without reading the offsets (no host sync). Persistent: two
    programs per SM (one where a program's shared memory fills an SM; a second one then takes the other half
    of the tiles), each taking every grid-th tile; three in the interpreter, so that a program takes several."""
    tiles = (cdiv(R, c.block_m) + min(E, R)) * cdiv(N, c.block_n)
    if c.persistent:
        sms = tuning.sm_count(device)  # None off CUDA
        return min(tiles, 2 * sms if sms else 3)
    return tiles


def _tma_fits(c: tuning.GemmConfig, code: int, device: torch.device) -> bool:
    """Whether a GEMM may load through TMA descriptors: the config asks for it, the operands are not
    int4-packed, and the device has the copy engine (sm90+; the interpreter emulates it)."""
    if not c.tma or code == 3:
        return False
    return tuning.interpreting() or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def _descriptor(t: torch.Tensor, shape: list, strides: list, block: list) -> TensorDescriptor | None:
    """A descriptor of the view (shape, strides) of t, or None where the copy engine can't address it (a base
    or a stride not a multiple of 16 bytes, a last stride other than 1)."""
    fits = t.data_ptr() % 16 == 0 and strides[-1] == 1 and all(s * t.element_size() % 16 == 0 for s in strides[:-1])
    return TensorDescriptor(t, shape, strides, block) if fits else None


def _weight_descriptor(w: torch.Tensor, gated: bool, interleaved: bool, k_major: bool, c: tuning.GemmConfig):
    """A descriptor over an expert weight as stored, [E, N, K] (k_major) or [E, K, N], whose block is one
    K-step's weight tile of `_weight_tile`: a gated weight's N = 2F is split into its gate and up halves,
    [2, F] (the tile takes the N-tile's rows of each) or [F, 2] (interleaved: adjacent pairs), so that the
    copy engine zero-fills past F and past K (never the next expert's rows). None where it doesn't fit."""
    E, s_e = w.shape[0], w.stride(0)
    bn, bk = c.block_n, c.block_k
    if k_major:
        N, K = w.shape[1], w.shape[2]
        s_n = w.stride(1)
        if gated and interleaved:
            return _descriptor(w, [E, N // 2, 2, K], [s_e, 2 * s_n, s_n, w.stride(2)], [1, bn, 2, bk])
        if gated:
            return _descriptor(w, [E, 2, N // 2, K], [s_e, (N // 2) * s_n, s_n, w.stride(2)], [1, 2, bn, bk])
        return _descriptor(w, [E, N, K], list(w.stride()), [1, bn, bk])
    K, N = w.shape[1], w.shape[2]
    if gated and not interleaved:
        return _descriptor(w, [E, K, 2, N // 2], [s_e, w.stride(1), (N // 2) * w.stride(2), w.stride(2)],
                           [1, bk, 2, bn])  # fmt: skip
    return _descriptor(w, [E, K, N], list(w.stride()), [1, bk, 2 * bn if gated else bn])


def _column_blocks(w2: torch.Tensor, w2_transposed: bool, code: int, D: int, F: int) -> int:
    """The width of w2's column blocks (`quant.block_columns`: [E, ceil(F / width), D, width], each expert's
    blocks contiguous), or 0 for a w2 stored [E, D, F] (or transposed)."""
    if w2.dim() != 4:
        return 0
    E, blocks, D_, width = w2.shape
    contiguous = w2.stride()[2:] == (width, 1) and (blocks == 1 or w2.stride(1) == D * width)
    if w2_transposed or code in (2, 3) or D_ != D or blocks * width < F or not contiguous:
        raise ValueError(
            f"moe_fx: a w2 in column blocks is [E, ceil(F/width), D, width] with each expert's blocks contiguous, "
            f"not transposed, under quant none, fp8 or int8; got shape {tuple(w2.shape)}, strides {w2.stride()}, "
            f"w2_transposed={w2_transposed} for D={D}, F={F}"
        )
    return width


def _blocked_descriptor(w2: torch.Tensor, c: tuning.GemmConfig) -> TensorDescriptor | None:
    """A descriptor over w2 in column blocks whose box is one K-step's [BLOCK_N, BLOCK_K] tile within one block;
    None where a K-step would span two blocks (the pointer path reads those)."""
    if w2.shape[3] % c.block_k:
        return None
    return _descriptor(w2, list(w2.shape), list(w2.stride()), [1, 1, c.block_n, c.block_k])


def _scale_strides(scale: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """(scale, its strides padded to 3 with 0): [N], [N, B], [E, H] or [E, Hb, B]; `dummy` when unquantised."""
    if scale is None or scale.numel() == 0:
        return dummy, 0, 0, 0
    return (scale, *scale.stride(), *(0,) * (3 - scale.dim()))
