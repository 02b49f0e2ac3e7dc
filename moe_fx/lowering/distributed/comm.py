"""Small helpers shared by the parallel layouts: the process group from its name, uneven exchanges.

Legend: W ranks in the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from moe_fx.spec import MoESpec

PRIORITY = 0


def group_of(group_name: str) -> dist.ProcessGroup:
    """The process group registered under `group_name` (what the rewrite stored in the graph)."""
    try:
        return _resolve_process_group(group_name)
    except Exception as e:
        raise ValueError(
            f"moe_fx: no process group named {group_name!r} in this process (was it destroyed, or is this "
            "graph running in a process that did not create it?)"
        ) from e


def unquantised(spec: MoESpec) -> str | None:
    if spec.quant.mode != "none":
        return f"quant={spec.quant.mode!r} is not implemented for layout {spec.layout!r} yet"
    if spec.router is not None and spec.router.capacity:
        return f"token capacity ({spec.router.capacity}) is not implemented for layout {spec.layout!r}"
    return None


def all_gather_rows(x_ND: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `x_ND` (rank w holds sizes[w] rows): padded all-gather, then unpad."""
    W, n_max = len(sizes), max(sizes)
    padded = x_ND.new_zeros((n_max, *x_ND.shape[1:]))
    padded[: x_ND.shape[0]] = x_ND
    gathered = x_ND.new_empty((W * n_max, *x_ND.shape[1:]))
    dist.all_gather_single(gathered, padded, group=group)
    if all(n == n_max for n in sizes):
        return gathered
    return torch.cat([gathered[w * n_max : w * n_max + n] for w, n in enumerate(sizes)])


def reduce_scatter_rows(x_ND: torch.Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum `x_ND` (rows of all ranks, concatenated, rank w's sizes[w] rows) over ranks; return this rank's rows."""
    W, n_max = len(sizes), max(sizes)
    if all(n == n_max for n in sizes):
        padded = x_ND.contiguous()
    else:
        padded = x_ND.new_zeros((W * n_max, *x_ND.shape[1:]))
        starts = [sum(sizes[:w]) for w in range(W)]
        for w, (start, n) in enumerate(zip(starts, sizes)):
            padded[w * n_max : w * n_max + n] = x_ND[start : start + n]
    out = x_ND.new_empty((n_max, *x_ND.shape[1:]))
    dist.reduce_scatter_single(out, padded, group=group)
    return out[: sizes[rank]]
