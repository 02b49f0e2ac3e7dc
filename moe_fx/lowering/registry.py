"""The lowering registry: which implementation runs each moe_fx op.

Key: (op, device_type, layout). Each entry has a name, a priority and `supports(spec) -> None | reason`.
`select` picks the highest-priority entry that supports the spec, at rewrite time; the choice (and the
candidates rejected, with reasons) is recorded in the node's meta and shown by `moe_fx.explain`.
The op implementation looks the entry up again by name, so a graph says exactly what it runs.

Third-party packages add lowerings with the decorator::

    @moe_fx.register_lowering("experts", device="npu", layout="single", name="ascend", priority=20)
    def experts_ascend(xq, xscale, expert_offsets, w13, w2, ...): ...
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from moe_fx.spec import LAYOUTS, MoESpec

OPS = ("route", "quantize_dispatch", "experts", "combine")
# route and experts do no communication: under a parallel layout they run on this rank's rows and
# weight shard, so an entry registered for "single" serves every layout (after the layout's own).
LAYOUT_FREE_OPS = ("route", "experts")
ANY_DEVICE = "*"


def _supports_all(spec: MoESpec) -> str | None:
    return None


@dataclass(frozen=True)
class Lowering:
    op: str
    name: str
    device: str
    layout: str
    fn: Callable
    priority: int = 0
    supports: Callable[[MoESpec], str | None] = _supports_all
    # a quantize_dispatch that returns once its exchange has started (outputs filled when experts or combine
    # first runs: `distributed/exchanges.py`); the rewrite moves the block's shared expert after it
    overlaps: bool = False
    # a route lowering that takes the router's projection (`proj_weight`, `proj_bias`: the tokens come in place of
    # the logits) and computes the logits itself; for the others `moe_fx::route` applies the projection first
    projects: bool = False
    # an experts lowering that also sums each token's rows (`experts(..., reduce=True)`, one device), for every
    # spec or for those a predicate accepts: the rewrite then leaves combine out
    reduces: bool | Callable[[MoESpec], bool] = False
    # an experts lowering that reduces and can also route and dispatch its rows itself at decode
    # (`moe_fx::routed_experts`): routes(x, tokens, proj_weight, proj_bias, route_args, experts_args) -> out_TD,
    # or None where it does not (the op then runs the route, dispatch and experts lowerings)
    routes: Callable | None = None

    def __str__(self) -> str:
        return f"{self.name} (priority {self.priority})"

    def reduces_for(self, spec: MoESpec) -> bool:
        return self.reduces(spec) if callable(self.reduces) else self.reduces


@dataclass(frozen=True)
class Selection:
    """The chosen lowering and the rejected candidates, each with the reason."""

    op: str
    chosen: Lowering | None
    rejected: tuple[tuple[str, str], ...]

    @property
    def reason(self) -> str:
        if self.chosen is None:
            why = "; ".join(f"{name}: {reason}" for name, reason in self.rejected) or "none registered"
            return f"no lowering for {self.op}: {why}"
        return f"highest priority ({self.chosen.priority}) supporting the spec"


_LOCK = threading.Lock()
_ENTRIES: dict[tuple[str, str, str], list[Lowering]] = {}
_BY_NAME: dict[tuple[str, str], Lowering] = {}  # lookup's answers (every op call asks), cleared on (un)registering


def register_lowering(
    op: str,
    *,
    device: str,
    layout: str = "single",
    name: str,
    priority: int = 0,
    supports: Callable[[MoESpec], str | None] | None = None,
    overlaps: bool = False,
    projects: bool = False,
    reduces: bool | Callable[[MoESpec], bool] = False,
    routes: Callable | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as lowering `name` of `op` for (device, layout). device "*" = any.
    `overlaps` (quantize_dispatch only): fn returns before its exchange lands, having registered it with
    `moe_fx.lowering.distributed.exchanges.start_exchange`. `projects` (route only): fn takes `proj_weight` and
    `proj_bias` and, when they are given, the tokens in place of the logits. `reduces` (experts only, True or a
    predicate of the spec): fn takes `reduce` and, when it is True, returns combine's out_ND (`moe_fx::experts`).
    `routes` (an experts lowering that reduces): see `Lowering.routes`."""
    if op not in OPS:
        raise ValueError(f"moe_fx: op={op!r} is not one of {OPS}")
    if layout not in LAYOUTS:
        raise ValueError(f"moe_fx: layout={layout!r} is not one of {LAYOUTS}")

    def decorator(fn: Callable) -> Callable:
        if overlaps and op != "quantize_dispatch":
            raise ValueError(f"moe_fx: overlaps=True is for quantize_dispatch lowerings, not {op!r}")
        if projects and op != "route":
            raise ValueError(f"moe_fx: projects=True is for route lowerings, not {op!r}")
        if reduces and op != "experts":
            raise ValueError(f"moe_fx: reduces=True is for experts lowerings, not {op!r}")
        if routes is not None and not reduces:
            raise ValueError(f"moe_fx: routes is for experts lowerings that reduce, not {op!r} {name!r}")
        entry = Lowering(op, name, device, layout, fn, priority, supports or _supports_all, overlaps, projects,
                         reduces, routes)  # fmt: skip
        with _LOCK:
            entries = _ENTRIES.setdefault((op, device, layout), [])
            if any(e.name == name for e in entries):
                raise ValueError(f"moe_fx: lowering {name!r} is already registered for {(op, device, layout)}")
            entries.append(entry)
            entries.sort(key=lambda e: -e.priority)
            _BY_NAME.clear()
        return fn

    return decorator


def unregister_lowering(op: str, *, device: str, layout: str = "single", name: str) -> None:
    """Remove a lowering registered with `register_lowering` (tests, plugins reloading)."""
    with _LOCK:
        entries = _ENTRIES.get((op, device, layout), [])
        _ENTRIES[(op, device, layout)] = [e for e in entries if e.name != name]
        _BY_NAME.clear()


def candidates(op: str, device: str, layout: str) -> list[Lowering]:
    """Entries for (op, device, layout) and for any device, highest priority first; for route and
    experts under a parallel layout, then the "single" entries."""
    layouts = [layout] + (["single"] if op in LAYOUT_FREE_OPS and layout != "single" else [])
    found = []
    with _LOCK:
        for lay in layouts:
            entries = list(_ENTRIES.get((op, device, lay), ())) + list(_ENTRIES.get((op, ANY_DEVICE, lay), ()))
            found += sorted(entries, key=lambda e: -e.priority)
    return found


def select(op: str, device: str, spec: MoESpec, force: str | None = None) -> Selection:
    """Pick the lowering for `op` on `device` for `spec`; `force` names one and must support the spec."""
    rejected = []
    for entry in candidates(op, device, spec.layout):
        if force is not None and entry.name != force:
            rejected.append((entry.name, f"not the forced lowering {force!r}"))
            continue
        reason = entry.supports(spec)
        if reason is None:
            return Selection(op, entry, tuple(rejected))
        rejected.append((entry.name, reason))
    if force is not None and not any(name == force and "forced" not in r for name, r in rejected):
        names = [e.name for e in candidates(op, device, spec.layout)]
        raise ValueError(
            f"moe_fx: forced lowering {force!r} for {op} on {device}/{spec.layout} is not registered; "
            f"registered: {names}"
        )
    if force is not None:
        why = dict(rejected)[force]
        raise ValueError(f"moe_fx: forced lowering {force!r} cannot run {op} for this block: {why}")
    return Selection(op, None, tuple(rejected))


def names(op: str) -> list[str]:
    """Names of every lowering registered for `op`, on any device and layout (sorted)."""
    with _LOCK:
        return sorted({e.name for (entry_op, _, _), entries in _ENTRIES.items() if entry_op == op for e in entries})


def lookup(op: str, name: str) -> Lowering:
    """The entry named `name` for `op` (any device, any layout), as the op implementations call it."""
    found = _BY_NAME.get((op, name))
    if found is not None:
        return found
    with _LOCK:
        for (entry_op, _, _), entries in _ENTRIES.items():
            if entry_op != op:
                continue
            for entry in entries:
                if entry.name == name:
                    _BY_NAME[(op, name)] = entry
                    return entry
    raise ValueError(f"moe_fx: no lowering named {name!r} is registered for {op}")
