"""Small helpers shared by the parallel layouts: the process group from its name, uneven exchanges.

Legend: W ranks in the group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from moe_fx.lowering import quant as quant_fmt
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


def wire(t: torch.Tensor) -> torch.Tensor:
    """`t` as the collectives can move it: 1-byte dtypes (e4m3, int8) as a uint8 view (gloo has no float8)."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def quantize_for_wire(x_TD: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows as they travel: (xq_TD, xscale_TB float32 [T, B], B = 1 or ceil(D/128)) for activation-quantised
    modes, quantised per token before any communication; (x_TD, None) otherwise (int4_weight, none)."""
    if quant not in quant_fmt.ACTIVATION_QUANTISED:
        return x_TD, None
    xq_TD, xscale = quant_fmt.quantize_rows(x_TD, quant)
    return xq_TD, xscale if xscale.dim() == 2 else xscale[:, None]  # fp8_block's [T, B] or [T] -> [T, 1]


def scale_shape(xscale_NB: torch.Tensor | None, quant: str, device: torch.device) -> torch.Tensor:
    """Received scales in the shape `quantize_dispatch` returns: [N] per token, [N, B] fp8_block, else empty."""
    if xscale_NB is None:
        return torch.empty((0,), dtype=torch.float32, device=device)
    return xscale_NB.contiguous() if quant == "fp8_block" else xscale_NB[:, 0].contiguous()


def host_list(t: torch.Tensor) -> list:
    """t.tolist(), cached on the tensor object while it is unmodified (its version counter), so a constant
    such as the expert map costs one device sync, not one per call."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor keeps no version counter: never cached
        return t.tolist()
    cached = getattr(t, "_moe_fx_host", None)
    if cached is None or cached[0] != version:
        cached = (version, t.tolist())
        t._moe_fx_host = cached
    return cached[1]


def keep_host_head(handle: torch.Tensor, head: list[int]) -> torch.Tensor:
    """Attach the host copy of handle[:len(head)], which dispatch synced for, so that combine queues its
    exchange without a second sync (`host_head` falls back to the device when the tensor is another one)."""
    handle._moe_fx_head = head
    return handle


def host_head(handle: torch.Tensor, n: int) -> list[int]:
    """handle[:n] as host ints: the copy dispatch attached when this is the tensor it returned, else a sync."""
    head = getattr(handle, "_moe_fx_head", None)
    return head[:n] if head is not None and len(head) >= n else handle[:n].tolist()


def pack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """[T, *] tensors of any dtypes -> uint8 [T, their bytes]: one collective moves them all."""
    return torch.cat([p.contiguous().view(torch.uint8).reshape(p.shape[0], math.prod(p.shape[1:]) * p.element_size())
                      for p in parts], 1)  # fmt: skip


def unpack_rows(packed_TB: torch.Tensor, layout: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of `pack_rows`: (dtype, columns) per part, each returned contiguous."""
    parts = [packed_TB.new_empty((packed_TB.shape[0], columns), dtype=dtype) for dtype, columns in layout]
    unpack_rows_into(packed_TB, parts)
    return parts


def unpack_rows_into(packed_TB: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """`unpack_rows` into the contiguous [T, columns] tensors `parts` (their dtypes and widths the layout)."""
    start = 0
    for part in parts:
        raw = part.view(torch.uint8)  # [T, columns · itemsize]
        raw.copy_(packed_TB[:, start : start + raw.shape[1]])
        start += raw.shape[1]


def uncapped(spec: MoESpec) -> str | None:
    """Dropped picks (token capacity, zero-computation experts) run on one device only: the parallel
    dispatches refuse them, with the reason. A max_tokens_per_rank bound is the padded exchange's."""
    if spec.max_tokens_per_rank:
        return f"max_tokens_per_rank={spec.max_tokens_per_rank} is set: the padded exchange takes the block"
    if spec.routed_drops():
        return f"{spec.routed_drops()} is not implemented for layout {spec.layout!r}"
    return None


def all_gather_rows(x_ND: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `x_ND` (rank w holds sizes[w] rows): padded all-gather, then unpad."""
    W, n_max = len(sizes), max(sizes)
    padded = x_ND.new_zeros((n_max, *x_ND.shape[1:]))
    padded[: x_ND.shape[0]] = x_ND
    gathered = x_ND.new_empty((W * n_max, *x_ND.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded, group=group)
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
    dist.reduce_scatter_tensor(out, padded, group=group)
    return out[: sizes[rank]]
