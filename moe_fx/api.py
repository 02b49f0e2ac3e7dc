"""`moe_fx.explain(model, *inputs)` and `moe_fx.apply(model, *inputs)`.

Capture: the model runs once under Dynamo (with moe_fx's capture flags) to find the blocks and the
module that owns each (the deepest module holding its router and experts). `apply` then captures each
owner alone with `torch._dynamo.export` (dynamic shapes, parameters as attributes), rewrites that
graph and installs it as the owner's `forward`: plain Python calling the moe_fx ops, so eager runs and
any later `torch.compile` backend see the rewritten block. An owner whose call holds objects export
cannot take (a transformers `Cache`) is captured on its tensors, the children it hands those objects
to running as opaque calls on each call's own objects (`moe_fx.capture.passthrough`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from moe_fx.backend import capture_config
from moe_fx.capture import hit_loops, passthrough
from moe_fx.capture.guards import CAPTURES, Assumed, CaptureGuards, capturing, ones_fixed
from moe_fx.lowering.quant import EXPECTED_ERROR
from moe_fx.options import parse_options
from moe_fx.passes.identify import block_tolerance
from moe_fx.passes.pipeline import rewrite_graph
from moe_fx.passes.quantize_weights import refresh
from moe_fx.passes.rewrite import apply_rebind
from moe_fx.passes.weights import keep_current
from moe_fx.report import RejectionReport, Report

log = logging.getLogger("moe_fx")


def _example_inputs(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args or kwargs:
        return args, kwargs
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict) and dummy:
        device = next(model.parameters()).device  # dummy_inputs are made on the CPU
        return (), {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dummy.items()}
    raise ValueError(
        f"moe_fx: {type(model).__name__} needs example inputs to be traced: call moe_fx.apply(model, *inputs) "
        "or moe_fx.explain(model, *inputs) (HuggingFace models fall back to model.dummy_inputs)"
    )


def _break_text(reason) -> str:
    """The first line of Dynamo's graph-break reason, and where in the user's code it broke."""
    text = reason.reason.strip().splitlines()[0]
    where = reason.user_stack[-1] if reason.user_stack else None
    return f"{text} ({where.filename}:{where.lineno})" if where else text


def _skipped_frames(before: dict) -> list[str]:
    """Why Dynamo skipped whole frames since `before` (a copy of its "unimplemented" counter): a graph break inside
    a loop makes it run the frame eagerly and record no graph break reason, so a block there shows in no graph."""
    from torch._dynamo.utils import counters

    found = []
    for text, n in counters["unimplemented"].items():
        if n <= before.get(text, 0) or "frame skipped" not in text:
            continue
        first = text.strip().splitlines()[0]
        where = text[text.index("frame skipped") :].splitlines()[0].removeprefix("frame skipped: ")
        found.append(f"{first} inside a loop: Dynamo skipped the frame {where} and runs it eagerly (no graph)")
    return found


def _capture(fn, args, kwargs) -> tuple[list[tuple[torch.fx.GraphModule, list]], list[str]]:
    """The Dynamo graphs of one call of fn, with their real example inputs, and why the graph broke (or a frame
    was skipped)."""
    from torch._dynamo.utils import counters

    graphs = []
    before = dict(counters["unimplemented"])

    def backend(gm, example_inputs, **_):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    failed = None
    try:
        with capture_config(), torch.no_grad():
            torch.compile(fn, backend=backend)(*args, **kwargs)
    except Exception as err:  # Dynamo failing under the capture flags: capture as a plain compile would
        first_line = (str(err).strip().splitlines() or [""])[0]
        failed = (
            f"Dynamo failed under moe_fx's capture flags ({type(err).__name__}: {first_line[:200]}); "
            "captured without them"
        )
        log.warning("moe_fx: %s", failed)
        graphs.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(fn, backend=backend)(*args, **kwargs)
    breaks = [_break_text(r) for r in torch._dynamo.utils.graph_break_reasons] + _skipped_frames(before)
    torch._dynamo.reset()
    return graphs, [failed, *breaks] if failed else breaks


def explain(model_or_fn, *args, options: dict[str, Any] | None = None, **kwargs) -> Report:
    """What moe_fx would do to `model_or_fn` called on these inputs: matches, lowerings, rejections.

    The model is left as it is: explain rewrites its own captured copy of the graph, so that each
    block's subgraph before and after the rewrite can be drawn (`report.draw`). Returns a Report
    (prints as a table, renders as HTML in notebooks).
    """
    opts = parse_options(options)
    args, kwargs = _example_inputs(model_or_fn, args, kwargs)
    report = _explain(model_or_fn, args, kwargs, opts)
    if isinstance(model_or_fn, nn.Module):  # what apply's second capture would find (the model stays as it is)
        owners = _hit_loop_owners(model_or_fn, report, [m.module_path for m in report.matches])
        if owners:
            recorded, snapshots = _record_inputs(model_or_fn, args, kwargs, set(owners.values()))
            _rewrite_hit_loops(owners, recorded, snapshots, opts, report, install=False)
    return report


def _explain(model_or_fn, args: tuple, kwargs: dict, opts) -> Report:
    """`explain` of the ordinary capture: one run under Dynamo, each graph rewritten as a dry run."""
    graphs, breaks = _capture(model_or_fn, args, kwargs)
    report = Report(break_reasons=breaks)
    for i, (gm, example_inputs) in enumerate(graphs):
        with torch.no_grad():  # apply's forward runs the original block in grad mode (see _RewrittenForward)
            report.extend(rewrite_graph(gm, example_inputs, opts, dry_run=True, graph=i))
    report.graph_breaks = max(0, len(graphs) - 1)
    return report


def _flat_inputs(args: tuple, kwargs: dict) -> list:
    """The call's leaves in the order of the captured graph's placeholders."""
    return [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, (torch.Tensor, int, float, bool))]


class _RewrittenForward:
    """A module's new forward: the rewritten graph, with the original kept for grad mode and for calls the
    capture was not made for (`CaptureGuards`). `passed`: the call's objects export could not take, passed
    through to opaque calls (None: the graph takes the call as it is)."""

    def __init__(
        self,
        module: nn.Module,
        gm: torch.fx.GraphModule,
        original,
        example: list,
        assumed: Assumed,
        rebind: list,
        layout: str,
        passed: passthrough.Passthrough | None = None,
    ):
        self.gm, self.original, self.module, self.layout, self.passed = gm, original, module, layout, passed
        self.guards = CaptureGuards(gm, example, assumed)
        self.warned: set[str] = set()
        # where the graph reads each parameter: its view of a stacked tensor, or the parameter it captured
        reads = {id(p): view for p, view in rebind}
        reads.update((id(t), t) for t in (*gm.parameters(), *gm.buffers()) if id(t) not in reads)
        self.weights = [
            (m, name, reads[id(p)])
            for m in module.modules()
            for name, p in m._parameters.items()
            if p is not None and id(p) in reads
        ]

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def _fallback(self, why: str, *args, **kwargs):
        if why not in self.warned:
            warnings.warn(f"moe_fx: running the original block: {why}", stacklevel=4)
            self.warned.add(why)
        return self.original(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        if self.passed is not None:
            return self._eager_call(*args, **kwargs)
        return self._call(*args, **kwargs)

    # A later torch.compile runs a module that passes objects through eagerly (a graph break): Dynamo lifts
    # the callables of the graph's opaque calls as graph inputs and cannot generate code for them (torch
    # 2.13: "'InvokeLeafFunction' object has no attribute '_LeafCallable'"); the call's objects are set aside
    # in Python state for those calls
    @torch._dynamo.disable
    def _eager_call(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def _call(self, *args, **kwargs):
        flat = _flat_inputs(args, kwargs)
        if torch.is_grad_enabled() and any(
            t.requires_grad for t in (*self.params, *flat) if isinstance(t, torch.Tensor)
        ):
            if self.layout != "single":  # the original block's weights were cut down to this rank's shard
                raise RuntimeError(
                    f"moe_fx: layout={self.layout!r} has no autograd yet and the original block no longer "
                    "holds every expert: run under torch.no_grad()/inference_mode()"
                )
            why = "grad mode with trainable expert weights or inputs (moe_fx lowerings have no autograd yet)"
            return self._fallback(why, *args, **kwargs)
        why = self.passed.check(args, kwargs) if self.passed is not None else None
        if why is None:
            graph_inputs = flat if self.passed is None else self.passed.graph_inputs(args, kwargs)
            why = self.guards.failure(graph_inputs) or keep_current(
                [(m._parameters[name], target) for m, name, target in self.weights]
            )
        if why is not None:
            return self._fallback(why, *args, **kwargs)
        refresh(self.gm)
        return self.gm(*args, **kwargs) if self.passed is None else self.passed.run(self.gm, args, kwargs)


def _record_inputs(model: nn.Module, args, kwargs, owners=()) -> tuple[dict, dict]:
    """Each module's first call ((args, kwargs), by reference), and for each of `owners` whose call holds
    objects export cannot take, copies of those objects as they were before it ran (or why none)."""
    seen: dict[nn.Module, tuple[tuple, dict]] = {}
    snapshots: dict[nn.Module, list | str] = {}

    def hook(module, margs, mkwargs):
        if module in owners and module not in seen and passthrough.passed_objects(margs, mkwargs):
            try:
                snapshots[module] = passthrough.snapshot(margs, mkwargs)
            except Exception as e:
                snapshots[module] = f"could not copy the objects its call holds: {e!r}"
        seen.setdefault(module, (margs, mkwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen, snapshots


class _CaptureFailed(Exception):
    """No way of capturing the owner traced it (the rewrite's own errors propagate as they are)."""


def _capture_and_rewrite(owner: nn.Module, recorded: dict, snapshots: dict, opts, wanted: int) -> tuple:
    """The owner captured alone and rewritten: (graph, its example inputs, its Passthrough (None when export takes
    the whole call), what the capture assumed about sizes (`capture.guards.Assumed`), the rebinds, the report).

    Captured each way of `capture.guards.CAPTURES` in turn, from the most general (every size a symbol), until
    one traces the owner and yields the `wanted` blocks (the matcher needs some sizes known, such as the hidden
    size, that a capture keeping sizes 0 and 1 symbolic may leave a symbol); the last one's result stands."""
    leaves = pytree.tree_leaves(recorded[owner])
    modes, fixing = [], []  # a mode that fixes no size, or the same sizes as the one before, is the same capture
    for mode in CAPTURES:
        fixed = [(id(t), dims) for t, dims in ones_fixed(mode, leaves)]
        if mode.endswith("ones_fixed") and (not fixed or fixed == fixing):
            continue
        modes.append(mode)
        fixing = fixed
    result = None
    for mode in modes:
        try:
            with capturing(mode, leaves) as capture:
                gm, flat_inputs, passed = _export(owner, recorded, snapshots)
        except Exception as e:
            if mode == modes[-1] or _fails_in_every_mode(e):
                raise _CaptureFailed(e) from e
            log.info("moe_fx: capturing %s (%s) failed: %r", type(owner).__name__, mode, e)
            continue
        assumed = capture.assumed(gm)  # before the rewrite adds conditions of its own
        rebind = []
        passing = passed.capturing() if passed is not None else nullcontext()
        with torch.no_grad(), capturing(mode, leaves), passing:
            block_report = rewrite_graph(gm, flat_inputs, opts, owns_forward=True, rebind=rebind)
        result = gm, flat_inputs, passed, assumed, rebind, block_report
        if len(block_report.matches) >= wanted:
            break
        log.info("moe_fx: %s (%s) gave %d of %d blocks", type(owner).__name__, mode, len(block_report.matches), wanted)
    return result


def _place(path: str, block_report: Report) -> None:
    """The module paths of an owner's capture (`_capture_and_rewrite`) are relative to the owner at `path`: made
    the model's, for its matches and its rejections alike."""
    for entry in (*block_report.matches, *block_report.rejections):
        entry.module_path = ".".join(p for p in (path, entry.module_path) if p)


def _fails_in_every_mode(e: Exception) -> bool:
    """Whether a capture's error is one the other modes, which differ only in the sizes they keep symbolic, would
    raise again: an input or output of a type export can't flatten (a transformers `EncoderDecoderCache`
    returned by the owner). Each retry traces the whole owner again."""
    from torch._dynamo.exc import UserError, UserErrorType

    return isinstance(e, UserError) and e.error_type in (UserErrorType.INVALID_INPUT, UserErrorType.INVALID_OUTPUT)


def _export(owner: nn.Module, recorded: dict, snapshots: dict) -> tuple:
    """(the owner's graph, its example inputs, its Passthrough or None), by `torch._dynamo.export`."""
    margs, mkwargs = recorded[owner]
    objects = passthrough.passed_objects(margs, mkwargs)
    if not objects:
        with capture_config(), torch.no_grad():
            gm = torch._dynamo.export(owner, assume_static_by_default=False)(*margs, **mkwargs).graph_module
        return gm, _flat_inputs(margs, mkwargs), None
    snapshot = snapshots[owner]
    if isinstance(snapshot, str):
        raise ValueError(f"moe_fx: {snapshot}")
    passed = passthrough.Passthrough(margs, mkwargs, snapshot)
    with capture_config(), torch.no_grad():
        gm = passed.export(owner, passthrough.receivers(owner, recorded, objects), margs, mkwargs)
    why = passed.verify(gm, owner.forward, margs, mkwargs)
    if why is not None:
        raise ValueError(f"moe_fx: {why}")
    return gm, passed.graph_inputs(margs, mkwargs), passed


def _reject(report: Report, path: str, reason: str) -> None:
    log.info("moe_fx: not rewriting %s: %s", path, reason)
    report.rejections.append(RejectionReport(path, "", reason))


def apply(model: nn.Module, *args, options: dict[str, Any] | None = None, **kwargs) -> Report:
    """Rewrite `model`'s MoE blocks in place (eager use and other backends). Returns a Report.

    Example inputs are needed to trace; HuggingFace models default to `model.dummy_inputs`.
    A second call is a no-op that returns the first Report.
    """
    done = getattr(model, "_moe_fx_report", None)
    if done is not None:
        return done
    opts = parse_options(options)
    args, kwargs = _example_inputs(model, args, kwargs)
    found = _explain(model, args, kwargs, opts)
    report = Report(
        graphs=found.graphs,
        graph_breaks=found.graph_breaks,
        break_reasons=found.break_reasons,
        rejections=list(found.rejections),
    )
    paths = list(dict.fromkeys(m.module_path for m in found.matches))
    loop_owners = _hit_loop_owners(model, found, paths)
    owners = {model.get_submodule(p) for p in paths} | set(loop_owners.values())
    recorded, snapshots = _record_inputs(model, args, kwargs, owners)
    for path in paths:
        owner = model.get_submodule(path)
        if owner not in recorded:
            _reject(report, path, "the owning module was not called directly")
            continue
        wanted = sum(m.module_path == path for m in found.matches)
        try:
            gm, flat_inputs, passed, assumed, rebind, block_report = _capture_and_rewrite(
                owner, recorded, snapshots, opts, wanted
            )
        except _CaptureFailed as failed:
            _reject(report, path, f"could not capture the block module whole: {failed.__cause__!r}"[:300])
            continue
        if passed is not None:
            passed.release_snapshot()
        apply_rebind(rebind)
        _place(path, block_report)
        report.matches += block_report.matches
        report.rejections += block_report.rejections
        if block_report.matches:
            owner.forward = _RewrittenForward(
                owner, gm, owner.forward, flat_inputs, assumed, rebind, opts.layout, passed
            )
            note = owner.forward.guards.serves()
            for m in block_report.matches:
                m.capture_note = note
    _rewrite_hit_loops(loop_owners, recorded, snapshots, opts, report, install=True)
    model._moe_fx_report = report
    return report


_BREAK_AT = (re.compile(r"\(([^()]+):(\d+)\)$"), re.compile(r"\(([^()]+) line (\d+)\)"))


def _break_lines(break_reasons: list[str]) -> set[tuple[str, int]]:
    """The (file, line) of the user code where each graph break (or skipped frame) happened."""
    lines = set()
    for text in break_reasons:
        for pattern in _BREAK_AT:
            if found := pattern.search(text or ""):
                lines.add((found.group(1), int(found.group(2))))
    return lines


@functools.cache
def _class_span(cls: type) -> tuple[str, int, int] | None:
    """(file, first line, last line) of a class's source, or None where it has none."""
    try:
        lines, first = inspect.getsourcelines(cls)
        return inspect.getsourcefile(cls) or "", first, first + len(lines) - 1
    except (OSError, TypeError):
        return None


def _own_classes(cls: type) -> list[type]:
    """`cls` and the classes it inherits from, nn.Module and object aside: where a module's own code lives."""
    return [c for c in cls.__mro__ if c not in (nn.Module, object)]


@functools.cache
def _class_source(cls: type) -> str:
    """The source of a module class's own code (`_own_classes`), "" where there is none."""
    texts = []
    for c in _own_classes(cls):
        try:
            texts.append(inspect.getsource(c))
        except (OSError, TypeError):
            pass
    return "\n".join(texts)


def _in_class_code(cls: type, lines: set[tuple[str, int]]) -> bool:
    """Whether one of the (file, line) `lines` lies in a module class's own code (`_own_classes`)."""
    spans = [_class_span(c) for c in _own_classes(cls)]
    return any(span and f == span[0] and span[1] <= n <= span[2] for span in spans for f, n in lines)


def _nested(a: str, b: str) -> bool:
    """Whether module paths a and b are one and the same, or one holds the other."""
    return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")


def _hit_loop_owners(model: nn.Module, found: Report, taken: list[str]) -> dict[str, nn.Module]:
    """Where a loop over the experts hit may hide a block (`moe_fx.capture.hit_loops`): the modules whose code, or a
    submodule's, calls a top-k, and whose own code broke the capture (or made Dynamo skip a frame), or, where the
    loop is a submodule's (GPT-OSS's experts in 4.57), the smallest module holding both; deepest first, apart from
    those that hold or are held by a block found already."""
    lines = _break_lines(found.break_reasons)
    if not lines:
        return {}

    @functools.cache  # asked of each module up to three times (itself, as a child, the condition's two halves)
    def holds(m: nn.Module) -> tuple[bool, bool]:  # (a top-k, a break line) in m's code or a submodule's
        subs = list(m.modules())
        return (any("topk" in _class_source(type(sub)) for sub in subs),
                any(_in_class_code(type(sub), lines) for sub in subs))  # fmt: skip

    owners = {
        path: m
        for path, m in model.named_modules()
        if holds(m)[0]
        and (_in_class_code(type(m), lines) or holds(m)[1] and not any(all(holds(c)) for c in m.children()))
        and not any(_nested(path, t) for t in taken)
    }
    return dict(sorted(owners.items(), key=lambda item: -item[0].count(".") - bool(item[0])))


def _rewrite_hit_loops(owners: dict, recorded: dict, snapshots: dict, opts, report: Report, install: bool) -> None:
    """`_rewrite_hit_loop` for each of `owners` (deepest first) but those that hold one rewritten before."""
    done: list[str] = []
    for path, owner in owners.items():
        if not any(_nested(path, d) for d in done) and _rewrite_hit_loop(
            path, owner, recorded, snapshots, opts, report, install
        ):
            done.append(path)


def _rewrite_hit_loop(
    path: str, owner: nn.Module, recorded: dict, snapshots: dict, opts, report: Report, install: bool
) -> bool:
    """Capture `owner` with its loops over the experts hit run over every expert (`hit_loops`), and, if the rewrite
    agrees with the original forward on probes (most experts without tokens), report it and, `install`, install
    it. A module that yields no block this way is left as it is, and the report as the ordinary capture made it."""
    if owner not in recorded or owner in snapshots:  # not called, or passing objects through: not this way
        return False
    try:
        with hit_loops.every_expert():
            gm, flat_inputs, passed, assumed, rebind, block_report = _capture_and_rewrite(
                owner, recorded, snapshots, opts, 1
            )
    except Exception as e:  # not capturable this way either: the ordinary capture's report stands
        log.info("moe_fx: %s: no capture with its hit-expert loops unrolled: %r", path or "<root>", e)
        return False
    if not block_report.matches:
        return False
    margs, mkwargs = recorded[owner]
    tensors = [t for t in (*pytree.tree_leaves((margs, mkwargs)), *owner.parameters()) if isinstance(t, torch.Tensor)]
    tol = max(
        block_tolerance(*(t.dtype for t in tensors if t.is_floating_point())),
        *(EXPECTED_ERROR.get(m.spec.quant.mode, 0.0) for m in block_report.matches),
    )

    def rewritten(*args, **kwargs):
        refresh(gm)
        return gm(*args, **kwargs)

    pooled = any(m.spec.quant.mode != "none" for m in block_report.matches)
    err, why = hit_loops.check_against_original(owner.forward, rewritten, margs, mkwargs, tol, pooled)
    if why is not None:
        _reject(report, path, f"captured with its loop over the experts hit run over every expert, it disagrees "
                f"with the original forward: {why}")  # fmt: skip
        return False
    notes = [
        "its loop over the experts hit was captured as a loop over every expert, and the rewrite agrees with "
        f"the original forward on probes where most experts get no token (rel err {err:.1e})"
    ]
    if install:
        apply_rebind(rebind)
        owner.forward = _RewrittenForward(owner, gm, owner.forward, flat_inputs, assumed, rebind, opts.layout, passed)
        notes.append(owner.forward.guards.serves())
    note = "; ".join(n for n in notes if n)
    _place(path, block_report)
    for m in block_report.matches:
        m.errors["against the original forward"] = err
        m.capture_note = note
    report.matches += block_report.matches
    # the owner's capture replaces what the ordinary one said of it (it holds the owner's whole forward)
    inside = [r for r in report.rejections if _in_code_of(r.source, owner) or _within(r.module_path, path)]
    report.rejections = [r for r in report.rejections if r not in inside] + block_report.rejections
    return True


def _within(path: str, owner_path: str) -> bool:
    """Whether module `path` is `owner_path` or lies below it."""
    return not owner_path or path == owner_path or path.startswith(owner_path + ".")


def _in_code_of(source: str, module: nn.Module) -> bool:
    """Whether the "file:line" `source` lies in the code of `module`'s class, of a submodule's, or of a class
    either inherits from."""
    file, _, line = source.rpartition(":")
    return line.isdigit() and any(_in_class_code(type(m), {(file, int(line))}) for m in module.modules())
