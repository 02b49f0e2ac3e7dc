"""Capture HuggingFace's `eager` experts as a traceable implementation while moe_fx traces.

transformers 5.x experts (`@use_experts_implementation`) run `config._experts_implementation`:
`grouped_mm` (default), `batched_mm`, or `eager`, a loop over `nonzero()` whose body never reaches a
Dynamo graph. While moe_fx captures (`torch.compile(backend="moe_fx")` tracing, `apply`, `explain`),
`traceable_eager_experts()` makes Dynamo trace `eager` as HF's own `batched_mm` (the same math:
gather each (token, slot)'s expert weights, two bmm, weighted sum over K); the matcher then verifies
the block on probes and rewrites it. Outside tracing (`torch.compiler.is_compiling()` False) nothing
changes: a block moe_fx leaves alone still runs the eager loop when run eagerly. transformers 4.x has
no experts implementations; this is then a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

log = logging.getLogger("moe_fx")
TRACED_AS = "batched_mm"
_LOCK = threading.Lock()
_inside = 0  # threads inside traceable_eager_experts(); nested save/restore from two threads would
_original = None  # otherwise leave the patch installed for good


@contextlib.contextmanager
def traceable_eager_experts():
    """Within the context, Dynamo traces HF `eager` experts as `batched_mm`."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:  # no transformers, or 4.x: nothing to do
        yield
        return
    global _inside, _original
    with _LOCK:  # the patch is process-wide: the first thread in installs it, the last one out removes it
        if _inside == 0:
            _original = original = ExpertsInterface.get_interface

            def get_interface(self, experts_implementation, default):
                if experts_implementation in ("eager", None) and torch.compiler.is_compiling() and TRACED_AS in self:
                    return self[TRACED_AS]
                return original(self, experts_implementation, default)

            ExpertsInterface.get_interface = get_interface
        _inside += 1
    try:
        yield
    finally:
        with _LOCK:
            _inside -= 1
            if _inside == 0:
                ExpertsInterface.get_interface = _original
