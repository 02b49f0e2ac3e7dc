"""Triton `experts` kernels: two grouped GEMMs over rows grouped by expert, gather and activation fused.

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

Gate/up layouts are pointer arithmetic: the gate of column n is w13 row GATE_ROW + n·ROW_STEP and the
up is UP_ROW + n·ROW_STEP of w13 (or of w3 when "separate"); transposed storage only swaps strides.
A gated up GEMM runs ONE dot per K-step over a [BLOCK_K, 2·BLOCK_N] weight tile and splits the accumulator
into gate and up after the K loop: one code path for every layout (against two dots per K-step it measured
0.92-1.03x on an H200, bench/NOTES.md). The tile's columns are the N-tile's gate rows then its up rows
("blocked"), or, for interleaved gate/up (GPT-OSS), the 2·BLOCK_N adjacent rows as stored (strided-by-2 loads
of transposed storage would not vectorise).

The building blocks (tile schedule, loads, MMA, scales) are `gemm_tiles`'; the launcher is `grouped_gemm`.
"""

import triton
import triton.language as tl

from moe_fx.lowering.triton.gemm_tiles import (
    _accumulator,
    _block_rescale,
    _dequantize,
    _expert_bounds,
    _mma,
    _tile,
    _tile_mask,
    _w2_offsets,
    _weight_mma,
    _weight_tile,
)
from moe_fx.lowering.triton.quantize import _quantize_tile
from moe_fx.lowering.triton.route import _route_row

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
