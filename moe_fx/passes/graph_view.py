"""Mutation-aware data flow over an FX graph, and the small predicates the matchers share.

Dynamo records `out.index_add_(...)` / `out[idx] += y` as nodes with no users: later reads of `out`
name the original node. `GraphView` adds the missing edges: a node that reads a tensor depends on
the latest in-place mutation of that tensor (or of any view of it) before it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

_VIEW_METHODS = {
    "view",
    "reshape",
    "view_as",
    "reshape_as",
    "transpose",
    "permute",
    "unsqueeze",
    "squeeze",
    "expand",
    "expand_as",
    "narrow",
    "select",
    "t",
    "flatten",
    "unflatten",
    "split",
    "chunk",
    "unbind",
    "as_strided",
    "detach",
    "contiguous",
    "movedim",
    "unfold",
}
_VIEW_FUNCTIONS = {
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.unsqueeze,
    torch.squeeze,
    torch.narrow,
    torch.select,
    torch.t,
    torch.flatten,
    torch.split,
    torch.chunk,
    torch.unbind,
    torch.detach,
}
_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}
ASSERT_TARGETS = {
    torch.ops.aten._assert_scalar.default,
    torch._check,
    torch._check_is_size,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_async.msg,
}
LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear, torch.matmul, operator.matmul, torch.mm}
TOPK_TARGETS = {torch.topk, torch.max}


def value(node: fx.Node):
    """The example (usually fake) value Dynamo or make_fx recorded for `node`, or None."""
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_meta(node) -> torch.Tensor | None:
    v = value(node) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def shape_of(node) -> tuple | None:
    t = tensor_meta(node)
    return None if t is None else tuple(t.shape)


def known_equal(a, b) -> bool:
    """a == b for ints or SymInts, decided without adding guards (False when unknown)."""
    return bool(statically_known_true(a == b))


def same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def numel(shape):
    n = 1
    for s in shape:
        n = n * s
    return n


def is_method(node: fx.Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def is_function(node: fx.Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__") and name not in ("requires_grad_",)
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_") and not name.endswith("__")
    return False


def is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        if node.target in _VIEW_FUNCTIONS:
            return True
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            index = node.args[1]
            flat = index if isinstance(index, tuple) else (index,)
            base = tensor_meta(node.args[0])
            return base is not None and not any(isinstance(i, fx.Node) for i in flat)
    return False


class GraphView:
    """Effective (mutation-aware) inputs and users of every node, plus slices over them."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.root: dict[fx.Node, fx.Node] = {}
        self.mutations: dict[fx.Node, list[fx.Node]] = {}  # storage root -> in-place nodes, in order
        self.inputs: dict[fx.Node, list[fx.Node]] = {}
        self.users: dict[fx.Node, list[fx.Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            base = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            self.root[n] = self.root[base] if base is not None and (is_view(n) or is_inplace(n)) else n
            inputs = list(n.all_input_nodes)
            for a in list(inputs):
                done = self.mutations.get(self.root.get(a, a), [])
                if done and done[-1] is not n:
                    inputs.append(done[-1])
            self.inputs[n] = list(dict.fromkeys(inputs))
            for a in self.inputs[n]:
                self.users[a].append(n)
            if is_inplace(n) and base is not None:
                self.mutations.setdefault(self.root[n], []).append(n)

    def forward(self, starts: Iterable[fx.Node], blocked: Iterable[fx.Node] = ()) -> set[fx.Node]:
        """Nodes that depend on any of `starts` (starts included), not expanding past `blocked`."""
        blocked = set(blocked)
        seen, stack = set(), list(starts)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n not in blocked:
                stack.extend(self.users[n])
        return seen

    def backward(self, ends: Iterable[fx.Node], blocked: Iterable[fx.Node] = ()) -> set[fx.Node]:
        """Nodes that `ends` depend on (ends included), not expanding past `blocked`."""
        blocked = set(blocked)
        seen, stack = set(), list(ends)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n not in blocked:
                stack.extend(self.inputs[n])
        return seen

    def reaches_output_avoiding(
        self, starts: Iterable[fx.Node], avoid: fx.Node, outputs_of: set[fx.Node] | None = None
    ) -> bool:
        """Whether a path leads from `starts` to the graph output without passing through `avoid`.

        With `outputs_of`, only paths whose last node before the output lies outside it count (a module
        that returns its router scores beside its result: GPT-OSS)."""
        seen, stack = set(), [s for s in starts if s is not avoid]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            for u in self.users[n]:
                if u is avoid or is_function(u, *ASSERT_TARGETS):
                    continue
                if u.op == "output":
                    if outputs_of is None or n not in outputs_of:
                        return True
                    continue
                stack.append(u)
        return False

    def result_node(self, n: fx.Node) -> fx.Node:
        """The node whose value `n` produces: the mutated tensor's root for an in-place node."""
        return self.root[n] if is_inplace(n) else n

    def sorted(self, nodes: Iterable[fx.Node]) -> list[fx.Node]:
        return sorted(nodes, key=self.order.__getitem__)
