"""Run a function on W ranks in spawned processes (localhost, file:// rendezvous): gloo on the CPU, or NCCL
with rank r on cuda:r.

`run_ranks(fn, world, *args)` starts `world` processes, each calling `fn(rank, world, *args)` inside
an initialised default process group, and re-raises the first failure with its rank. Group several
checks per call: process start-up dominates the cost.
"""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, timeout_s: float, backend: str, fn, args) -> None:
    torch.set_num_threads(1)  # W processes share the cores
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast on the lent machines
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout_s: float = 120.0, backend: str = "gloo") -> None:
    """fn(rank, world, *args) on `world` ranks of `backend`; a failing rank's exception is re-raised here."""
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        mp.spawn(_entry, args=(world, init, timeout_s, backend, fn, args), nprocs=world)
