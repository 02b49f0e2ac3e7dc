"""Triton `quantize_dispatch` (one device): group the T*K routed rows by expert, quantise the activations.

Legend: T tokens, D model dim, E experts, K top-k, R = T*K routed rows.

A counting sort with no host synchronisation. Up to SMALL_CHUNKS blocks of rows (decode), one
program does it all in `_sort_small_kernel`: count, cumsum, then place each block's rows after the
previous blocks' (stable, like the reference); one block (a decode step's few rows) is ranked instead,
each row's place counted in one [R, R] comparison (`_sort_one_block`). Above, two launches of at most
SORT_PROGRAMS programs, each taking a run of SPAN blocks of BLOCK_R rows:
  1. `_count_kernel`: each program counts its rows per expert and adds the counts to counts_E with one
     vector atomic.
  2. `_scatter_kernel`: every program turns counts_E into expert starts (a cumsum over E), reserves
     a contiguous range per expert for its rows with one atomic on cursor_E, and writes each row at
     start[e] + reserved[e] + its rank among the program's rows of expert e.
  Runs of two blocks at Qwen3's T=8192 were 7 % faster than a program per block, and longer runs slower
  (SORT_PROGRAMS): a program's chain of loads and scans costs more than the atomics it shares. The atomics are
  relaxed: the counts are read by the next launch, and a reservation needs only its own atomicity.
Dropped picks (id -1: token capacity, zero-computation experts) land after every expert's rows, in
[offsets[E], R), as in the reference.
Rows keep their order inside a program's run; runs of one expert land in the order they reserve, so
the order within an expert may vary from run to run. Every row is computed independently downstream, so
the layer's output does not depend on it. The T tokens (not the T*K rows: experts gathers them) are
quantised under fp8 / fp8_block / int8 (`quantize._quantize_block`) by more programs of the first launch
(`_rows`, after the sort's own programs): one launch in all at decode, where a launch costs more than its
work. Unquantised, the rows are x itself (`ops.rows_are_tokens`): nothing is copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_fx.lowering.triton.launch import launch
from moe_fx.lowering.triton.quantize import MODES as QUANTISED
from moe_fx.lowering.triton.quantize import _quantize_block, new_rows, row_constexprs, row_tiling
from moe_fx.lowering.triton.sizes import cdiv, next_power_of_2


@triton.jit
def _rows(
    rp, x_ptr, q_ptr, xs_ptr, T, D, stride_xn, stride_qn, stride_sn,
    COL_TILES: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Row program rp of the activations: a block of tokens quantised (`quantize._quantize_block`)."""
    _quantize_block(x_ptr, q_ptr, xs_ptr, T, D, stride_xn, stride_qn, stride_sn, rp // COL_TILES, rp % COL_TILES,
                    QMAX, IS_INT, ONE_TILE, BLOCK_N, BLOCK_D)  # fmt: skip


@triton.jit
def _store_offsets(offsets_ptr, ends_E, e, E, BLOCK_E: tl.constexpr):
    """expert_offsets_E1: 0, then each expert's end."""
    tl.store(offsets_ptr + e + 1, ends_E.to(tl.int64), mask=e < E)
    tl.store(offsets_ptr + e, tl.zeros((BLOCK_E,), tl.int64), mask=e == 0)


@triton.jit
def _place_rows(pos_R, r, ok, K, weights_ptr, gather_ptr, row_weights_ptr, row_index_ptr):
    """Routed rows r (where ok) into their sorted places pos_R: token, row and routing weight."""
    tl.store(gather_ptr + pos_R, (r // K).to(tl.int64), mask=ok)
    tl.store(row_index_ptr + pos_R, r.to(tl.int64), mask=ok)
    tl.store(row_weights_ptr + pos_R, tl.load(weights_ptr + r, mask=ok, other=0.0).to(tl.float32), mask=ok)


@triton.jit
def _block_hits(ids_ptr, b, R, e, BLOCK_R: tl.constexpr):
    """Block b's rows r, their ids, and hit_RE: which expert each row goes to, one-hot."""
    r = b * BLOCK_R + tl.arange(0, BLOCK_R)
    ids_R = tl.load(ids_ptr + r, mask=r < R, other=-1)
    return r, ids_R, (ids_R[:, None] == e[None, :]).to(tl.int32)


@triton.jit
def _count_blocks(ids_ptr, first, last, R, e, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """(rows per expert, dropped rows (id -1)) in blocks [first, last)."""
    counts_E = tl.zeros((BLOCK_E,), tl.int32)
    dropped = 0
    for b in range(first, last):
        r, ids_R, hit_RE = _block_hits(ids_ptr, b, R, e, BLOCK_R)
        counts_E += tl.sum(hit_RE, axis=0)
        dropped += tl.sum(((r < R) & (ids_R < 0)).to(tl.int32), axis=0)
    return counts_E, dropped


@triton.jit
def _place_blocks(ids_ptr, weights_ptr, gather_ptr, row_weights_ptr, row_index_ptr, first, last, R, E, K, next_E,
                  next_dropped, e, BLOCK_R: tl.constexpr):  # fmt: skip
    """The rows of blocks [first, last), in order: expert e's from slot next_E[e] on, dropped ones from
    next_dropped on."""
    for b in range(first, last):
        r, ids_R, hit_RE = _block_hits(ids_ptr, b, R, e, BLOCK_R)
        pos_R = tl.sum(hit_RE * (next_E[None, :] + tl.cumsum(hit_RE, axis=0) - 1), axis=1)
        next_E += tl.sum(hit_RE, axis=0)
        dropped_R = ((r < R) & (ids_R < 0)).to(tl.int32)
        pos_R = tl.where(dropped_R > 0, next_dropped + tl.cumsum(dropped_R, axis=0) - 1, pos_R)
        next_dropped += tl.sum(dropped_R, axis=0)
        _place_rows(pos_R, r, (r < R) & (ids_R < E), K, weights_ptr, gather_ptr, row_weights_ptr, row_index_ptr)


@triton.jit
def _count_kernel(
    ids_ptr, counts_ptr, R, E, BLOCKS, SPAN, x_ptr, q_ptr, xs_ptr, T, D, stride_xn, stride_qn, stride_sn,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    COL_TILES: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Programs [0, cdiv(BLOCKS, SPAN)) count SPAN blocks each, the rest are `_rows`."""
    pid = tl.program_id(0)
    sorting = tl.cdiv(BLOCKS, SPAN)
    if pid >= sorting:
        _rows(pid - sorting, x_ptr, q_ptr, xs_ptr, T, D, stride_xn, stride_qn, stride_sn, COL_TILES, QMAX,
              IS_INT, ONE_TILE, BLOCK_N, BLOCK_D)  # fmt: skip
        return
    e = tl.arange(0, BLOCK_E)
    counts_E, _ = _count_blocks(ids_ptr, pid * SPAN, tl.minimum(pid * SPAN + SPAN, BLOCKS), R, e, BLOCK_R, BLOCK_E)
    tl.atomic_add(counts_ptr + e, counts_E, mask=(e < E) & (counts_E > 0), sem="relaxed")


@triton.jit
def _scatter_kernel(
    # pointers
    ids_ptr, weights_ptr, counts_ptr, cursor_ptr, offsets_ptr, gather_ptr, row_weights_ptr, row_index_ptr,
    # sizes
    R, E, K, BLOCKS, SPAN,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    counts_E = tl.load(counts_ptr + e, mask=e < E, other=0)
    ends_E = tl.cumsum(counts_E, axis=0)
    if pid == 0:
        _store_offsets(offsets_ptr, ends_E, e, E, BLOCK_E)
    first, last = pid * SPAN, tl.minimum(pid * SPAN + SPAN, BLOCKS)
    mine_E, mine_dropped = _count_blocks(ids_ptr, first, last, R, e, BLOCK_R, BLOCK_E)
    # one range per expert for this program's rows; dropped picks after every expert's rows, on cursor[E]
    reserved_E = tl.atomic_add(cursor_ptr + e, mine_E, mask=(e < E) & (mine_E > 0), sem="relaxed")
    reserved = tl.atomic_add(cursor_ptr + E, mine_dropped, mask=mine_dropped > 0, sem="relaxed")
    next_E = ends_E - counts_E + tl.where(mine_E > 0, reserved_E, 0)
    next_dropped = tl.sum(counts_E, axis=0) + tl.where(mine_dropped > 0, reserved, 0)
    _place_blocks(ids_ptr, weights_ptr, gather_ptr, row_weights_ptr, row_index_ptr, first, last, R, E, K, next_E,
                  next_dropped, e, BLOCK_R)  # fmt: skip


@triton.jit
def _sort_one_block(ids_ptr, weights_ptr, offsets_ptr, gather_ptr, row_weights_ptr, row_index_ptr, R, E, K,
                    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    """All R rows in one block: each row's place is the number of rows before it in (expert, row) order, an
    expert's end the number of rows of it and the experts before it; two independent reductions, no scans.
    Dropped picks (id -1) order as expert E: after every expert's rows."""
    r = tl.arange(0, BLOCK_R)
    ids_R = tl.load(ids_ptr + r, mask=r < R, other=-1)
    ok = (r < R) & (ids_R < E)
    key_R = tl.where(ok, tl.where(ids_R < 0, E, ids_R), E + 1)  # E + 1: past R, never stored
    before_RR = (key_R[None, :] < key_R[:, None]) | ((key_R[None, :] == key_R[:, None]) & (r[None, :] < r[:, None]))
    pos_R = tl.sum(before_RR.to(tl.int32), axis=1)
    e = tl.arange(0, BLOCK_E)
    ends_E = tl.sum((key_R[None, :] <= e[:, None]).to(tl.int32), axis=1)
    _store_offsets(offsets_ptr, ends_E, e, E, BLOCK_E)
    _place_rows(pos_R, r, ok, K, weights_ptr, gather_ptr, row_weights_ptr, row_index_ptr)


@triton.jit
def _sort_small_kernel(
    # pointers
    ids_ptr, weights_ptr, offsets_ptr, gather_ptr, row_weights_ptr, row_index_ptr, R, E, K,
    # the activations' rows (`_rows`)
    x_ptr, q_ptr, xs_ptr, T, D, stride_xn, stride_qn, stride_sn,
    # meta-parameters
    CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    COL_TILES: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program 0 sorts, the rest are `_rows`."""
    if tl.program_id(0) > 0:
        _rows(tl.program_id(0) - 1, x_ptr, q_ptr, xs_ptr, T, D, stride_xn, stride_qn, stride_sn, COL_TILES, QMAX,
              IS_INT, ONE_TILE, BLOCK_N, BLOCK_D)  # fmt: skip
        return
    if CHUNKS == 1:
        _sort_one_block(ids_ptr, weights_ptr, offsets_ptr, gather_ptr, row_weights_ptr, row_index_ptr, R, E, K,
                        BLOCK_R, BLOCK_E)  # fmt: skip
        return
    e = tl.arange(0, BLOCK_E)
    counts_E, _ = _count_blocks(ids_ptr, 0, CHUNKS, R, e, BLOCK_R, BLOCK_E)
    ends_E = tl.cumsum(counts_E, axis=0)
    _store_offsets(offsets_ptr, ends_E, e, E, BLOCK_E)
    _place_blocks(ids_ptr, weights_ptr, gather_ptr, row_weights_ptr, row_index_ptr, 0, CHUNKS, R, E, K,
                  ends_E - counts_E, tl.sum(counts_E, axis=0), e, BLOCK_R)  # fmt: skip


SMALL_CHUNKS = 4
# The two-launch sort's programs at most: each takes a run of blocks and reserves once. H100, T=8192, one
# dispatch under graph replays (bench/NOTES.md, twenty-second session; bench/sort_programs.py): 64 -> 72.9 us (Qwen3),
# 256 -> 25.6, 512 -> 22.5, 1024 (a block each) -> 24.3; each program's chain of loads and scans costs, not the
# atomics.
SORT_PROGRAMS = 512


def _block_r(E: int, R: int) -> int:
    """Rows per block: keep the [BLOCK_R, BLOCK_E] one-hot tile at 8K elements, and no larger than R needs (a
    decode step's few rows: Qwen3's 8 at T=1 scanned a 64-row tile)."""
    return max(16, min(128, 8192 // next_power_of_2(E), next_power_of_2(R)))


def dispatch(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int, quant: str = "none"
) -> tuple[torch.Tensor, ...]:
    """x_TD, ids_TK int, weights_TK -> the `moe_fx::quantize_dispatch` 7-tuple for one device.

    Returns (xq_TD, xscale, expert_offsets_E1 int64, gather_index_R int64, row_weights_R fp32, row_index_R
    int64, empty comm_splits). Under fp8 / fp8_block / int8, (xq, xscale) are `quantize.quantize_rows(x)`, whose
    programs run in the sort's first launch, after its own programs: one launch at decode. Otherwise (none,
    int4_weight) the rows are x itself (`ops.rows_are_tokens`): xq [0, D] and xscale are empty.
    """
    T, K = ids.shape
    R, E, device = T * K, num_experts, x.device
    ids_R = ids.reshape(-1).to(torch.int32)
    weights_R = weights.reshape(-1)
    offsets_E1 = torch.empty((E + 1,), dtype=torch.int64, device=device)
    gather_R = torch.empty((R,), dtype=torch.int64, device=device)
    row_index_R = torch.empty((R,), dtype=torch.int64, device=device)
    row_weights_R = torch.empty((R,), dtype=torch.float32, device=device)
    D = x.shape[1]
    if quant in QUANTISED:
        x = x if x.stride(-1) == 1 else x.contiguous()
        xq, xscale = new_rows(x, quant)
        if D == 0:
            xscale.fill_(1.0)
        tiling = row_tiling(D, quant)
        row_programs = tiling.programs(T) if D else 0
        rows = dict(COL_TILES=tiling.col_tiles, **row_constexprs(quant, tiling))
    else:  # no rows: experts reads x; the row programs' constexprs are fp8's, for programs that never run
        xq, xscale = x.new_empty((0, D)), x.new_empty((0,), dtype=torch.float32)
        tiling, row_programs = row_tiling(16, "fp8")._replace(num_warps=4), 0
        rows = dict(COL_TILES=1, **row_constexprs("fp8", tiling))
    row_args = (x, xq, xscale if xscale.numel() else row_weights_R, T, D, x.stride(0), xq.stride(0),
                xscale.stride(0) if xscale.numel() else 0)  # fmt: skip
    BLOCK_E, BLOCK_R = next_power_of_2(E), _block_r(E, R)
    chunks = cdiv(R, BLOCK_R)
    if R == 0 and row_programs == 0:
        offsets_E1.zero_()
    elif chunks <= SMALL_CHUNKS:
        launch(
            _sort_small_kernel, (1 + row_programs,),
            ids_R, weights_R, offsets_E1, gather_R, row_weights_R, row_index_R, R, E, K, *row_args,
            CHUNKS=chunks, BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E, **rows, num_warps=tiling.num_warps,
        )  # fmt: skip
    else:
        counts_cursor = torch.zeros((2, E + 1), dtype=torch.int32, device=device)  # cursor[E]: dropped picks
        span = cdiv(chunks, SORT_PROGRAMS)
        programs = cdiv(chunks, span)
        launch(
            _count_kernel, (programs + row_programs,),
            ids_R, counts_cursor[0], R, E, chunks, span, *row_args, BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E,
            **rows, num_warps=tiling.num_warps,
        )  # fmt: skip
        launch(
            _scatter_kernel, (programs,),
            ids_R, weights_R, counts_cursor[0], counts_cursor[1], offsets_E1, gather_R, row_weights_R, row_index_R,
            R, E, K, chunks, span, BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E,
        )  # fmt: skip
    return xq, xscale, offsets_E1, gather_R, row_weights_R, row_index_R, x.new_empty((0,), dtype=torch.int64)
