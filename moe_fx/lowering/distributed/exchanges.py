"""Exchanges a dispatch has started and not yet waited for: what lets a shared expert overlap them.

A dispatch lowering registered with `overlaps=True` (ep_alltoall's) starts its all-to-all with
`async_op=True` and returns outputs that the exchange's `finish` fills. The ops that read dispatch's
outputs, `experts` and `combine`, call `finish_exchanges()` before their lowering runs, so whatever the
graph runs in between (the rewrite moves a block's shared expert there: `passes/overlap.py`) runs while
the rows travel: on gloo the exchange runs on the process group's threads, on NCCL on its stream (`wait`
then orders the current stream after it, without blocking the host). A rank that never joins surfaces
in `wait`, with the process group's timeout.

Per thread: two threads running models must not finish (or wait on) each other's exchanges.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch.distributed as dist

_LOCAL = threading.local()


def _pending() -> list[tuple[dist.Work, Callable[[], None]]]:
    if not hasattr(_LOCAL, "pending"):
        _LOCAL.pending = []
    return _LOCAL.pending


def start_exchange(work: dist.Work, finish: Callable[[], None]) -> None:
    """Register a started collective and the function that fills the outputs from its result."""
    _pending().append((work, finish))


def finish_exchanges() -> None:
    """Wait for every exchange this thread started, oldest first, and fill its outputs."""
    pending = _pending()
    while pending:
        work, finish = pending.pop(0)
        work.wait()
        finish()


def in_flight() -> int:
    """How many exchanges this thread has started and not finished."""
    return len(_pending())
