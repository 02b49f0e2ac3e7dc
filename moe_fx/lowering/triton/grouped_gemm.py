"""Triton `experts`: two grouped GEMMs over rows grouped by expert, gather and activation fused.

Legend: T tokens, D model dim, F expert ffn dim, E experts, R routed rows, H = 2F (gated) or F.

    up:   h_RF = act(x[gather_index] · w13[e]ᵀ + b13[e])    gather fused into the A loads, act in the epilogue
    down: y_RD = (h_RF · w2[e]ᵀ + b2[e]) · row_weight?      routing weight fused into the epilogue

Tiles: expert e owns cdiv(rows_e, BLOCK_M) M-tiles. The grid is sized by the static upper bound
cdiv(R, BLOCK_M) + E M-tiles (no host sync; programs past the last real tile exit), times the N-tiles,
in grouped order (GROUP_M M-tiles share an N-column) so weight tiles and A rows are reused from L2.
Each program finds its expert from expert_offsets with a cumsum over E, in registers.

Gate/up layouts are pointer arithmetic: the gate of column n is w13 row GATE_ROW + n·ROW_STEP and the
up is UP_ROW + n·ROW_STEP of w13 (or of w3 when "separate"); transposed storage only swaps strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_fx.lowering.triton import tuning
from moe_fx.spec import GATED_ACTIVATIONS

ACTIVATION_CODES = {
    "silu_gated": 0, "gelu_gated": 1, "gelu_tanh_gated": 2, "clamped_swiglu": 3,
    "relu": 4, "gelu": 5, "gelu_tanh": 6, "silu": 7,
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
    else:
        return gate * tl.sigmoid(gate)


@triton.jit
def _tile(offsets_ptr, E, num_pid_m, num_pid_n,
          BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """This program's (expert, first row, row end, N-tile); expert = -1 past the last real M-tile."""
    pid = tl.program_id(0)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    e = tl.arange(0, BLOCK_E)
    lo_E = tl.load(offsets_ptr + e, mask=e < E, other=0)
    hi_E = tl.load(offsets_ptr + e + 1, mask=e < E, other=0)
    tiles_E = (hi_E - lo_E + BLOCK_M - 1) // BLOCK_M
    tile_end_E = tl.cumsum(tiles_E, axis=0)
    expert = tl.sum((tile_end_E <= pid_m).to(tl.int32), axis=0)
    mine = e == expert
    start = tl.sum(tl.where(mine, lo_E + (pid_m - (tile_end_E - tiles_E)) * BLOCK_M, 0), axis=0)
    end = tl.sum(tl.where(mine, hi_E, 0), axis=0)
    expert = tl.where(pid_m < tl.sum(tiles_E, axis=0), expert, -1)
    return expert, start, end, pid_n


@triton.jit
def _up_kernel(
    # pointers
    x_ptr, gather_ptr, offsets_ptr, row_weights_ptr, wg_ptr, wu_ptr, bias_ptr, h_ptr,
    # sizes
    D, F, E, num_pid_m, alpha, limit,
    GATE_ROW, UP_ROW, ROW_STEP, BIAS_GATE, BIAS_UP,
    # strides
    stride_xt, stride_xd, stride_we, stride_wh, stride_wd, stride_ue, stride_uh, stride_ud,
    stride_be, stride_bh, stride_hr, stride_hf,
    # meta-parameters
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHT_INPUT: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    expert, start, end, pid_n = _tile(offsets_ptr, E, num_pid_m, tl.cdiv(F, BLOCK_N), BLOCK_M, BLOCK_E, GROUP_M)
    if expert < 0:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(gather_ptr + rows, mask=row_ok, other=0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < F
    k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + k[None, :] * stride_xd
    g_ptrs = wg_ptr + expert.to(tl.int64) * stride_we + k[:, None] * stride_wd
    g_ptrs += (GATE_ROW + n * ROW_STEP)[None, :] * stride_wh
    u_ptrs = wu_ptr + expert.to(tl.int64) * stride_ue + k[:, None] * stride_ud
    u_ptrs += (UP_ROW + n * ROW_STEP)[None, :] * stride_uh
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, tl.cdiv(D, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = k < D - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        if GATED:
            if EVEN_K:
                u = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
            u_ptrs += BLOCK_K * stride_ud
        a_ptrs += BLOCK_K * stride_xd
        g_ptrs += BLOCK_K * stride_wd
    if WEIGHT_INPUT:
        row_w = tl.load(row_weights_ptr + rows, mask=row_ok, other=0.0)[:, None]
        acc_g *= row_w
        acc_u *= row_w
    if HAS_BIAS:
        b_ptrs = bias_ptr + expert.to(tl.int64) * stride_be
        b_gate = tl.load(b_ptrs + (BIAS_GATE + n * ROW_STEP) * stride_bh, mask=n_ok, other=0.0)
        acc_g += b_gate.to(tl.float32)[None, :]
        if GATED:
            b_up = tl.load(b_ptrs + (BIAS_UP + n * ROW_STEP) * stride_bh, mask=n_ok, other=0.0)
            acc_u += b_up.to(tl.float32)[None, :]
    h = _activate(acc_g, acc_u, alpha, limit, ACT)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + n[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    # pointers
    h_ptr, offsets_ptr, row_weights_ptr, w_ptr, bias_ptr, y_ptr,
    # sizes
    D, F, E, num_pid_m,
    # strides
    stride_hr, stride_hf, stride_we, stride_wd, stride_wf, stride_be, stride_bd, stride_yr, stride_yd,
    # meta-parameters
    HAS_BIAS: tl.constexpr, WEIGHT_OUTPUT: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    expert, start, end, pid_n = _tile(offsets_ptr, E, num_pid_m, tl.cdiv(D, BLOCK_N), BLOCK_M, BLOCK_E, GROUP_M)
    if expert < 0:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D
    k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + k[None, :] * stride_hf
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + k[:, None] * stride_wf + n[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, tl.cdiv(F, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = k < F - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_hf
        w_ptrs += BLOCK_K * stride_wf
    if HAS_BIAS:
        b_ptrs = bias_ptr + expert.to(tl.int64) * stride_be + n * stride_bd
        acc += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if WEIGHT_OUTPUT:
        acc *= tl.load(row_weights_ptr + rows, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yr + n[None, :] * stride_yd
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _gate_up_rows(gate_up: str, gated: bool, F: int) -> tuple[int, int, int]:
    """(gate row, up row, row step) of column 0 in the H rows of w13 (or of w3 for "separate")."""
    if not gated or gate_up in ("concat", "separate"):
        return 0, F, 1
    if gate_up == "interleaved":
        return 0, 1, 2
    return F, 0, 1  # up_first


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
) -> torch.Tensor:
    """Rows xq_ND[gather_index_R], grouped by expert_offsets_E1 -> y_RD (see the `moe_fx::experts` contract).

    `config` overrides the tuned/default block sizes (used by `tuning.tune`).
    """
    R, E = gather_index.shape[0], w13.shape[0]
    w2_EDF = w2.transpose(1, 2) if w2_transposed else w2  # strides only
    D, F = w2_EDF.shape[1], w2_EDF.shape[2]
    gated = activation in GATED_ACTIVATIONS
    h_RF = torch.empty((R, F), dtype=xq.dtype, device=xq.device)
    y_RD = torch.empty((R, D), dtype=out_dtype, device=xq.device)
    if R == 0:
        return y_RD
    if config is None:
        config = tuning.choose(E, D, F, R // max(xq.shape[0], 1), gated, xq.dtype, xq.device, R)
    w13_EHD = w13.transpose(1, 2) if w13_transposed else w13
    gate_row, up_row, step = _gate_up_rows(gate_up, gated, F)
    bias_gate, bias_up = gate_row, up_row
    wu = w13_EHD
    if gate_up == "separate" and gated:
        wu = w3.transpose(1, 2) if w13_transposed else w3
        up_row = 0
    precision = "ieee" if xq.dtype == torch.float32 else "tf32"
    BLOCK_E = triton.next_power_of_2(E)
    bias13 = w13_bias if w13_bias is not None else w13
    c = config.up
    num_pid_m = triton.cdiv(R, c.block_m) + E
    _up_kernel[(num_pid_m * triton.cdiv(F, c.block_n),)](
        xq, gather_index, expert_offsets, row_weights, w13_EHD, wu, bias13, h_RF,
        D, F, E, num_pid_m, float(alpha), float(limit),
        gate_row, up_row, step, bias_gate, bias_up,
        xq.stride(0), xq.stride(1), w13_EHD.stride(0), w13_EHD.stride(1), w13_EHD.stride(2),
        wu.stride(0), wu.stride(1), wu.stride(2),
        bias13.stride(0), bias13.stride(-1), h_RF.stride(0), h_RF.stride(1),
        GATED=gated, ACT=ACTIVATION_CODES[activation], HAS_BIAS=w13_bias is not None,
        WEIGHT_INPUT=weight_at == "input", EVEN_K=D % c.block_k == 0, PRECISION=precision,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_E=BLOCK_E, GROUP_M=c.group_m,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip
    bias2 = w2_bias if w2_bias is not None else w2
    c = config.down
    num_pid_m = triton.cdiv(R, c.block_m) + E
    _down_kernel[(num_pid_m * triton.cdiv(D, c.block_n),)](
        h_RF, expert_offsets, row_weights, w2_EDF, bias2, y_RD,
        D, F, E, num_pid_m,
        h_RF.stride(0), h_RF.stride(1), w2_EDF.stride(0), w2_EDF.stride(1), w2_EDF.stride(2),
        bias2.stride(0), bias2.stride(-1), y_RD.stride(0), y_RD.stride(1),
        HAS_BIAS=w2_bias is not None, WEIGHT_OUTPUT=weight_at == "output", EVEN_K=F % c.block_k == 0,
        PRECISION=precision, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_E=BLOCK_E,
        GROUP_M=c.group_m, num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip
    return y_RD
