"""Triton `combine` (one device): out_TD = Σ_k weight[t, k] · y[row of slot (t, k)], fp32 accumulation.

Legend: T tokens, D model dim, K top-k, R = T*K rows.

`row_index_R` maps row -> slot; `_combine_kernel` gathers each token's K rows in slot order, so the
sum is deterministic. It needs the inverse map (slot -> row): for R <= SEARCH_MAX (decode) each program
finds its K rows by comparing against all of row_index in registers; above, `_invert_kernel` scatters
the inverse first (one more launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_fx.lowering.triton.launch import launch
from moe_fx.lowering.triton.sizes import cdiv, next_power_of_2

SEARCH_MAX = 1024  # rows up to which combine finds each slot's row by comparison instead of inverting


@triton.jit
def _invert_kernel(row_index_ptr, slot_row_ptr, R, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slots = tl.load(row_index_ptr + r, mask=r < R, other=0)
    tl.store(slot_row_ptr + slots, r.to(tl.int64), mask=r < R)


@triton.jit
def _combine_kernel(
    # pointers
    y_ptr, weights_ptr, slot_row_ptr, row_index_ptr, out_ptr,
    # sizes
    D, R,
    # strides
    stride_yr, stride_yd, stride_ot, stride_od,
    # meta-parameters
    K: tl.constexpr, WEIGHTED: tl.constexpr, SEARCH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    if SEARCH:
        r = tl.arange(0, BLOCK_R)
        slots_R = tl.load(row_index_ptr + r, mask=r < R, other=-1)
    for k in tl.static_range(K):
        if SEARCH:
            row = tl.sum(tl.where(slots_R == t * K + k, r, 0), axis=0).to(tl.int64)
        else:
            row = tl.load(slot_row_ptr + t * K + k)
        y = tl.load(y_ptr + row * stride_yr + d * stride_yd, mask=d_ok, other=0.0).to(tl.float32)
        if WEIGHTED:
            y *= tl.load(weights_ptr + t * K + k)
        acc += y
    tl.store(out_ptr + t * stride_ot + d * stride_od, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def combine(y: torch.Tensor, weights: torch.Tensor, row_index: torch.Tensor, weighted: bool) -> torch.Tensor:
    """y_RD, weights_TK, row_index_R (row -> flat slot t*K+k) -> out_TD in y's dtype."""
    T, K = weights.shape
    R, D = y.shape
    out_TD = y.new_empty((T, D))
    if T == 0 or D == 0:
        return out_TD
    search = R <= SEARCH_MAX
    slot_row_R = row_index
    if not search:
        slot_row_R = torch.empty((R,), dtype=torch.int64, device=y.device)
        launch(_invert_kernel, (cdiv(R, 1024),), row_index, slot_row_R, R, BLOCK=1024)
    weights_TK = weights.float().contiguous()
    BLOCK_D = min(next_power_of_2(D), 1024)
    launch(
        _combine_kernel, (T, cdiv(D, BLOCK_D)),
        y, weights_TK, slot_row_R, row_index, out_TD,
        D, R,
        y.stride(0), y.stride(1), out_TD.stride(0), out_TD.stride(1),
        K=K, WEIGHTED=weighted, SEARCH=search, BLOCK_D=BLOCK_D,
        BLOCK_R=next_power_of_2(R) if search else 1, num_warps=4,
    )  # fmt: skip
    return out_TD
