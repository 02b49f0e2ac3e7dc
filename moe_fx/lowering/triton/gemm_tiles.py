"""The experts kernels' building blocks: the tile schedule, masks, weight-tile loads (pointers, TMA descriptors,
w2 in column blocks), the MMA (swapped operands, int4 unpacked in registers) and the quantised scales.

Tiles: expert e owns cdiv(rows_e, BLOCK_M) M-tiles; the real tiles are numbered in grouped order (GROUP_M
M-tiles share an N-column) so weight tiles and A rows are reused from L2, and a program finds a tile's expert
from expert_offsets with a cumsum over E, in registers. The grid is sized without a host sync: by default
one program per tile that may exist, cdiv(R, BLOCK_M) + min(E, R) M-tiles (at most R experts have rows, each
adds at most one partial tile) times the N-tiles, the programs past the real tiles doing nothing; or, for a
`persistent` config, two programs per SM, each taking every grid-th tile in one loop that Triton flattens
with the K loop (the next tile's first loads in flight during this one's last K-steps and epilogue). The down
GEMM's programs first write zeros over the dropped rows [offsets[E], R), where dispatch puts dropped picks.

fp8_block (scales per 128-deep K-block) keeps the accumulator in units of the current K-block's scale, so
the dot accumulates in place: acc = dot(a_k, b_k, acc · s_{k-1} / s_k), times s_last after the loop. A
partial product per K-step (acc += dot(a_k, b_k) · s_k) would hold a second accumulator-sized tile. Each
K-step loads both its own and the previous step's block scales (one weight scale per column; the previous
ones hit L1) before its MMA; no scale vector is carried through the loop. Checked on an H200 (2026-12-05,
bench/NOTES.md). The K-loops that loaded the next K-block's scales after the MMA (per column, or two scalars
per run of 128 columns) were right in the interpreter and wrong on an H100 and an H200.
"""

import triton
import triton.language as tl

from moe_fx.lowering.triton import tuning


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
def _w2_offsets(f, d, D, stride_2d, stride_2f, W2_BLOCK: tl.constexpr):
    """Offsets of the elements (d, f) (broadcast) within one expert's w2: [D, F] as strided, or (W2_BLOCK > 0)
    in column blocks, [ceil(F / W2_BLOCK), D, W2_BLOCK] contiguous (`quant.block_columns`)."""
    if W2_BLOCK:
        return (f // W2_BLOCK) * (D * W2_BLOCK) + d * W2_BLOCK + f % W2_BLOCK
    else:
        return f * stride_2f + d * stride_2d
