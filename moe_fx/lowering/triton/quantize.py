"""Triton dynamic activation quantisation: `quant.quantize_rows` (fp8, fp8_block, int8) as kernels.

Legend: N rows, D columns, G = BLOCK (128) columns per group, B = ceil(D / G) groups.

    fp8 / int8:  scale_N  = max(amax |x[n, :]|, 1e-12) / qmax,         q = cast(x / scale)
    fp8_block:   scale_NB = max(amax |x[n, bG:(b+1)G]|, 1e-12) / qmax, q = cast(x / scale) per group

One program per block of rows (per token), or per (block of rows, group) (fp8_block). A row of at most
ONE_TILE_MAX columns is read once, as one register tile; a longer one twice (its amax, then its values). A
row's scale reads that row alone, so a NaN or Inf in one token never reaches another token's scale.
`_quantize_tile` is the same arithmetic on a [BLOCK_M, G] register tile: the grouped GEMM calls it in its
epilogue to quantise the activation between the GEMMs (fp8_block). The arithmetic matches the torch
reference bit for bit: the same fp32 division, e4m3 rounds to nearest even (saturated by the clamp),
int8 rounds half to even.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moe_fx.lowering import quant as quant_fmt
from moe_fx.lowering.triton.launch import launch
from moe_fx.lowering.triton.sizes import cdiv, next_power_of_2
from moe_fx.lowering.triton.tuning import interpreting

MODES = ("fp8", "fp8_block", "int8")
ONE_TILE_MAX = 16384  # columns: a row this long is one register tile (16 warps, 32 values per thread)
_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + _RNE) - _RNE rounds an fp32 |v| < 2**22 half to even


@triton.jit
def _round_e4m3(v):
    """fp32 v -> the nearest e4m3 value (half to even), still fp32: ulp 2^(exponent - 3), 2^-9 when subnormal.

    Adding and subtracting 1.5 * 2^(log2 ulp + 23) rounds to that ulp in fp32. The fp8 cast that follows is
    then exact (the interpreter's own cast drops the carry of a round-up into the next binade)."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp_log2 = tl.maximum(exponent, -6) - 3
    magic = (((ulp_log2 + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (v + magic) - magic


@triton.jit
def _cast(v, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """v / scale -> e4m3 or int8 values, as quant._cast (clamp, then round half to even)."""
    v = tl.minimum(tl.maximum(v, -QMAX, propagate_nan=tl.PropagateNan.ALL), QMAX, propagate_nan=tl.PropagateNan.ALL)
    if IS_INT:
        return ((v + _RNE) - _RNE).to(tl.int8)
    else:
        return _round_e4m3(v).to(tl.float8e4nv)


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _scale(amax, QMAX: tl.constexpr):
    return _nan_max(amax, 1e-12) / QMAX


@triton.jit
def _quantize_tile(x, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """x [M, G] fp32 (padding columns zero) -> (q [M, G], scale [M]): one scale per row of the tile."""
    amax = tl.reduce(tl.abs(x), 1, _nan_max)
    scale = _scale(amax, QMAX)
    return _cast(x / scale[:, None], QMAX, IS_INT), scale


@triton.jit
def _quantize_block(
    x_ptr, q_ptr, scale_ptr, N, D, stride_xn, stride_qn, stride_sn, row_block, col_tile,
    QMAX: tl.constexpr, IS_INT: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows row_block·BLOCK_N + [0, BLOCK_N) of x quantised into q and scale (column tile col_tile: a group, or
    the whole row when ONE_TILE)."""
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qn
    if ONE_TILE:  # a group (BLOCK_D == G), or the whole row (one tile)
        cols = col_tile * BLOCK_D + d
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        q, scale = _quantize_tile(x, QMAX, IS_INT)
        tl.store(q_rows + cols[None, :], q, mask=mask)
        tl.store(scale_ptr + rows * stride_sn + col_tile, scale, mask=row_ok)
    else:
        amax = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = row_ok[:, None] & (d0 + d < D)[None, :]
            x = tl.load(x_rows + (d0 + d)[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = _nan_max(amax, tl.abs(x))
        scale = _scale(tl.reduce(amax, 1, _nan_max), QMAX)
        for d0 in range(0, D, BLOCK_D):
            mask = row_ok[:, None] & (d0 + d < D)[None, :]
            x = tl.load(x_rows + (d0 + d)[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + (d0 + d)[None, :], _cast(x / scale[:, None], QMAX, IS_INT), mask=mask)
        tl.store(scale_ptr + rows * stride_sn, scale, mask=row_ok)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, N, D, stride_xn, stride_qn, stride_sn,
    QMAX: tl.constexpr, IS_INT: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    _quantize_block(x_ptr, q_ptr, scale_ptr, N, D, stride_xn, stride_qn, stride_sn, tl.program_id(0),
                    tl.program_id(1), QMAX, IS_INT, ONE_TILE, BLOCK_N, BLOCK_D)  # fmt: skip


def qdtype(mode: str) -> torch.dtype:
    return quant_fmt.activation_dtype(mode, torch.float32)


class RowTiling(NamedTuple):
    """How `_quantize_block` covers N rows of D columns: BLOCK_N rows by BLOCK_D columns a program, col_tiles
    column tiles a block of rows (fp8_block's groups, else one)."""

    one_tile: bool
    block_n: int
    block_d: int
    col_tiles: int
    num_warps: int

    def programs(self, N: int) -> int:
        return cdiv(N, self.block_n) * self.col_tiles


def row_tiling(D: int, mode: str) -> RowTiling:
    """The tiling of `mode` (one of MODES)."""
    G = quant_fmt.BLOCK
    grouped = mode == "fp8_block"
    one_tile = grouped or D <= ONE_TILE_MAX
    block_d = G if grouped else next_power_of_2(max(D, 16)) if one_tile else 1024
    block_n = 16 if interpreting() else max(1, 2048 // block_d)  # few programs for the interpreter
    warps = min(16, max(4, block_n * block_d // 1024))  # <= 32 fp32 values per thread
    return RowTiling(one_tile, block_n, block_d, cdiv(D, G) if grouped else 1, warps)


def row_constexprs(mode: str, tiling: RowTiling) -> dict:
    """The constexprs of `_quantize_block` for `mode` (one of MODES)."""
    return dict(QMAX=quant_fmt.QMAX[mode], IS_INT=mode == "int8", ONE_TILE=tiling.one_tile, BLOCK_N=tiling.block_n,
                BLOCK_D=tiling.block_d)  # fmt: skip


def new_rows(x_ND: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (xq_ND, x_scale) for `quantize_rows(x_ND, mode)`."""
    N, D = x_ND.shape
    shape = (N, cdiv(D, quant_fmt.BLOCK)) if mode == "fp8_block" else (N,)
    return torch.empty((N, D), dtype=qdtype(mode), device=x_ND.device), x_ND.new_empty(shape, dtype=torch.float32)


def quantize_rows(x_ND: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x_ND (float) -> (xq_ND e4m3/int8, x_scale fp32 [N] or [N, B]), as `quant.quantize_rows`."""
    if mode not in MODES:
        raise ValueError(f"moe_fx: triton quantize_rows runs {MODES}, got quant={mode!r}")
    x_ND = x_ND if x_ND.stride(-1) == 1 else x_ND.contiguous()
    N, D = x_ND.shape
    xq, scale = new_rows(x_ND, mode)
    if N == 0 or D == 0:
        return xq, scale.fill_(1.0)
    tiling = row_tiling(D, mode)
    launch(
        _quantize_rows_kernel, (cdiv(N, tiling.block_n), tiling.col_tiles),
        x_ND, xq, scale, N, D, x_ND.stride(0), xq.stride(0), scale.stride(0),
        **row_constexprs(mode, tiling), num_warps=tiling.num_warps,
    )  # fmt: skip
    return xq, scale
