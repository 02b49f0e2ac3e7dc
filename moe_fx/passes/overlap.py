"""Overlap a block's exchange with its shared expert: move the work that needs neither the routed path nor
anything the exchange brings to between the dispatch and the experts.

Under a dispatch lowering registered with `overlaps=True` (ep_alltoall's), `quantize_dispatch` returns once
its all-to-all has started and `experts` waits for it (`lowering/distributed/exchanges.py`). The nodes
placed between the two run while the rows travel. A block's shared expert is added to the routed result;
models write it after the block (DeepSeek) or before the router (transformers 5's Qwen2-MoE), and its
sigmoid gate after. The nodes that move (the block's *shared work*):

- feed (through nodes that move too) a node that reads combine's result before the next moe_fx block
  begins (the block's own output, not later layers' work), and do not read combine themselves;
- after the block: come after `combine` and read only values defined before the dispatch, or other nodes
  that move;
- before the router: come after the previous block's `combine`, are not needed by the dispatch, and every
  node that reads them moves too or comes after the dispatch;
- are pure (a parameter's read, or no in-place op, no collective, no random numbers: `Node.is_impure`);
- overtake no write: when a node they would move past mutates anything or is impure, nothing moves.

They keep their order, right before the `experts` node. The graph computes the same values: only the
order of independent nodes changes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from moe_fx.passes.graph_view import is_inplace, value


def _moe_fx_op(node: fx.Node) -> str | None:
    return node.meta.get("moe_fx", {}).get("op")


def _pure(n: fx.Node) -> bool:
    if n.op == "get_attr":
        return True
    return n.op in ("call_function", "call_method", "call_module") and not (
        n.is_impure() or is_inplace(n) or _moe_fx_op(n)
    )


def _closure(starts, step) -> set[fx.Node]:
    """`starts` and every node reached from them by `step`."""
    seen, frontier = set(starts), list(starts)
    while frontier:
        for nxt in step(frontier.pop()):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return seen


def shared_work(graph: fx.Graph, dispatch: fx.Node, combine: fx.Node) -> list[fx.Node]:
    """The nodes of the block's shared work that can move between `dispatch` and its experts, in graph
    order (see the module docstring); [] when one of them would overtake a write."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    at, end = order[dispatch], order[combine]
    following = next((order[n] for n in nodes[end + 1 :] if _moe_fx_op(n)), len(nodes))  # the next block
    start = max((order[n] for n in nodes[:at] if _moe_fx_op(n) == "combine"), default=-1)  # the previous one
    reads_combine = _closure(combine.users, lambda n: n.users)
    joins = [n for n in reads_combine if order[n] < following]

    def feeds(n: fx.Node) -> bool:  # not through the block's own nodes: their inputs are the routed path's
        return n not in reads_combine and order[n] > start and not _moe_fx_op(n)

    feeding = _closure(
        [i for j in joins for i in j.all_input_nodes if feeds(i)], lambda n: list(filter(feeds, n.all_input_nodes))
    )
    needed = _closure(dispatch.all_input_nodes, lambda n: n.all_input_nodes)  # what the routed path reads
    sunk: set[fx.Node] = set()
    for n in sorted((n for n in feeding if start < order[n] < at and n not in needed), key=order.get, reverse=True):
        if _pure(n) and all(u in sunk or order[u] > at for u in n.users):
            sunk.add(n)
    hoisted: set[fx.Node] = set()
    for n in sorted((n for n in feeding if order[n] > end), key=order.get):
        if _pure(n) and all(i in hoisted or order[i] < at for i in n.all_input_nodes):
            hoisted.add(n)
    moved = sorted(sunk | hoisted, key=order.get)
    if not moved:
        return []
    first, last = min(order[moved[0]], at), max(order[moved[-1]], at)  # the span the moved nodes cross
    passed = [n for n in nodes[first : last + 1] if n not in sunk and n not in hoisted and not _moe_fx_op(n)]
    if any(is_inplace(n) or n.is_impure() for n in passed):  # a moved read could overtake a write: move nothing
        return []
    return moved


def hoist_past_dispatch(graph: fx.Graph, dispatch: fx.Node, experts: fx.Node, combine: fx.Node,
                        pin: Callable[[fx.Node], bool] | None = None) -> list[fx.Node]:  # fmt: skip
    """Move the block's shared work (`shared_work`) to just before `experts`; returns the nodes moved.

    `pin(node)` (for a compiler that orders the graph itself, Inductor): true for the activations the
    shared work reads (not parameters); they come through `moe_fx::after_dispatch(x, dispatch's handle)`,
    and `experts` takes the shared work's last result as `after`: data edges on both sides."""
    moved = shared_work(graph, dispatch, combine)
    for n in moved:
        experts.prepend(n)
    if pin is None or not moved:
        return moved
    inside = set(moved)
    handle = next(u for u in dispatch.users if u.target is operator.getitem and u.args[1] == 6)
    reads = dict.fromkeys(i for n in moved for i in n.all_input_nodes if i not in inside and pin(i))
    for x in reads:
        with graph.inserting_before(moved[0]):
            pinned = graph.call_function(torch.ops.moe_fx.after_dispatch.default, (x, handle))
        pinned.meta.update({k: x.meta[k] for k in ("val", "example_value") if k in x.meta})
        for n in moved:
            n.replace_input_with(x, pinned)
    results = [n for n in moved if any(u not in inside for u in n.users) and isinstance(value(n), torch.Tensor)]
    if results:  # the last: the shared expert's output, which needs the rest of its work
        experts.update_kwarg("after", results[-1])
    return moved
