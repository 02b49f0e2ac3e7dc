"""Per-rank tokens-per-expert counts, recorded by the expert-parallel dispatches, so load imbalance shows.

Legend: W ranks, E experts (global).

Every `ep_alltoall` / `ep_allgather` dispatch already knows, on every rank, how many rows each rank
routes to each expert (the counts exchanged before the rows). They are summed here per process
group and expert count, over calls and MoE layers, until `reset_expert_load()`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

_LOCK = threading.Lock()
_LOAD: dict[tuple[str, int], torch.Tensor] = {}  # (group name, E) -> counts_WE, int64
_CALLS: dict[tuple[str, int], int] = {}
_OWNERS: dict[tuple[str, int], torch.Tensor] = {}  # (group name, E) -> owner rank of each expert


@dataclass(frozen=True)
class ExpertLoad:
    """Rows routed by rank w to expert e (`counts_WE`), summed over `calls` dispatches.

    `rows_per_rank` is what each rank's experts received under `owner_E` (the expert -> rank placement).
    """

    group_name: str
    counts_WE: torch.Tensor
    calls: int
    owner_E: torch.Tensor

    @property
    def rows_per_rank(self) -> torch.Tensor:
        W = self.counts_WE.shape[0]
        return torch.zeros(W, dtype=torch.int64).index_add_(0, self.owner_E, self.counts_WE.sum(0))

    @property
    def imbalance(self) -> float:
        """max / mean of the rows each rank's experts received (1.0 = perfectly balanced)."""
        rows = self.rows_per_rank.double()
        return (rows.max() / rows.mean().clamp_min(1e-30)).item()

    def __str__(self) -> str:
        return (
            f"group {self.group_name}: {self.calls} dispatch(es), rows per rank {self.rows_per_rank.tolist()}, "
            f"imbalance (max/mean) {self.imbalance:.2f}, tokens per expert {self.counts_WE.sum(0).tolist()}"
        )


def record(group_name: str, counts_WE: torch.Tensor, owner_E: torch.Tensor) -> None:
    """Add one dispatch's counts (device tensors; no host sync here)."""
    key = (group_name, counts_WE.shape[1])
    with _LOCK:
        if key in _LOAD and _LOAD[key].shape == counts_WE.shape and _LOAD[key].device == counts_WE.device:
            _LOAD[key] += counts_WE
            _CALLS[key] += 1
        else:
            _LOAD[key], _CALLS[key] = counts_WE.clone(), 1
        _OWNERS[key] = owner_E


def expert_load() -> list[ExpertLoad]:
    """The counts recorded in this process since the last reset, one entry per (group, E)."""
    with _LOCK:
        return [
            ExpertLoad(name, _LOAD[(name, E)].cpu(), _CALLS[(name, E)], _OWNERS[(name, E)].cpu())
            for name, E in sorted(_LOAD)
        ]


def reset_expert_load() -> None:
    with _LOCK:
        _LOAD.clear()
        _CALLS.clear()
        _OWNERS.clear()
