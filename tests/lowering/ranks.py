"""Run a function on W gloo ranks in spawned processes (localhost, file:// rendezvous).

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


def _entry(rank: int, world: int, init_file: str, timeout_s: float, fn, args) -> None:
    torch.set_num_threads(1)  # W processes share the cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout_s: float = 120.0) -> None:
    """fn(rank, world, *args) on `world` gloo ranks; a failing rank's exception is re-raised here."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, os.path.join(tmp, "rendezvous"), timeout_s, fn, args), nprocs=world)
