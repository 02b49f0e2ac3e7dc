"""Which rank holds which experts (or which slice of F), checked against the process group, and the
weight shards each rank keeps.

Legend: E experts (global), L experts on this rank, W ranks, F expert ffn dim, D model dim.

Expert parallel (`ep_alltoall`, `ep_allgather`): expert e lives on rank `owner_E[e]`; by default
contiguous blocks of E / W experts. A rank's local experts are the ones it owns, in ascending global
order; `expert_map` [2, E] (row 0: owner rank, row 1: slot among the owner's experts) is the
logical -> physical map the dispatch reads, the groundwork for redundant experts (EPLB, log2phy).
Tensor parallel (`tp`): every rank holds all E experts and a contiguous 1/W slice of F; the
down-projection's bias is added on rank 0 only, so the all-reduce adds it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_fx.spec import MoESpec

log = logging.getLogger("moe_fx")
EP_LAYOUTS = ("ep_alltoall", "ep_allgather")


@dataclass(frozen=True)
class Shard:
    """One rank's part of a block under a parallel layout."""

    layout: str
    group_name: str
    rank: int
    world: int
    owner_E: tuple[int, ...] | None = None  # expert parallel only

    @property
    def expert_parallel(self) -> bool:
        return self.layout in EP_LAYOUTS

    @property
    def local_experts(self) -> tuple[int, ...] | None:
        """Global ids of this rank's experts, in slot order (None under tp: all experts)."""
        if not self.expert_parallel:
            return None
        return tuple(e for e, r in enumerate(self.owner_E) if r == self.rank)

    def num_local_experts(self, num_experts: int) -> int:
        return len(self.local_experts) if self.expert_parallel else num_experts

    def expert_map(self, device: torch.device) -> torch.Tensor | None:
        """[2, E] int64: owner rank and slot on the owner of each expert (None under tp)."""
        if not self.expert_parallel:
            return None
        owner_E = torch.tensor(self.owner_E, dtype=torch.int64)
        slot_E = torch.zeros_like(owner_E)
        for r in range(self.world):
            mine = owner_E == r
            slot_E[mine] = torch.arange(int(mine.sum()))
        return torch.stack([owner_E, slot_E]).to(device)

    def experts_of(self, t_E: torch.Tensor) -> torch.Tensor:
        """This rank's experts of a stacked [E, ...] tensor: a view when they are contiguous, else a copy."""
        local = self.local_experts
        if local and list(local) == list(range(local[0], local[0] + len(local))):
            return t_E.narrow(0, local[0], len(local))
        return t_E.index_select(0, torch.tensor(local, dtype=torch.int64, device=t_E.device))

    def ffn_slice(self, t: torch.Tensor, dim: int, chunks: int) -> torch.Tensor:
        """This rank's 1/W of each of `chunks` equal parts of `dim` (gate and up are 2 chunks), concatenated."""
        size = t.shape[dim] // chunks
        n = size // self.world
        pieces = [t.narrow(dim, c * size + self.rank * n, n) for c in range(chunks)]
        return torch.cat(pieces, dim).contiguous()


def resolve_group(group) -> dist.ProcessGroup:
    """options["group"] (ProcessGroup, 1-D DeviceMesh or None = WORLD) as a ProcessGroup."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "moe_fx: a parallel layout needs torch.distributed initialised (dist.init_process_group) "
                "or options['group']"
            )
        return dist.group.WORLD
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"moe_fx: option group is a {group.ndim}-D DeviceMesh {tuple(group.mesh.shape)}; pass the "
                "1-D sub-mesh of the expert/tensor-parallel dimension, e.g. mesh['ep']"
            )
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise ValueError(f"moe_fx: option group must be a ProcessGroup or a DeviceMesh, got {type(group).__name__}")


def _check_backend(group: dist.ProcessGroup, layout: str, device: str) -> None:
    try:
        group._get_backend(torch.device(device))
    except RuntimeError as e:
        raise ValueError(
            f"moe_fx: layout={layout!r} on {device} tensors needs a process group with a {device} backend; "
            f"group {group.group_name!r} has backend {dist.get_backend(group)!r} (gloo runs on cpu, nccl on cuda)"
        ) from e


def plan_shard(spec: MoESpec, group, placement: tuple[int, ...] | None, device: str) -> Shard | None:
    """This rank's part of a block under `spec.layout` (None for "single"), or a `moe_fx:` ValueError."""
    if spec.layout == "single":
        return None
    pg = resolve_group(group)
    _check_backend(pg, spec.layout, device)
    W, rank = pg.size(), pg.rank()
    E, F = spec.experts.num_experts, spec.experts.ffn
    if spec.layout == "tp":
        if F % W:
            raise ValueError(f"moe_fx: layout='tp' shards F: ffn dim F ({F}) must be divisible by the world size ({W})")
        return Shard(spec.layout, pg.group_name, rank, W)
    if placement is None:
        if E % W:
            raise ValueError(
                f"moe_fx: num_experts E ({E}) must be divisible by the world size ({W}) of group "
                f"{pg.group_name!r}, or give options['expert_placement'] (the rank of each expert)"
            )
        owner_E = tuple(e // (E // W) for e in range(E))
    else:
        if len(placement) != E:
            raise ValueError(f"moe_fx: expert_placement has {len(placement)} entries but the block has E={E} experts")
        bad = sorted({r for r in placement if not 0 <= r < W})
        if bad:
            raise ValueError(
                f"moe_fx: expert_placement names rank(s) {bad} but group {pg.group_name!r} has world size {W}"
            )
        owner_E = tuple(int(r) for r in placement)
    shard = Shard(spec.layout, pg.group_name, rank, W, owner_E)
    log.info("moe_fx: %s rank %d/%d holds experts %s", spec.layout, rank, W, shard.local_experts)
    return shard


def shard_weights(shard: Shard, spec: MoESpec, stacked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """This rank's part of each stacked weight (roles w13, w3, w2, w13_bias, w2_bias; [E, ...] each).

    Expert parallel: the local experts' rows of every role. tp: the rank's slice of F, taken from gate
    and up separately when they are concatenated; w2_bias on rank 0 only (None elsewhere).
    """
    if shard.expert_parallel:
        return {role: shard.experts_of(t) for role, t in stacked.items()}
    es = spec.experts
    chunks13 = 2 if es.gated and es.gate_up in ("concat", "up_first") else 1
    h_dim = 2 if es.w13_transposed else 1
    f_dim = {"w13": h_dim, "w3": h_dim, "w2": 1 if es.w2_transposed else 2, "w13_bias": 1}
    chunks = {"w13": chunks13, "w3": 1, "w2": 1, "w13_bias": chunks13}
    local = {role: shard.ffn_slice(t, f_dim[role], chunks[role]) for role, t in stacked.items() if role != "w2_bias"}
    if "w2_bias" in stacked:
        local["w2_bias"] = stacked["w2_bias"] if shard.rank == 0 else None
    return local
