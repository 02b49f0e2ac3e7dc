"""Parallel layouts on torch.distributed: the dispatch and combine lowerings of `ep_alltoall` (exact, or
fixed-size under max_tokens_per_rank), `ep_allgather` and `tp`, the expert placement and weight sharding,
and per-rank load statistics.

The same code runs on gloo (CPU) and NCCL (CUDA). `route` and `experts` need no communication:
the single-device lowerings run them on this rank's rows and weight shard (see `registry.select`).
Importing registers the lowerings.
"""

from moe_fx.lowering.distributed import allgather, alltoall, alltoall_padded, tp  # noqa: F401  (registers the lowerings)
from moe_fx.lowering.distributed.placement import Shard, plan_shard
from moe_fx.lowering.distributed.stats import expert_load, reset_expert_load

__all__ = ["Shard", "expert_load", "plan_shard", "reset_expert_load"]
