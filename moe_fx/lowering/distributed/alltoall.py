"""`ep_alltoall`: exchange per-expert counts, all-to-all-v the rows to their experts' ranks, and back.

Legend: T tokens on this rank, D model dim, E experts, L local experts, K top-k, W ranks,
S rows this rank sends (T*K, one per (token, slot)), N = R rows it receives.

    dispatch:  counts_WE = all_gather(bincount(ids_TK))                   every rank sees all loads
               xq_TD, xscale_T* = quantize_rows(x_TD)       (fp8 / fp8_block / int8: before any exchange)
               send rows sorted by (owner rank, slot), each packed with its routing weight and scales
               (float32) --all_to_all_v-->  N received rows (1-byte values under quant)
               gather_index_R re-sorts the received rows by local expert; offsets_L1 bound the groups
    experts:   the single-device lowering, on the L local experts' weights
    combine:   y_RD back to received order --all_to_all_v (splits swapped)--> S rows in send order,
               then the single-device combine puts them in their (t, k) slots and sums over K

The handle `comm_splits` (int64) is [rows sent to each rank (W) | rows received from each (W) |
the (t*K + k) slot of each sent row (S)]: all that combine needs for the reverse exchange.
Dispatch returns once the row exchange has started (`exchanges.py`): its outputs are filled when experts
(or combine) first runs, so what the graph runs in between (the shared expert, `passes/overlap.py`)
overlaps the exchange. One host sync, in dispatch, for the split sizes; combine reads them from the host
copy dispatch attached to the handle (`comm.keep_host_head`), so it queues its exchange without waiting
for the experts.
Quantised rows are quantised per token exactly as on one device (`quant.quantize_rows`), so the local
experts compute what the single-device block computes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.lowering import reference
from moe_fx.lowering.distributed import exchanges, stats
from moe_fx.lowering.distributed.comm import (
    PRIORITY,
    group_of,
    host_head,
    keep_host_head,
    pack_rows,
    quantize_for_wire,
    scale_shape,
    uncapped,
    unpack_rows_into,
    wire,
)
from moe_fx.lowering.registry import ANY_DEVICE, register_lowering

LAYOUT = "ep_alltoall"
NAME = "ep_all_to_all"  # each layout names its lowerings apart: ops look entries up by name


@register_lowering("quantize_dispatch", device=ANY_DEVICE, layout=LAYOUT, name=NAME, priority=PRIORITY,
                   supports=uncapped, overlaps=True)  # fmt: skip
def dispatch(x, ids, weights, num_local_experts, quant, layout, group_name, expert_map):
    group = group_of(group_name)
    W, rank = group.size(), group.rank()
    E, K, D, L = expert_map.shape[1], ids.shape[1], x.shape[1], num_local_experts
    owner_E, slot_E = expert_map[0], expert_map[1]
    flat_ids_S = ids.reshape(-1).long()
    counts_WE = x.new_empty((W * E,), dtype=torch.int64)
    dist.all_gather_into_tensor(counts_WE, torch.bincount(flat_ids_S, minlength=E), group=group)
    counts_WE = counts_WE.view(W, E)
    stats.record(group_name, counts_WE, owner_E)

    send_slot_S = torch.sort(owner_E[flat_ids_S] * E + slot_E[flat_ids_S], stable=True).indices
    local_E = torch.sort(torch.where(owner_E == rank, slot_E, E)).indices[:L]  # global ids, slot order
    recv_WL = counts_WE[:, local_E]
    send_W = torch.zeros(W, dtype=torch.int64, device=x.device).index_add_(0, owner_E, counts_WE[rank])
    recv_W = recv_WL.sum(1)
    splits = torch.cat([send_W, recv_W]).tolist()  # the one host sync
    send, recv = splits[:W], splits[W:]

    N = sum(recv)
    xq_TD, xscale_TB = quantize_for_wire(x, quant)  # quantised before any communication
    src_S = send_slot_S // K
    parts = [wire(xq_TD)[src_S], weights.reshape(-1).float()[send_slot_S, None]]
    row_layout = [(xq_TD.dtype, D), (torch.float32, 1)]
    if xscale_TB is not None:
        parts.append(xscale_TB[src_S])
        row_layout.append((torch.float32, xscale_TB.shape[1]))
    rows_S = pack_rows(parts)  # one exchange for the rows, their weights and scales
    rows_N = rows_S.new_empty((N, rows_S.shape[1]))
    work = dist.all_to_all_single(rows_N, rows_S, recv, send, group=group, async_op=True)

    local_slot_N = torch.arange(L, device=x.device).repeat(W).repeat_interleave(recv_WL.reshape(-1), output_size=N)
    gather_index_R = torch.sort(local_slot_N, stable=True).indices
    expert_offsets_L1 = torch.zeros(L + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(recv_WL.sum(0), 0, out=expert_offsets_L1[1:])
    comm_splits = keep_host_head(torch.cat([send_W, recv_W, send_slot_S]), splits)
    # the outputs the rows land in, filled by `finish` when experts (or combine) first needs them
    received = [rows_N.new_empty((N, columns), dtype=dtype) for dtype, columns in row_layout]
    xq_ND, recv_weights_N1, *xscale_NB = received
    xscale = scale_shape(xscale_NB[0] if xscale_NB else None, quant, x.device)
    row_weights_R = torch.empty((N,), dtype=torch.float32, device=x.device)

    def finish():
        unpack_rows_into(rows_N, received)
        torch.index_select(recv_weights_N1[:, 0], 0, gather_index_R, out=row_weights_R)
        if xscale_NB and quant != "fp8_block":  # fp8_block's [N, B] scales landed in xscale itself
            xscale.copy_(xscale_NB[0][:, 0])

    exchanges.start_exchange(work, finish)
    return xq_ND, xscale, expert_offsets_L1, gather_index_R, row_weights_R, gather_index_R.clone(), comm_splits


@register_lowering("combine", device=ANY_DEVICE, layout=LAYOUT, name=NAME, priority=PRIORITY)
def combine(y, weights, row_index, comm_splits, weighted, layout, group_name):
    group = group_of(group_name)
    W = group.size()
    splits = host_head(comm_splits, 2 * W)  # dispatch's host copy: no device sync
    send, recv = splits[:W], splits[W:]
    send_slot_S = comm_splits[2 * W :]
    y_received = torch.empty_like(y)
    y_received[row_index] = y  # expert order -> the order the rows arrived in
    y_SD = y.new_empty((send_slot_S.shape[0], y.shape[1]))
    dist.all_to_all_single(y_SD, y_received, send, recv, group=group)
    return reference.combine(y_SD, weights, send_slot_S, comm_splits, weighted, "single", "")
