"""`torch.compile(model, backend="moe_fx")`: rewrite MoE blocks, then hand the graph to Inductor.

The backend is registered only through the `torch_dynamo_backends` entry point (pyproject.toml).

Capture flags. Loop forms over `nonzero`/`where` reach the graph whole only with Dynamo's
`capture_dynamic_output_shape_ops` and `capture_scalar_outputs`. Dynamo enters a backend's
`backend_ctx_ctor` around every call of the compiled function, but `torch.compile(backend="name")`
wraps the backend twice (`_TorchCompileWrapper`, then `WrapBackendDebug`) and the attribute is lost.
Importing this module (which Dynamo does when it resolves the name) gives `WrapBackendDebug` a
`backend_ctx_ctor` property that forwards the wrapped backend's own: the flags then hold only while a
moe_fx-compiled function runs. Backends without the attribute get `nullcontext`, as before. If a
future torch moves that class, the flags are set process-wide instead, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings

import torch

from moe_fx.capture.breaks import breaks_on_unbacked_tolist
from moe_fx.capture.hf_experts import traceable_eager_experts
from moe_fx.capture.opaque_experts import opaque_loop_experts
from moe_fx.options import parse_options
from moe_fx.passes.pipeline import rewrite_graph
from moe_fx.passes.quantize_weights import GRAPH_ATTR, refresh
from moe_fx.passes.rewrite import apply_rebind
from moe_fx.passes.weights import keep_current
from moe_fx.report import Report

log = logging.getLogger("moe_fx")
CAPTURE_FLAGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
_reports: list[Report] = []
_LOCK = threading.Lock()  # guards _reports: apply/explain may run while another thread compiles


@contextlib.contextmanager
def capture_config():
    """Dynamo flags under which loop forms over nonzero/where are captured whole; HF `eager` experts
    are traced as `batched_mm` (see `moe_fx.capture.hf_experts`), other experts-contract modules as one opaque
    op (see `moe_fx.capture.opaque_experts`); a `.tolist()` the flags would fail on breaks the graph
    (`moe_fx.capture.breaks`).

    `config.patch` overrides are thread-local on this torch (ContextVar-backed), so a thread that
    compiles with moe_fx never changes what another thread's compile sees.
    """
    with (
        torch._dynamo.config.patch(CAPTURE_FLAGS),
        traceable_eager_experts(),
        opaque_loop_experts(),
        breaks_on_unbacked_tolist(),
    ):
        yield


def moe_fx_backend(gm: torch.fx.GraphModule, example_inputs: list, *, options=None, mode=None):
    """Rewrite the MoE blocks of a Dynamo graph, then compile it with options["inner"] (Inductor default)."""
    opts = parse_options(options)
    if opts.quant != "none" and not opts.keep_original_weights:
        raise ValueError(
            "moe_fx: keep_original_weights=False needs moe_fx.apply(model, options=...): under torch.compile a "
            "recompile (a new input shape) traces the model's own expert weights again, so they must stay"
        )
    rebind = []  # parameters become views of stacked weights only after the inner compiler has traced
    report = rewrite_graph(gm, example_inputs, opts, rebind=rebind, inner_reorders=opts.inner != "eager")
    with _LOCK:
        _reports.append(report)
    if opts.inner == "eager":
        compiled = gm.forward
    else:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)
    apply_rebind(rebind)
    compiled = _reading_current_weights(compiled, example_inputs, rebind)
    if getattr(gm, GRAPH_ATTR, None):  # quantised weights follow in-place weight updates
        return _refreshing(gm, compiled)
    return compiled


def _reading_current_weights(compiled, example_inputs: list, rebind: list):
    """Dynamo passes the parameters in on every call but does not guard on their storage: a parameter
    replaced after compiling (`load_state_dict(assign=True)`) would leave the stacked copy stale.
    Check the rebound parameters' pointers on each call (no copy unless one was replaced)."""
    index = {id(t): i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)}
    plan = [(index[id(p)], view) for p, view in rebind if id(p) in index]
    if not plan:
        return compiled

    def run(*args):
        why = keep_current([(args[i], view) for i, view in plan])
        if why is not None:  # Dynamo guards on dtype, shape and device: unreachable unless that changes
            raise RuntimeError(f"moe_fx: {why}; recompile the model")
        return compiled(*args)

    return run


def _refreshing(gm: torch.fx.GraphModule, compiled):
    def run(*args):
        refresh(gm)
        return compiled(*args)

    return run


moe_fx_backend.backend_ctx_ctor = capture_config


def last_reports() -> list[Report]:
    """Reports of the graphs the backend compiled in this process, oldest first."""
    with _LOCK:
        return list(_reports)


def _forward_backend_ctx() -> None:
    try:
        from torch._dynamo.repro.after_dynamo import WrapBackendDebug
    except ImportError:
        msg = "moe_fx: cannot scope Dynamo capture flags on this torch; setting them process-wide"
        warnings.warn(msg, stacklevel=2)
        for key, val in CAPTURE_FLAGS.items():
            setattr(torch._dynamo.config, key, val)
        return
    if "backend_ctx_ctor" in vars(WrapBackendDebug):
        return

    def backend_ctx_ctor(self):
        fn = self._torchdynamo_orig_backend
        fn = getattr(fn, "compiler_fn", fn)  # torch.compile's _TorchCompileWrapper
        return getattr(fn, "backend_ctx_ctor", contextlib.nullcontext)

    WrapBackendDebug.backend_ctx_ctor = property(backend_ctx_ctor)


_forward_backend_ctx()
