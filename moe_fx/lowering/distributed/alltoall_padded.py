"""`ep_alltoall` with `max_tokens_per_rank`: fixed-size exchanges, no host sync (CUDA-graph capturable).

Legend: T tokens on this rank (T <= M = max_tokens_per_rank), D model dim, E experts, L local experts,
K top-k, W ranks, S = T*K picks this rank sends, C = M*K rows reserved for each peer, N = R = W*C rows
received.

    dispatch:  counts_WE = all_gather(bincount(ids_TK))            (for `expert_load`; fixed size)
               xq_TD, xscale_T* = quantize_rows(x_TD)              (before any exchange)
               pick s goes to row dest_s = owner_s*C + (its place among the picks for that rank), packed
               with its routing weight, its expert's local slot + 1 (0 marks an unused row) and scales
               send_WC --all_to_all (equal splits)--> recv_WC
               gather_index_R sorts the received rows by local slot; unused rows sort past
               offsets_L1[L] (rows no expert computes: the experts write zeros there)
    experts:   the single-device lowering, on the L local experts' weights
    combine:   y_RD back to received order --all_to_all (equal splits)--> this rank's W*C rows;
               rows dest_S are its picks in (t, k) order: the single-device combine sums them over K

Every size is known when the graph is traced (the fake returns no data-dependent shapes), and no call reads
a device value on the host, so a decode step is captured whole in a CUDA graph. It moves W*C rows per rank
whatever the routing: for latency-bound decode, where the plain `ep_alltoall` waits on a host sync for
its split sizes. The handle `comm_splits` is dest_S (int64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.lowering import reference
from moe_fx.lowering.distributed import stats
from moe_fx.lowering.distributed.comm import (
    PRIORITY,
    group_of,
    pack_rows,
    quantize_for_wire,
    scale_shape,
    unpack_rows,
    wire,
)
from moe_fx.lowering.registry import ANY_DEVICE, register_lowering
from moe_fx.spec import MoESpec

LAYOUT = "ep_alltoall"
NAME = "ep_all_to_all_padded"


def padded(spec: MoESpec) -> str | None:
    """Takes the blocks given a max_tokens_per_rank bound (and no dropped picks of the router's own)."""
    if not spec.max_tokens_per_rank:
        return "no max_tokens_per_rank bound (option max_tokens_per_rank): the exchange sizes are data-dependent"
    if spec.routed_drops():
        return f"{spec.routed_drops()} is not implemented for layout {spec.layout!r}"
    return None


def rows_per_peer(max_tokens_per_rank: int, K: int) -> int:
    """C: rows reserved for each peer (all K picks of every token could go to one rank's experts)."""
    return max_tokens_per_rank * K


def _place_among_peers(owner_S: torch.Tensor, W: int) -> torch.Tensor:
    """Each pick's place among this rank's picks for the same owner rank, in pick order. (one_hot and
    bincount would read a device maximum on the host: neither is used here.)"""
    taken_SW = (owner_S[:, None] == torch.arange(W, device=owner_S.device)).long().cumsum(0)
    return taken_SW.gather(1, owner_S[:, None])[:, 0] - 1


def _counts(index: torch.Tensor, n: int) -> torch.Tensor:
    """bincount(index, minlength=n) for index < n, without bincount's host read of the maximum."""
    return torch.zeros(n, dtype=torch.int64, device=index.device).index_add_(0, index, torch.ones_like(index))


@register_lowering("quantize_dispatch", device=ANY_DEVICE, layout=LAYOUT, name=NAME, priority=PRIORITY + 1,
                   supports=padded)  # fmt: skip
def dispatch(x, ids, weights, num_local_experts, quant, layout, group_name, expert_map, max_tokens_per_rank=0):
    group = group_of(group_name)
    W, T, K, D, L = group.size(), ids.shape[0], ids.shape[1], x.shape[1], num_local_experts
    if T > max_tokens_per_rank:
        raise ValueError(
            f"moe_fx: rank {group.rank()} dispatches {T} tokens, more than max_tokens_per_rank="
            f"{max_tokens_per_rank} (the bound the padded ep_alltoall exchange was built for)"
        )
    C, E = rows_per_peer(max_tokens_per_rank, K), expert_map.shape[1]
    owner_E, slot_E = expert_map[0], expert_map[1]
    flat_ids_S = ids.reshape(-1).long()
    counts_WE = x.new_empty((W * E,), dtype=torch.int64)
    dist.all_gather_into_tensor(counts_WE, _counts(flat_ids_S, E), group=group)
    stats.record(group_name, counts_WE.view(W, E), owner_E)

    owner_S = owner_E[flat_ids_S]
    dest_S = owner_S * C + _place_among_peers(owner_S, W)
    xq_TD, xscale_TB = quantize_for_wire(x, quant)  # quantised before any communication
    src_S = torch.arange(T * K, device=x.device) // K
    parts = [wire(xq_TD)[src_S], weights.reshape(-1, 1).float(), (slot_E[flat_ids_S] + 1).float()[:, None]]
    row_layout = [(xq_TD.dtype, D), (torch.float32, 1), (torch.float32, 1)]
    if xscale_TB is not None:
        parts.append(xscale_TB[src_S])
        row_layout.append((torch.float32, xscale_TB.shape[1]))
    rows_S = pack_rows(parts)
    send = rows_S.new_zeros((W * C, rows_S.shape[1])).index_copy_(0, dest_S, rows_S)  # unused rows: slot 0
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    xq_ND, weights_N1, slot1_N1, *xscale_NB = unpack_rows(recv, row_layout)

    slot_N = slot1_N1[:, 0].long() - 1
    slot_N = torch.where(slot_N < 0, L, slot_N)  # unused rows after every local expert's
    gather_index_R = torch.sort(slot_N, stable=True).indices
    expert_offsets_L1 = torch.zeros(L + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(_counts(slot_N, L + 1)[:L], 0, out=expert_offsets_L1[1:])
    xscale = scale_shape(xscale_NB[0] if xscale_NB else None, quant, x.device)
    row_weights_R = weights_N1[:, 0][gather_index_R]
    return xq_ND, xscale, expert_offsets_L1, gather_index_R, row_weights_R, gather_index_R.clone(), dest_S


@register_lowering("combine", device=ANY_DEVICE, layout=LAYOUT, name=NAME, priority=PRIORITY + 1, supports=padded)
def combine(y, weights, row_index, comm_splits, weighted, layout, group_name):
    group = group_of(group_name)
    y_received = torch.empty_like(y)
    y_received[row_index] = y  # expert order -> the order the rows arrived in
    y_back = torch.empty_like(y)
    dist.all_to_all_single(y_back, y_received, group=group)
    dest_S = comm_splits
    y_SD = y_back[dest_S]  # this rank's picks, in (t, k) order
    return reference.combine(y_SD, weights, torch.arange(dest_S.shape[0], device=y.device), dest_S, weighted,
                             "single", "")  # fmt: skip
