"""Overlap a block's exchange with its shared expert: move the work that needs neither the routed path nor
anything the exchange brings to just after the dispatch.

Under a dispatch lowering registered with `overlaps=True` (ep_alltoall's), `quantize_dispatch` returns once
its all-to-all has started and `experts` waits for it (`lowering/distributed/exchanges.py`). The nodes
placed between the two run while the rows travel. A block's shared expert is written after the routed
path and added to its result, so moving it is what lets it overlap. The nodes that move:

- come after the block's `combine`, and feed (through nodes that move too) a node that reads combine's
  result before the next moe_fx block begins: the block's own output, not later layers' work;
- read only values defined before the dispatch (the tokens, parameters), or other nodes that move;
- are pure (a parameter's read, or no in-place op, no collective, no random numbers: `Node.is_impure`);
- overtake no write: when a node they would move past mutates anything or is impure, nothing moves.

They keep their order, right before the `experts` node. The graph computes the same values: only the
order of independent nodes changes.
"""

from __future__ import annotations

import torch.fx as fx

from moe_fx.passes.graph_view import is_inplace


def _moe_fx_op(node: fx.Node) -> str | None:
    return node.meta.get("moe_fx", {}).get("op")


def hoist_past_dispatch(graph: fx.Graph, dispatch: fx.Node, experts: fx.Node, combine: fx.Node) -> list[fx.Node]:
    """Move the independent work of the block whose nodes these are to just before `experts` (see the
    module docstring); returns the nodes moved, in order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    end = next((n for n in graph.nodes if order[n] > order[combine] and _moe_fx_op(n)), None)  # the next block
    reads_combine, frontier = set(), [combine]
    while frontier:
        for user in frontier.pop().users:
            if user not in reads_combine:
                reads_combine.add(user)
                frontier.append(user)
    joins = [n for n in reads_combine if end is None or order[n] < order[end]]
    feeding, frontier = set(), [i for j in joins for i in j.all_input_nodes]
    while frontier:  # the nodes after combine that feed a join, and do not read combine themselves
        n = frontier.pop()
        if n in feeding or n in reads_combine or order[n] <= order[combine]:
            continue
        feeding.add(n)
        frontier += n.all_input_nodes
    moved, movable = [], set()
    for n in sorted(feeding, key=order.get):
        pure = n.op == "get_attr" or (
            n.op in ("call_function", "call_method", "call_module")
            and not n.is_impure()
            and not is_inplace(n)
            and not _moe_fx_op(n)
        )
        if pure and all(i in movable or order[i] < order[dispatch] for i in n.all_input_nodes):
            movable.add(n)
            moved.append(n)
    if not moved:
        return []
    passed = [n for n in graph.nodes if order[dispatch] < order[n] < order[moved[-1]] and n not in movable
              and not _moe_fx_op(n)]  # fmt: skip
    if any(is_inplace(n) or n.is_impure() for n in passed):  # a moved read could overtake a write: move nothing
        return []
    for n in moved:
        experts.prepend(n)
    return moved
