"""Triton `combine` (one device): out_TD = Σ_k weight[t, k] · y[row of slot (t, k)], fp32 accumulation.

Legend: T tokens, D model dim, K top-k, R = T*K rows.

`row_index_R` maps row -> slot; `_invert_kernel` scatters its inverse (slot -> row), then
`_combine_kernel` gathers each token's K rows in slot order, so the sum is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _invert_kernel(row_index_ptr, slot_row_ptr, R, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slots = tl.load(row_index_ptr + r, mask=r < R, other=0)
    tl.store(slot_row_ptr + slots, r.to(tl.int64), mask=r < R)


@triton.jit
def _combine_kernel(
    # pointers
    y_ptr, weights_ptr, slot_row_ptr, out_ptr,
    # sizes
    D,
    # strides
    stride_yr, stride_yd, stride_ot, stride_od,
    # meta-parameters
    K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for k in tl.static_range(K):
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
    slot_row_R = torch.empty((R,), dtype=torch.int64, device=y.device)
    _invert_kernel[(triton.cdiv(R, 1024),)](row_index, slot_row_R, R, BLOCK=1024)
    weights_TK = weights.float().contiguous()
    BLOCK_D = min(triton.next_power_of_2(D), 1024)
    _combine_kernel[(T, triton.cdiv(D, BLOCK_D))](
        y, weights_TK, slot_row_R, out_TD,
        D,
        y.stride(0), y.stride(1), out_TD.stride(0), out_TD.stride(1),
        K=K, WEIGHTED=weighted, BLOCK_D=BLOCK_D, num_warps=4,
    )  # fmt: skip
    return out_TD
