"""Capture HuggingFace's `eager` experts as a traceable implementation while moe_fx traces.

transformers 5.x experts (`@use_experts_implementation`) run `config._experts_implementation`:
`grouped_mm` (default), `batched_mm`, or `eager`, a loop over `nonzero()` whose body never reaches a
Dynamo graph. While moe_fx captures (`torch.compile(backend="moe_fx")` tracing, `apply`, `explain`),
`traceable_eager_experts()` makes Dynamo trace `eager` as HF's own `batched_mm` (the same math:
gather each (token, slot)'s expert weights, two bmm, weighted sum over K); the matcher then verifies
the block on probes and rewrites it. Outside tracing (`torch.compiler.is_compiling()` False) nothing
changes: a block moe_fx leaves alone still runs the eager loop when run eagerly, and the model's
`config._experts_implementation` is never touched. transformers 4.x has no experts implementations;
this is then a no-op.

`ExpertsInterface.get_interface` is wrapped once, on first use; the wrapper acts only while some
thread is inside the context (`switch.CaptureSwitch`).
"""

from __future__ import annotations

import torch

from moe_fx.capture.switch import CaptureSwitch

TRACED_AS = "batched_mm"
_installed = False


def _install() -> bool:
    """Wrap `ExpertsInterface.get_interface` (once). False without transformers 5.x."""
    global _installed
    if _installed:
        return True
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    original = ExpertsInterface.get_interface

    def get_interface(self, experts_implementation, default):
        if (
            SWITCH.active
            and experts_implementation in ("eager", None)
            and torch.compiler.is_compiling()
            and TRACED_AS in self
        ):
            return self[TRACED_AS]
        return original(self, experts_implementation, default)

    ExpertsInterface.get_interface = get_interface
    _installed = True
    return True


SWITCH = CaptureSwitch(_install)
# Within the context, Dynamo traces HF `eager` experts as `batched_mm`.
traceable_eager_experts = SWITCH.on
