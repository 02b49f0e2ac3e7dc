"""Capture a module whose call holds objects `torch._dynamo.export` cannot take, passing them through.

`apply` exports each block's owning module alone. Export takes tensors and Python constants, nested in
lists, tuples and dicts, but no other object: not a transformers `Cache`, nor Gemma4's `KVSharingDict`.
Such an object is state the module hands to a submodule (the attention that reads and updates the
cache); the MoE block beside it never sees it. So the module is exported with a stand-in (`_Slot`) for
each such object, and each submodule the recorded call handed one to (`receivers`) becomes an opaque
call in the graph (`torch._dynamo.decorators.leaf_function`): at call time that submodule's own forward
runs, eagerly, on the call's real objects. Everything else, the MoE block included, is in the graph:

    layer(h, cache)                          graph(h)
        a = self.attn(norm(h), cache=cache)      a = leaf[attn.forward](norm(h), cache=<slot 0>)
        return h + self.moe(a)                   return h + moe(a)  # slot 0: this call's cache

The graph's inputs are the call's tensors; the call's other constants are baked in. A later call whose
structure, constants or objects' types differ from the recorded one runs the original forward
(`Passthrough.check`). Module code that reads such an object itself, or tests its truth, fails the
capture (the stand-in has no attributes, and its truth raises), as does a capture that does not reproduce
the module's eager output on the recorded call (`Passthrough.verify`: code that branched on the object's
type took the stand-in's branch): the module is then left as it is. While moe_fx captures (and runs the graph to
verify blocks), each opaque call gets fresh copies of the objects as they were when the module was
called (`snapshot`), so the real objects are never touched.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import types
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from moe_fx.passes.identify import block_tolerance
from moe_fx.passes.verify import compare

# what export takes as a leaf of its inputs (besides these, only pytree containers)
_TAKEN = (torch.Tensor, int, float, complex, bool, str, bytes, type(None), torch.device, torch.dtype, torch.layout,
          torch.memory_format)  # fmt: skip


def passed_objects(args: tuple, kwargs: dict) -> list:
    """The distinct objects among a call's leaves that export cannot take, in order of first appearance."""
    found: dict[int, object] = {}
    for leaf in pytree.tree_leaves((args, kwargs)):
        if not isinstance(leaf, _TAKEN):
            found.setdefault(id(leaf), leaf)
    return list(found.values())


def snapshot(args: tuple, kwargs: dict) -> list:
    """Copies of the call's passed objects as they are now (before the module runs and updates them)."""
    return copy.deepcopy(passed_objects(args, kwargs))


def receivers(owner: nn.Module, recorded: dict[nn.Module, tuple[tuple, dict]], objects: list) -> list[nn.Module]:
    """The outermost submodules of `owner` whose recorded call held one of `objects` (by identity)."""
    ids = {id(o) for o in objects}
    found: list[str] = []
    modules = []
    for name, module in owner.named_modules():  # parents before their children
        if not name or any(name.startswith(f"{f}.") for f in found) or module not in recorded:
            continue
        if any(id(leaf) in ids for leaf in pytree.tree_leaves(recorded[module])):
            found.append(name)
            modules.append(module)
    return modules


class _Slot:
    """Stands in for the call's `index`-th passed object while the module is captured: a pytree constant,
    so a child's opaque call carries it in the graph, and resolved to the real object at call time."""

    def __init__(self, index: int):
        self.index = index

    def __eq__(self, other) -> bool:
        return isinstance(other, _Slot) and other.index == self.index

    def __hash__(self) -> int:
        return hash((_Slot, self.index))

    def __repr__(self) -> str:
        return f"<moe_fx passed object {self.index}>"

    def __bool__(self) -> bool:  # the real object's truth may differ (an empty dict): fail the capture instead
        raise TypeError("moe_fx: the module tests a passed-through object's truth; it can only hand it on")


pytree.register_constant(_Slot)  # registering it, like an op: a leaf_function's inputs may hold it


def _is_slot(x) -> bool:
    return isinstance(x, _Slot)


@contextlib.contextmanager
def _attention_flags_decided():
    """`F.scaled_dot_product_attention` taking a symbolic `is_causal` as a bool, while an opaque call runs on fake
    tensors. transformers' SDPA attention sets is_causal = (query length > 1), a SymBool when the sequence length
    is a symbol (a one-token example keeps it one), and the op's binding refuses a SymBool. The fake run only
    needs the output's sizes, which is_causal does not change; each real call decides it on its own sizes."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def decided(*args, is_causal=False, **kwargs):
        if isinstance(is_causal, torch.SymBool):
            is_causal = guard_or_false(is_causal)
        return sdpa(*args, is_causal=is_causal, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = decided
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def _resolve(tree, objects: list):
    """`tree` with each `_Slot` replaced by its object."""
    return pytree.tree_map(lambda x: objects[x.index] if _is_slot(x) else x, tree, is_leaf=_is_slot)


_COPIES = object()  # while capturing: each opaque call gets fresh copies of the snapshot


class Passthrough:
    """One module's recorded call, split into the graph's tensors, baked constants and passed objects."""

    def __init__(self, args: tuple, kwargs: dict, snapshot: list):
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        objects = passed_objects(args, kwargs)
        index = {id(o): i for i, o in enumerate(objects)}
        self.types = [type(o) for o in objects]
        self.tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]  # the graph's inputs
        # per leaf: a _Slot for a passed object, else the constant itself (a tensor's is filled in per call)
        self.template = [_Slot(index[id(x)]) if id(x) in index else x for x in leaves]
        for i in self.tensors:
            self.template[i] = None
        self.snapshot = snapshot
        self._live = threading.local()

    # ---------------------------------------------------------------- capture
    def export(self, owner: nn.Module, children: list[nn.Module], args: tuple, kwargs: dict) -> fx.GraphModule:
        """Export `owner` called on the call's tensors, each child in `children` an opaque call."""
        try:
            from torch._dynamo.decorators import leaf_function
        except ImportError as e:
            raise NotImplementedError(
                "moe_fx: passing objects export cannot take through needs torch._dynamo.decorators.leaf_function "
                f"(torch {torch.__version__} has none; tested on 2.13)"
            ) from e
        original = owner.forward
        func = original.__func__ if getattr(original, "__self__", None) is owner else None
        template, positions, spec = self.template, self.tensors, self.spec

        def forward(self, *tensors):  # `self`: named as in a plain export of the module
            leaves = list(template)
            for i, t in zip(positions, tensors):
                leaves[i] = t
            a, k = pytree.tree_unflatten(leaves, spec)
            return func(self, *a, **k) if func is not None else original(*a, **k)

        patched = {owner: types.MethodType(forward, owner)}
        for child in children:
            patched[child] = self._opaque(child.forward, leaf_function)
        saved = {m: m.__dict__.get("forward") for m in patched}
        leaves = pytree.tree_leaves((args, kwargs))
        try:
            for m, f in patched.items():
                m.forward = f
            gm = torch._dynamo.export(owner, assume_static_by_default=False)(*(leaves[i] for i in positions))
            gm = gm.graph_module
        finally:
            for m, f in saved.items():
                if f is None:
                    del m.forward
                else:
                    m.forward = f
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        assert len(placeholders) == len(positions), (len(placeholders), len(positions))  # one per tensor, in order
        return gm

    def _opaque(self, forward: Callable, leaf_function) -> Callable:
        """A child's forward as an opaque call: its own forward on the objects of the call in progress."""

        @leaf_function
        def call(*args, **kwargs):
            a, k = _resolve((args, kwargs), self._objects())
            return forward(*a, **k)

        @call.register_fake
        def fake(*args, **kwargs):  # the child's forward on fake tensors, with copies of the objects
            with torch._subclasses.fake_tensor.unset_fake_temporarily():
                objects = copy.deepcopy(self.snapshot)
            a, k = _resolve((args, kwargs), objects)
            with _attention_flags_decided():
                return forward(*a, **k)

        return call

    def _objects(self) -> list:
        objects = getattr(self._live, "objects", None)
        if objects is _COPIES:
            return copy.deepcopy(self.snapshot)
        if objects is None:
            raise RuntimeError("moe_fx: a passed-through call ran outside its module's rewritten forward")
        return objects

    @contextlib.contextmanager
    def capturing(self):
        """While moe_fx runs the graph itself (probes, verification): opaque calls get fresh copies."""
        previous = getattr(self._live, "objects", None)
        self._live.objects = _COPIES
        try:
            yield
        finally:
            self._live.objects = previous

    def verify(self, gm: fx.GraphModule, original: Callable, args: tuple, kwargs: dict) -> str | None:
        """Why the captured graph does not reproduce `original` on the recorded call, or None. Both run on
        copies of the objects as they were recorded, and must agree within the block tolerance of each output's
        dtype (under capture, experts may be traced in another form than eager runs, see `backend.capture_config`)."""
        leaves = pytree.tree_leaves((args, kwargs))
        with torch.no_grad(), self.capturing():
            got = _resolve(gm(*(leaves[i] for i in self.tensors)), copy.deepcopy(self.snapshot))
            a, k = self._call(leaves, copy.deepcopy(self.snapshot))
            expected = original(*a, **k)
        got_leaves, got_spec = pytree.tree_flatten(got)
        want_leaves, want_spec = pytree.tree_flatten(expected)
        if got_spec != want_spec:
            return f"the captured graph returns {got_spec}, the module {want_spec}"
        for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
            if isinstance(w, torch.Tensor):
                why = compare(g, w, block_tolerance(w.dtype))[1]
            else:
                why = None if type(g) is type(w) and (g == w if isinstance(w, _TAKEN) else True) else f"{g!r}"
            if why is not None:
                return f"output {i} of the captured graph is not the module's: {why}"
        return None

    # ---------------------------------------------------------------- call time
    def check(self, args: tuple, kwargs: dict) -> str | None:
        """Why this call is not one the graph was captured for (tensors aside, see `capture.guards`)."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec:
            return "the call's arguments are structured unlike the recorded call's"
        seen: dict[int, int] = {}
        tensors = set(self.tensors)
        for i, (x, want) in enumerate(zip(leaves, self.template)):
            if i in tensors:
                if not isinstance(x, torch.Tensor):
                    return f"argument leaf {i} is {type(x).__name__}, captured as a tensor"
            elif _is_slot(want):
                if type(x) is not self.types[want.index]:
                    return f"argument leaf {i} is a {type(x).__name__}, captured as {self.types[want.index].__name__}"
                if seen.setdefault(id(x), want.index) != want.index:
                    return "the call's objects alias one another unlike the recorded call's"
            elif type(x) is not type(want) or x != want:
                return f"argument leaf {i} is {x!r}, captured as the constant {want!r}"
        if len(seen) != len(self.types):
            return "the call's objects alias one another unlike the recorded call's"
        return None

    def release_snapshot(self) -> None:
        """Drop the copies once apply is done: only capturing (export, probes, verification) reads them."""
        self.snapshot = None

    def _call(self, leaves: list, objects: list) -> tuple[tuple, dict]:
        """The recorded call's structure and constants, with these tensors (by leaf) and objects."""
        filled = _resolve(list(self.template), objects)
        for i in self.tensors:
            filled[i] = leaves[i]
        return pytree.tree_unflatten(filled, self.spec)

    def graph_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        leaves = pytree.tree_leaves((args, kwargs))
        return [leaves[i] for i in self.tensors]

    def run(self, gm: fx.GraphModule, args: tuple, kwargs: dict):
        """The graph on this call's tensors, its opaque calls on this call's objects (after `check`)."""
        objects = passed_objects(args, kwargs)
        previous = getattr(self._live, "objects", None)
        self._live.objects = objects
        try:
            return _resolve(gm(*self.graph_inputs(args, kwargs)), objects)
        finally:
            self._live.objects = previous
