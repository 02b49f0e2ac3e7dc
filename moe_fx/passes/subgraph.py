"""Cut a region out of an FX graph as a runnable function: the matchers evaluate regions on probes."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from moe_fx.passes.graph_view import GraphView, is_inplace


def extract(
    view: GraphView,
    owner: fx.GraphModule,
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    env: dict[fx.Node, fx.Node] | None = None,
) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A GraphModule computing `outputs` from `inputs`; every other node they need is copied.

    Returns the module and its extra inputs (leaves: placeholders the region reads, e.g. weights),
    which come after `inputs` in its signature. Output values of in-place nodes are the mutated tensor.
    `env`, if given, receives the map from each original node to its copy.
    """
    needed = view.backward(outputs, blocked=inputs)
    graph = fx.Graph()
    env = {} if env is None else env
    for n in inputs:
        env[n] = graph.placeholder(f"in_{n.name}")
    leaves = [n for n in view.sorted(needed) if n not in env and n.op in ("placeholder", "get_attr")]
    for n in leaves:
        env[n] = graph.placeholder(f"leaf_{n.name}")
    for n in view.sorted(needed):
        if n in env:
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[view.result_node(o)] if is_inplace(o) else env[o] for o in outputs))
    return fx.GraphModule(owner, graph), leaves
