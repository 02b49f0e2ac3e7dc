"""Replace a matched block with route -> quantize_dispatch -> experts -> combine.

    x_TD, logits_TE                      (kept)
    weights_TK, ids_TK = route(logits_TE)            or the opaque router's top-k outputs
    xq, xscale, offsets, rows, splits = quantize_dispatch(x_TD, ids_TK, weights_TK)
    y_RD = experts(xq, xscale, offsets, w13, w2, ...)
    out_TD = combine(y_RD, weights_TK, rows, splits)  -> replaces every later use of the block's output

Expert weights are stacked once: a stacked 3-D parameter is used as it is; per-expert (or separate
gate/up) parameters are copied into one stacked tensor and the originals are rebound as views into it,
so no second copy stays alive. Lowerings are chosen here and recorded in `node.meta["moe_fx"]`.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import warnings

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource

from moe_fx.lowering import registry
from moe_fx.ops import combine_args, dispatch_args, experts_args, route_args
from moe_fx.passes.graph_view import GraphView, is_inplace, shape_of, value
from moe_fx.passes.match import MoEMatch
from moe_fx.passes.quantize_weights import GRAPH_ATTR, quantised_experts
from moe_fx.passes.weights import Family, remember_stack
from moe_fx.report import annotation

log = logging.getLogger("moe_fx")
OPS = torch.ops.moe_fx


def select_lowerings(match: MoEMatch, device: str, forced: dict[str, str]) -> str | None:
    """Fill `match.selections`; return a reason if some op has no lowering for this spec/device."""
    for op in registry.OPS:
        if op == "route" and not match.router_recognized:
            continue
        sel = registry.select(op, device, match.spec, forced.get(op))
        match.selections[op] = sel
        if sel.chosen is None:
            return sel.reason
    return None


Rebind = list[tuple[torch.Tensor, torch.Tensor]]


def _constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    """Register `tensor` as a non-persistent buffer of gm (out of state_dict) and return its get_attr node."""
    gm.register_buffer(name, tensor, persistent=False)
    # AOT autograd maps every buffer of a Dynamo graph to a source; ours is a constant of moe_fx's.
    if hasattr(gm, "_param_name_to_source"):
        gm._param_name_to_source[name] = ConstantSource(f"moe_fx_{name}")
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return gm.graph.get_attr(name)


def _bind(gm: fx.GraphModule, name: str, tensor: torch.Tensor, parts: list[Family], dim: int, rebind: Rebind):
    """Make `tensor` (stacked from `parts` along `dim`) the storage of the parts; return a get_attr node.

    A single stacked family is used directly: no copy, and its own graph node is returned. The
    (original parameter, view) pairs go to `rebind`, applied by the caller once tracing is over; the
    original parameters, now views of the stack, stay in state_dict.
    """
    if len(parts) == 1 and parts[0].stacked:
        return parts[0].nodes[0]
    remember_stack(tensor)
    offset = 0
    for family in parts:
        size = family.shape[dim]
        block = tensor.narrow(dim, offset, size)
        offset += size
        rebind += [(family.tensors[0], block)] if family.stacked else list(zip(family.tensors, block.unbind(0)))
    return _constant(gm, name, tensor)


def _bind_expert_weights(gm: fx.GraphModule, match: MoEMatch, index: int, rebind: Rebind):
    """get_attr nodes (w13, w3, w2, w13_scale, w2_scale) and the spec the graph's experts op runs with.

    Unquantised: the stacked weights, in the layout the model stores them. Quantised: the weights quantised
    once (cached across recompiles, see `quantised_experts`), in the canonical [E, H, D] layout.
    """
    spec, b, prefix = match.spec, match.binding, f"moe_fx_block{index}"
    es = spec.experts
    if spec.quant.mode == "none":
        h_dim = 2 if es.w13_transposed else 1
        if es.gate_up == "separate":
            w13, w3 = (_bind(gm, "", t, [f], h_dim, rebind) for t, f in zip((b.w13, b.w3), b.w13_parts))
        else:
            w13, w3 = _bind(gm, f"{prefix}_w13", b.w13, b.w13_parts, h_dim, rebind), None
        w2 = _bind(gm, f"{prefix}_w2", b.w2, [b.w2_family], 1, rebind)
        return spec, w13, w3, w2, None, None
    q = quantised_experts(b, spec.quant.mode)
    gm.__dict__.setdefault(GRAPH_ATTR, []).append(q)
    if not spec.quant.keep_original_weights:  # free the unquantised weights once tracing is over
        rebind += [(t, t.new_empty(0)) for t in q.sources]
    names = ("w13_q", "w13_scale", "w2_q", "w2_scale")
    nodes = [_constant(gm, f"{prefix}_{name}", t) for name, t in zip(names, q.tensors)]
    gate_up = "concat" if es.gate_up == "separate" else es.gate_up
    canonical = dataclasses.replace(es, w13_transposed=False, w2_transposed=False, gate_up=gate_up)
    return spec.replace(experts=canonical), nodes[0], None, nodes[2], nodes[1], nodes[3]


def _fake_mode(g: fx.Graph):
    fakes = [value(n) for n in g.nodes if n.op == "placeholder"]
    fakes = [v for v in fakes if isinstance(v, torch._subclasses.FakeTensor)]
    return fakes[0].fake_mode if fakes else None


def _set_meta(node: fx.Node, fake_mode) -> None:
    """Propagate fake values so later passes (Inductor, AOT) see correct meta for the new nodes."""
    if fake_mode is None:
        return

    def fake(n: fx.Node):
        v = value(n)
        if n.op == "get_attr" and v is None:
            v = fake_mode.from_tensor(getattr(n.graph.owning_module, n.target), static_shapes=True)
            n.meta["example_value"] = n.meta["val"] = v
        return v

    args = torch.fx.node.map_arg((node.args, node.kwargs), fake)
    with fake_mode:
        fargs, fkwargs = args
        if node.op == "call_method":
            result = getattr(fargs[0], node.target)(*fargs[1:], **fkwargs)
        else:
            result = node.target(*fargs, **fkwargs)
    node.meta["example_value"] = node.meta["val"] = result


def apply_rebind(rebind: Rebind) -> None:
    """Point each original parameter at its slice of the stacked tensor, freeing its own storage."""
    for original, view in rebind:
        original.data = view


def rewrite(gm: fx.GraphModule, match: MoEMatch, index: int, rebind: Rebind) -> list[fx.Node]:
    """Rewrite one block in place. Returns the four moe_fx nodes (three when the router is opaque)."""
    g, b = gm.graph, match.binding
    impl = {op: sel.chosen.name for op, sel in match.selections.items()}
    view = GraphView(g)
    spec, w13, w3, w2, w13_scale, w2_scale = _bind_expert_weights(gm, match, index, rebind)
    K, E, D = spec.top_k, spec.experts.num_experts, spec.experts.hidden
    b13 = (
        _bind(gm, f"moe_fx_block{index}_w13_bias", b.w13_bias, b.w13_bias_parts, 1, rebind)
        if b.w13_bias is not None
        else None
    )
    b2 = (
        _bind(gm, f"moe_fx_block{index}_w2_bias", b.w2_bias, [b.w2_bias_family], 1, rebind)
        if b.w2_bias is not None
        else None
    )
    out_dtype = value(view.result_node(match.output)).dtype
    new_nodes = []
    fake_mode = _fake_mode(g)

    def call(target, *args, method=False):
        node = g.call_method(target, args) if method else g.call_function(target, args)
        _set_meta(node, fake_mode)
        new_nodes.append(node)
        return node

    with g.inserting_before(match.output):
        x_TD = call("reshape", match.x, -1, D, method=True)
        if match.router_recognized:
            logits_TE = call("reshape", match.logits, -1, E, method=True)
            bias_E = match.router_bias
            if bias_E is not None and len(shape_of(bias_E)) != 1:
                bias_E = call("reshape", bias_E, E, method=True)  # Ernie4.5 keeps it as [1, E]
            route = call(OPS.route.default, *route_args(spec.router, logits_TE, bias_E, impl["route"]))
            weights_TK, ids_TK = call(operator.getitem, route, 0), call(operator.getitem, route, 1)
        else:
            weights_TK = call("float", call("reshape", match.weights_cut, -1, K, method=True), method=True)
            ids_TK = call("int", call("reshape", match.ids_cut, -1, K, method=True), method=True)
        dispatch = call(
            OPS.quantize_dispatch.default, *dispatch_args(spec, x_TD, ids_TK, weights_TK, impl["quantize_dispatch"])
        )
        dispatched = tuple(call(operator.getitem, dispatch, i) for i in range(7))
        y = call(
            OPS.experts.default,
            *experts_args(spec, dispatched, w13, w3, w2, b13, b2, out_dtype, impl["experts"], w13_scale, w2_scale),
        )
        out = combine = call(OPS.combine.default, *combine_args(spec, y, weights_TK, dispatched, impl["combine"]))
        result = match.output if not is_inplace(match.output) else view.root[match.output]
        if len(shape_of(result)) == len(shape_of(match.x)):
            out = call("reshape_as", out, match.x, method=True)
    ops_nodes = ((dispatch, "quantize_dispatch"), (y, "experts"), (combine, "combine"))
    if match.router_recognized:
        ops_nodes = ((route, "route"), *ops_nodes)
    for node, op in ops_nodes:
        node.meta["moe_fx"] = {"op": op, "spec": spec, "selection": match.selections[op]}
        node.meta["custom"] = annotation(op, spec, impl[op])  # shown by GraphModule.print_readable()

    new = set(new_nodes)
    if is_inplace(match.output):
        after = view.order[match.output]
        for user in list(result.users):
            if user not in new and view.order.get(user, -1) > after:
                user.replace_input_with(result, out)
    match.output.replace_all_uses_with(out, delete_user_cb=lambda u: u not in new)
    _erase(g, match.region | match.router_nodes | {match.output})
    g.lint()
    gm.recompile()
    return [n for n in new_nodes if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "moe_fx"]


def _erase(g: fx.Graph, doomed: set[fx.Node]) -> None:
    """Erase the doomed nodes, and what only they feed (runtime asserts on their sizes), if unused."""
    doomed = set(doomed)
    for n in g.nodes:
        ins = n.all_input_nodes
        if n not in doomed and ins and n.op not in ("placeholder", "output") and all(i in doomed for i in ins):
            doomed.add(n)
    for n in reversed(list(g.nodes)):
        if n in doomed and not n.users and n.op not in ("placeholder", "output"):
            g.erase_node(n)
