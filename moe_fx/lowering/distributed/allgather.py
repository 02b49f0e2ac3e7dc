"""`ep_allgather`: all-gather the tokens and their routing, run the local experts, reduce-scatter.

Legend: T tokens on this rank, G tokens of all ranks (sum of T), D model dim, E experts,
L local experts, K top-k, W ranks, R rows of the gathered tokens routed to the local experts.

    dispatch:  (T | tokens per expert)_W = all_gather, synced to the host once: the padding and R
               xq_TD, xscale_T* = quantize_rows(x_TD) under fp8 / fp8_block / int8
               (xq | ids | weights | scales)_G = all_gather(packed per token, padded to max T)
               the R (token, slot) rows of local experts, sorted by local expert: gather_index_R
    experts:   the single-device lowering, on the L local experts' weights
    combine:   partial_GD = sum over this rank's rows of weight * y (float32)
               out_TD = reduce_scatter(partial_GD)[this rank's T rows]

Uneven T per rank: both collectives pad to the largest T. The handle `comm_splits` (int64) is
[tokens of each rank (W) | float32 bits of the routing weight of each row (R)]: combine weights the
rows of other ranks' tokens, whose weights only the dispatch saw; it reads the token counts from the
host copy dispatch attached (`comm.keep_host_head`), without a sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.lowering.distributed import stats
from moe_fx.lowering.distributed.comm import (
    PRIORITY,
    all_gather_rows,
    group_of,
    host_head,
    host_list,
    keep_host_head,
    pack_rows,
    quantize_for_wire,
    reduce_scatter_rows,
    scale_shape,
    uncapped,
    unpack_rows,
    wire,
)
from moe_fx.lowering.registry import ANY_DEVICE, register_lowering

LAYOUT = "ep_allgather"
NAME = "ep_all_gather"


@register_lowering("quantize_dispatch", device=ANY_DEVICE, layout=LAYOUT, name=NAME, priority=PRIORITY,
                   supports=uncapped)  # fmt: skip
def dispatch(x, ids, weights, num_local_experts, quant, layout, group_name, expert_map):
    group = group_of(group_name)
    W, rank = group.size(), group.rank()
    (T, K), E, L = ids.shape, expert_map.shape[1], num_local_experts
    owner_E, slot_E = expert_map[0], expert_map[1]
    mine_E1 = torch.cat([x.new_full((1,), T, dtype=torch.int64), torch.bincount(ids.reshape(-1).long(), minlength=E)])
    sizes_WE1 = x.new_empty((W * (E + 1),), dtype=torch.int64)
    dist.all_gather_into_tensor(sizes_WE1, mine_E1, group=group)
    sizes_WE1 = sizes_WE1.view(W, E + 1)
    host_WE1 = sizes_WE1.tolist()  # the one host sync: every rank's T (the padding) and its rows per expert
    sizes = [row[0] for row in host_WE1]
    local = [e for e, owner in enumerate(host_list(expert_map)[0]) if owner == rank]
    R = sum(row[1 + e] for row in host_WE1 for e in local)
    stats.record(group_name, sizes_WE1[:, 1:], owner_E)

    xq_TD, xscale_TB = quantize_for_wire(x, quant)  # quantised before any communication
    parts = [wire(xq_TD), ids.to(torch.int32), weights.float()]
    row_layout = [(xq_TD.dtype, xq_TD.shape[1]), (torch.int32, K), (torch.float32, K)]
    if xscale_TB is not None:
        parts.append(xscale_TB)
        row_layout.append((torch.float32, xscale_TB.shape[1]))
    gathered = all_gather_rows(pack_rows(parts), sizes, group)  # rows, ids, weights, scales: one exchange
    xq_GD, ids_GK, weights_GK, *xscale_GB = unpack_rows(gathered, row_layout)
    xscale = scale_shape(xscale_GB[0] if xscale_GB else None, quant, x.device)

    flat_ids = ids_GK.reshape(-1).long()
    local_slot = torch.where(owner_E[flat_ids] == rank, slot_E[flat_ids], L)
    order = torch.sort(local_slot, stable=True).indices
    expert_offsets_L1 = torch.zeros(L + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(torch.bincount(local_slot, minlength=L + 1)[:L], 0, out=expert_offsets_L1[1:])
    row_index_R = order[:R]  # rows of local experts, in local expert order
    row_weights_R = weights_GK.reshape(-1)[row_index_R]
    comm_splits = keep_host_head(torch.cat([sizes_WE1[:, 0], row_weights_R.view(torch.int32).long()]), sizes)
    return xq_GD, xscale, expert_offsets_L1, row_index_R // K, row_weights_R, row_index_R, comm_splits


@register_lowering("combine", device=ANY_DEVICE, layout=LAYOUT, name=NAME, priority=PRIORITY)
def combine(y, weights, row_index, comm_splits, weighted, layout, group_name):
    group = group_of(group_name)
    W, rank, K = group.size(), group.rank(), weights.shape[1]
    sizes = host_head(comm_splits, W)  # dispatch's host copy: no device sync
    y_RD = y.float()
    if weighted:
        y_RD = y_RD * comm_splits[W:].to(torch.int32).view(torch.float32)[:, None]
    partial_GD = y_RD.new_zeros((sum(sizes), y.shape[1])).index_add_(0, row_index // K, y_RD)
    return reduce_scatter_rows(partial_GD, sizes, rank, group).to(y.dtype)
