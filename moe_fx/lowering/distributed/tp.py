"""`tp`: tensor-parallel experts. Every rank holds the same tokens, all E experts and a 1/W slice of F.

Legend: T tokens (the same on every rank), D model dim, E experts, K top-k, W ranks.

    dispatch:  the single-device sort of the T*K rows by expert (no communication)
    experts:   the single-device lowering on this rank's F slice: a partial y_RD
    combine:   out_TD = all_reduce(sum over K of weight * y) in float32

Gated activations act per F index, so the F slices are independent; the down-projection's bias is
kept on rank 0 only (see `placement.Shard`), so the all-reduce adds it once.
"""

from __future__ import annotations

import torch.distributed as dist

from moe_fx.lowering import reference
from moe_fx.lowering.distributed.comm import PRIORITY, group_of, uncapped
from moe_fx.lowering.registry import ANY_DEVICE, register_lowering
from moe_fx.spec import MoESpec

LAYOUT = "tp"
NAME = "tp_all_reduce"


def unquantised(spec: MoESpec) -> str | None:
    """tp moves no activations, so quantising them saves no bytes on the wire; quantised tp would mean each
    rank's F slice of the quantised weights and locally quantised activations, whose per-token scales for
    the down projection cover F/W rather than F: not the single-device quantised block. Not implemented."""
    if spec.quant.mode == "none":
        return uncapped(spec)
    return (
        f"quant={spec.quant.mode!r} is not implemented for layout 'tp': tp moves no activations (nothing to save "
        "on the wire), and its down projection would quantise activations over F/W per rank, which is not the "
        "single-device quantised block; use layout 'ep_alltoall' or 'ep_allgather' with quant"
    )


@register_lowering("quantize_dispatch", device=ANY_DEVICE, layout=LAYOUT, name=NAME, priority=PRIORITY,
                   supports=unquantised)  # fmt: skip
def dispatch(x, ids, weights, num_local_experts, quant, layout, group_name, expert_map):
    return reference.quantize_dispatch(x, ids, weights, num_local_experts, quant, "single", "", None)


@register_lowering("combine", device=ANY_DEVICE, layout=LAYOUT, name=NAME, priority=PRIORITY)
def combine(y, weights, row_index, comm_splits, weighted, layout, group_name):
    out_TD = reference.combine(y.float(), weights, row_index, comm_splits, weighted, "single", "")
    dist.all_reduce(out_TD, group=group_of(group_name))
    return out_TD.to(y.dtype)
