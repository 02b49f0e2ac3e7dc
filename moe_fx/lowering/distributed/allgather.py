"""`ep_allgather`: all-gather the tokens and their routing, run the local experts, reduce-scatter.

Legend: T tokens on this rank, G tokens of all ranks (sum of T), D model dim, E experts,
L local experts, K top-k, W ranks, R rows of the gathered tokens routed to the local experts.

    dispatch:  T_W = all_gather(T); xq_TD, xscale_T* = quantize_rows(x_TD) under fp8 / fp8_block / int8
               xq_GD, (ids | weights | scales)_G* = all_gather(padded to max T)   (1-byte rows under quant)
               the R (token, slot) rows of local experts, sorted by local expert: gather_index_R
    experts:   the single-device lowering, on the L local experts' weights
    combine:   partial_GD = sum over this rank's rows of weight * y (float32)
               out_TD = reduce_scatter(partial_GD)[this rank's T rows]

Uneven T per rank: both collectives pad to the largest T. The handle `comm_splits` (int64) is
[tokens of each rank (W) | float32 bits of the routing weight of each row (R)]: combine weights the
rows of other ranks' tokens, whose weights only the dispatch saw.
"""

from __future__ import annotations

import torch

from moe_fx.lowering.distributed import stats
from moe_fx.lowering.distributed.comm import (
    PRIORITY,
    all_gather_rows,
    group_of,
    quantize_for_wire,
    reduce_scatter_rows,
    scale_shape,
    uncapped,
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
    sizes_W = x.new_empty((W,), dtype=torch.int64)
    torch.distributed.all_gather_into_tensor(sizes_W, torch.tensor([T], device=x.device), group=group)
    sizes = sizes_W.tolist()  # host sync for the padding
    xq_TD, xscale_TB = quantize_for_wire(x, quant)  # quantised before any communication
    xq_GD = all_gather_rows(wire(xq_TD), sizes, group).view(xq_TD.dtype)
    routing = [ids.to(torch.int32), weights.float().view(torch.int32)]
    routing_TM = torch.cat(routing if xscale_TB is None else [*routing, xscale_TB.view(torch.int32)], dim=1)
    routing_GM = all_gather_rows(routing_TM, sizes, group)  # ids, weights and scales: one exchange
    ids_GK, weights_GK = routing_GM[:, :K].long(), routing_GM[:, K : 2 * K].view(torch.float32)
    xscale = scale_shape(None if xscale_TB is None else routing_GM[:, 2 * K :].view(torch.float32), quant, x.device)

    flat_ids = ids_GK.reshape(-1)
    counts_WE = torch.stack([torch.bincount(part, minlength=E) for part in flat_ids.split([n * K for n in sizes])])
    stats.record(group_name, counts_WE, owner_E)
    local_slot = torch.where(owner_E[flat_ids] == rank, slot_E[flat_ids], L)
    counts_L1 = torch.bincount(local_slot, minlength=L + 1)
    order = torch.sort(local_slot, stable=True).indices
    expert_offsets_L1 = torch.zeros(L + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts_L1[:L], 0, out=expert_offsets_L1[1:])
    row_index_R = order[: flat_ids.shape[0] - int(counts_L1[L])]  # rows of local experts (a second sync)
    row_weights_R = weights_GK.reshape(-1)[row_index_R]
    comm_splits = torch.cat([sizes_W, row_weights_R.view(torch.int32).long()])
    return xq_GD, xscale, expert_offsets_L1, row_index_R // K, row_weights_R, row_index_R, comm_splits


@register_lowering("combine", device=ANY_DEVICE, layout=LAYOUT, name=NAME, priority=PRIORITY)
def combine(y, weights, row_index, comm_splits, weighted, layout, group_name):
    group = group_of(group_name)
    W, rank, K = group.size(), group.rank(), weights.shape[1]
    sizes = comm_splits[:W].tolist()  # the one host sync
    y_RD = y.float()
    if weighted:
        y_RD = y_RD * comm_splits[W:].to(torch.int32).view(torch.float32)[:, None]
    partial_GD = y_RD.new_zeros((sum(sizes), y.shape[1])).index_add_(0, row_index // K, y_RD)
    return reduce_scatter_rows(partial_GD, sizes, rank, group).to(y.dtype)
