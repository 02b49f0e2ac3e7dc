"""Replace a matched block with route -> quantize_dispatch -> experts -> combine.

    x_TD, logits_TE                      (kept)
    weights_TK, ids_TK = route(logits_TE)            or the opaque router's top-k outputs
    xq, xscale, offsets, rows, splits = quantize_dispatch(x_TD, ids_TK, weights_TK)
    y_RD = experts(xq, xscale, offsets, w13, w2, ...)   x_TD in xq's place where dispatch returns no rows
                                                       (one device, activations unquantised: no copy of x)
    out_TD = combine(y_RD, weights_TK, rows, splits)  -> replaces every later use of the block's output
    (or out_TD = experts(..., reduce=True), no combine: an experts lowering that sums the rows itself)

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
from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings

from moe_fx.lowering import registry
from moe_fx.lowering.distributed.placement import Shard, shard_weights
from moe_fx.ops import ROUTED_QUANT, combine_args, dispatch_args, experts_args, route_args, routed_args
from moe_fx.passes import identity_experts as identity
from moe_fx.passes.graph_view import GraphView, is_inplace, shape_of, value
from moe_fx.passes.match import MoEMatch
from moe_fx.passes.prequant import prequantised
from moe_fx.passes.quantize_weights import GRAPH_ATTR, QuantisedShard, quantised_experts
from moe_fx.passes.weights import Family, remember_stack, stack_parts
from moe_fx.report import annotation

log = logging.getLogger("moe_fx")
OPS = torch.ops.moe_fx


def select_lowerings(match: MoEMatch, device: str, forced: dict[str, str], fuse_combine: bool = True,
                     fuse_route: bool = True) -> str | None:  # fmt: skip
    """Fill `match.selections`, `match.combine_in_experts` (`fuse_combine`, one device, an experts lowering
    that `reduces`, no combine lowering forced, deterministic algorithms off) and `match.route_in_experts`
    (`fuse_route`, `_routes_in_experts`); return a reason if some op has no lowering for this spec/device."""
    for op in registry.OPS:
        if op == "route" and not match.router_recognized:
            continue
        sel = registry.select(op, device, match.spec, forced.get(op))
        match.selections[op] = sel
        if sel.chosen is None:
            return sel.reason
    single, reduces = match.spec.layout == "single", match.selections["experts"].chosen.reduces_for(match.spec)
    match.combine_in_experts = fuse_combine and single and reduces and "combine" not in forced
    if match.combine_in_experts and torch.are_deterministic_algorithms_enabled():
        match.combine_in_experts = False
        match.combine_kept = DETERMINISTIC_COMBINE.format(match.selections["experts"].chosen.name)
    match.route_in_experts = fuse_route and _routes_in_experts(match, forced)
    return None


def _routes_in_experts(match: MoEMatch, forced: dict[str, str]) -> bool:
    """Whether the block's route, quantize_dispatch and experts may be one `routed_experts` node: combine's sum is
    in experts, whose lowering `routes`, the route lowering is of the same backend (the routed kernel routes as
    it does), none of the three is forced, and the block's activations are unquantised or quantised per token
    (`ROUTED_QUANT`), with no capacity or identity experts (picks the routed kernel would have to drop)."""
    if not match.combine_in_experts or not match.router_recognized or forced.keys() & {"route", "quantize_dispatch"}:
        return False
    experts, spec = match.selections["experts"].chosen, match.spec
    same_backend = experts.routes is not None and match.selections["route"].chosen.name == experts.name
    return (same_backend and spec.quant.mode in ROUTED_QUANT and not spec.router.capacity
            and not spec.experts.identity_experts)  # fmt: skip


# Why combine keeps its node under torch.use_deterministic_algorithms(True): Dynamo guards on that flag, so
# torch.compile rewrites again when it changes; an applied graph that sums in experts sums in order at run time
# instead (the Triton experts op).
DETERMINISTIC_COMBINE = (
    "kept out of experts: deterministic algorithms are on (torch.use_deterministic_algorithms), and {} experts "
    "adds each token's rows with atomics, in no fixed order; combine sums them in order"
)


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

    A single stacked family is used directly: no copy, and its own graph node is returned (a family that is
    a view of its leaf, flat-stored or with more experts, becomes a constant of the graph sharing the
    parameter's storage). Several stacked families (separate stacked gate/up biases) are each bound so, and a
    graph node concatenates them on every call. The
    (original parameter, view) pairs go to `rebind`, applied by the caller once tracing is over; the
    original parameters, now views of the stack, stay in state_dict.
    """
    if len(parts) == 1 and parts[0].stacked:
        family = parts[0]
        if family.source is None:
            return family.nodes[0]
        rebind.append((family.source, family.source.detach()))  # keep_current follows a replaced parameter
        return _constant(gm, name, tensor)
    if all(family.stacked for family in parts):  # b1, b3 of w1, w3 [E, F, D]: as views of one stack they would
        # change strides, which Dynamo guards on parameters
        nodes = [_bind(gm, f"{name}{i}", stack_parts([f], dim), [f], dim, rebind) for i, f in enumerate(parts)]
        last = next(n for n in reversed(gm.graph.nodes) if n in nodes)
        with gm.graph.inserting_after(last):
            node = gm.graph.call_function(torch.cat, (nodes, dim))
        _set_meta(node, _fake_mode(gm.graph))
        return node
    remember_stack(tensor)
    _stack_views(tensor, parts, dim, rebind)
    return _constant(gm, name, tensor)


def _stack_views(tensor: torch.Tensor, parts: list[Family], dim: int, rebind: Rebind) -> None:
    """Queue each part's tensors to become views of `tensor`, the parts concatenated along `dim`.

    A part takes its share of `tensor.shape[dim]` in proportion to its own size (under tp, `tensor`
    holds 1/W of each part)."""
    total = sum(family.shape[dim] for family in parts)
    offset = 0
    for family in parts:
        size = family.shape[dim] * tensor.shape[dim] // total
        block = tensor.narrow(dim, offset, size)
        offset += size
        rebind += [(family.tensors[0], block)] if family.stacked else list(zip(family.tensors, block.unbind(0)))


def _bind_shard(gm, name, full, local, parts, dim, shard: Shard, owns_forward: bool, rebind: Rebind):
    """Under a parallel layout the graph reads this rank's shard `local` of the stacked `full` tensor.

    With `owns_forward` (apply: the module runs this graph from now on) the original parameters become
    views of the shard (EP: the local experts'; tp: their F slice) and the rest are released, so a rank
    keeps only its shard. Under torch.compile they stay whole, as views of `full` like on one device: a
    recompile re-matches the original code, which needs every expert.
    """
    if not owns_forward:
        if not (len(parts) == 1 and parts[0].stacked):
            remember_stack(full)
            _stack_views(full, parts, dim, rebind)
    elif local is None:  # tp: the down-projection's bias lives on rank 0 only
        rebind += [(t, t.new_empty(0)) for family in parts for t in family.tensors]
    elif shard.expert_parallel:
        mine = shard.local_experts
        kept = [f if f.stacked else Family(f.name, [f.nodes[e] for e in mine], [f.tensors[e] for e in mine], False)
                for f in parts]  # fmt: skip
        remote = [t for f in parts if not f.stacked for e, t in enumerate(f.tensors) if e not in mine]
        rebind += [(t, t.new_empty(0)) for t in remote]
        _stack_views(local, kept, dim, rebind)
    else:
        _stack_views(local, parts, dim, rebind)
    return None if local is None else _constant(gm, name, local)


def _bind_shards(gm: fx.GraphModule, match: MoEMatch, index: int, shard: Shard, owns_forward: bool, rebind: Rebind):
    """get_attr nodes (w13, w3, w2, w13_bias, w2_bias) of this rank's weight shard; under quant only the
    biases (the quantised weights come from `_bind_quantised_shard`), the others None."""
    spec, b = match.spec, match.binding
    es = spec.experts
    h_dim = 2 if es.w13_transposed else 1
    separate = es.gate_up == "separate"
    roles = {  # role -> (stacked tensor, the families it was stacked from, the dim they were concatenated along)
        "w13": (b.w13, b.w13_parts[:1] if separate else b.w13_parts, h_dim),
        "w3": (b.w3, b.w13_parts[1:], h_dim),
        "w2": (b.w2, [b.w2_family], 1),
        "w13_bias": (b.w13_bias, b.w13_bias_parts, 1),
        "w2_bias": (b.w2_bias, [b.w2_bias_family], 1),
    }
    quantised = spec.quant.mode != "none"
    roles = {role: r for role, r in roles.items() if r[0] is not None and (not quantised or role.endswith("bias"))}
    local = shard_weights(shard, spec, {role: r[0] for role, r in roles.items()})
    nodes = {
        role: _bind_shard(gm, f"moe_fx_block{index}_{role}", t, local[role], parts, dim, shard, owns_forward, rebind)
        for role, (t, parts, dim) in roles.items()
    }
    return tuple(nodes.get(role) for role in ("w13", "w3", "w2", "w13_bias", "w2_bias"))


def _bind_expert_weights(gm: fx.GraphModule, match: MoEMatch, index: int, rebind: Rebind):
    """get_attr nodes (w13, w3, w2, w13_scale, w2_scale) and the spec the graph's experts op runs with.

    Unquantised: the stacked weights, in the layout the model stores them. Quantised: the model's own
    quantised parameters and scales when it holds them so (`passes/prequant.py`), else the weights quantised
    once (cached across recompiles, see `quantised_experts`); both in the canonical [E, H, D] layout.
    """
    spec, b, prefix = match.spec, match.binding, f"moe_fx_block{index}"
    es = spec.experts
    if spec.quant.mode == "none":
        h_dim = 2 if es.w13_transposed else 1
        if es.gate_up == "separate":
            names = (f"{prefix}_w13", f"{prefix}_w3")
            w13, w3 = (_bind(gm, n, t, [f], h_dim, rebind) for n, t, f in zip(names, (b.w13, b.w3), b.w13_parts))
        else:
            w13, w3 = _bind(gm, f"{prefix}_w13", b.w13, b.w13_parts, h_dim, rebind), None
        w2 = _bind(gm, f"{prefix}_w2", b.w2, [b.w2_family], 1, rebind)
        return spec, w13, w3, w2, None, None
    taken = prequantised(b)
    if taken is not None:  # the model's own quantised parameters and scales: no copy, nothing to refresh
        nodes = (taken[0].q_node, taken[0].scale_node, taken[1].q_node, taken[1].scale_node)
    else:
        tensors, q = _quantised_weights(b, spec, rebind)
        gm.__dict__.setdefault(GRAPH_ATTR, []).append(q)
        nodes = _quantised_constants(gm, index, tensors)
    return spec.replace(experts=_canonical(es)), nodes[0], None, nodes[2], nodes[1], nodes[3]


def _quantised_weights(b, spec, rebind: Rebind):
    """(w13_q, w13_scale, w2_q, w2_scale) of a quantised block and the QuantisedExperts they belong to: the
    model's own quantised parameters (None: nothing to refresh) or the weights quantised once."""
    taken = prequantised(b)
    if taken is not None:
        assert taken[0].mode == taken[1].mode == spec.quant.mode, "passes.prequant.quant_mode chose the mode"
        return (taken[0].q, taken[0].scale, taken[1].q, taken[1].scale), None
    q = quantised_experts(b, spec.quant.mode)
    if not spec.quant.keep_original_weights:  # free the unquantised weights once tracing is over
        rebind += [(t, t.new_empty(0)) for t in q.sources]
    return q.tensors, q


def _quantised_constants(gm: fx.GraphModule, index: int, tensors) -> list[fx.Node]:
    names = ("w13_q", "w13_scale", "w2_q", "w2_scale")
    return [_constant(gm, f"moe_fx_block{index}_{name}", t) for name, t in zip(names, tensors)]


def _bind_quantised_shard(gm: fx.GraphModule, match: MoEMatch, index: int, shard: Shard, rebind: Rebind):
    """Expert parallel with quant: get_attr nodes (w13_q, w13_scale, w2_q, w2_scale) of this rank's experts
    of the quantised weights (views of the model's own when it holds them quantised), and the canonical spec.
    The unquantised originals stay whole (as on one device with keep_original_weights)."""
    assert shard.expert_parallel, "tp refuses quantised specs (see lowering/distributed/tp.py)"
    spec = match.spec
    full, q = _quantised_weights(match.binding, spec, rebind)
    local = QuantisedShard(full, shard.experts_of, q)
    gm.__dict__.setdefault(GRAPH_ATTR, []).append(local)
    nodes = _quantised_constants(gm, index, local.tensors)
    return spec.replace(experts=_canonical(spec.experts)), nodes[0], None, nodes[2], nodes[1], nodes[3]


def _canonical(es):
    """The experts spec the quantised lowerings read: [E, H, D] weights, gate and up in one tensor."""
    gate_up = "concat" if es.gate_up == "separate" else es.gate_up
    return dataclasses.replace(es, w13_transposed=False, w2_transposed=False, gate_up=gate_up)


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
    # sizes known only at run time (rows an expert-parallel rank receives) are bound to this node,
    # as Dynamo binds them, so that later tracers (AOT, Inductor) know where they come from
    if fake_mode.shape_env is not None:
        bindings = compute_unbacked_bindings(fake_mode.shape_env, result)
        if bindings:
            node.meta["unbacked_bindings"] = bindings


def apply_rebind(rebind: Rebind) -> None:
    """Point each original parameter at its slice of the stacked tensor, freeing its own storage."""
    for original, view in rebind:
        original.data = view


def rewrite(
    gm: fx.GraphModule,
    match: MoEMatch,
    index: int,
    rebind: Rebind,
    shard: Shard | None = None,
    owns_forward: bool = False,
) -> list[fx.Node]:
    """Rewrite one block in place. Returns the four moe_fx nodes (one fewer when the router is opaque, one fewer
    when experts does combine's sum: `match.combine_in_experts`; one `routed_experts` node where it also routes
    and dispatches: `match.route_in_experts`).

    `shard`: this rank's part under a parallel layout (the graph then reads only its weight shard and
    passes the group's name and the expert map to dispatch/combine); `owns_forward`: see `_bind_shard`.
    """
    g, b = gm.graph, match.binding
    impl = {op: sel.chosen.name for op, sel in match.selections.items()}
    view = GraphView(g)
    if shard is None:
        spec, w13, w3, w2, w13_scale, w2_scale = _bind_expert_weights(gm, match, index, rebind)
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
    else:
        spec, w13_scale, w2_scale = match.spec, None, None
        w13, w3, w2, b13, b2 = _bind_shards(gm, match, index, shard, owns_forward, rebind)
        if spec.quant.mode != "none":
            spec, w13, w3, w2, w13_scale, w2_scale = _bind_quantised_shard(gm, match, index, shard, rebind)
    K, E, D = spec.top_k, spec.experts.num_experts, spec.experts.hidden
    E_routed = E + spec.experts.identity_experts  # the router's experts: with weights, then identity ones
    num_local, group_name, expert_map = E, "", None
    if shard is not None:
        num_local, group_name = shard.num_local_experts(E), shard.group_name
        expert_map_E = shard.expert_map(b.w2.device)
        if expert_map_E is not None:
            expert_map = _constant(gm, f"moe_fx_block{index}_expert_map", expert_map_E)
    out_dtype = value(view.result_node(match.output)).dtype
    new_nodes = []
    fake_mode = _fake_mode(g)

    def call(target, *args, method=False):
        node = g.call_method(target, args) if method else g.call_function(target, args)
        _set_meta(node, fake_mode)
        new_nodes.append(node)
        return node

    projection = router_projection(match, E_routed)
    routed = match.route_in_experts
    with g.inserting_before(match.output):
        x_TD = call("reshape", match.x, -1, D, method=True)
        if match.router_recognized:
            bias_E = match.router_bias
            if bias_E is not None and len(shape_of(bias_E)) != 1:
                bias_E = call("reshape", bias_E, E_routed, method=True)  # Ernie4.5 keeps it as [1, E]
            if projection is None:
                route_in, proj = call("reshape", match.logits, -1, E_routed, method=True), ()
            else:  # route takes the router's linear: its tokens, weight and bias
                tokens, w_ED, b_E = projection
                route_in, proj = call("reshape", tokens, -1, shape_of(w_ED)[1], method=True), (w_ED, b_E)
        if routed:  # route, dispatch and experts(reduce=True) in one node
            args = routed_args(spec, x_TD, route_in, bias_E, w13, w3, w2, b13, b2, out_dtype, impl, *proj,
                               w13_scale=w13_scale, w2_scale=w2_scale)  # fmt: skip
            out = y = call(OPS.routed_experts.default, *args)
        else:
            if match.router_recognized:
                route = call(OPS.route.default, *route_args(spec.router, route_in, bias_E, impl["route"], *proj))
                weights_TK, ids_TK = call(operator.getitem, route, 0), call(operator.getitem, route, 1)
            else:
                weights_TK = call("float", call("reshape", match.weights_cut, -1, K, method=True), method=True)
                ids_TK = call("int", call("reshape", match.ids_cut, -1, K, method=True), method=True)
            if spec.experts.identity_experts:  # their picks become dropped ones, added back after combine
                split = call(identity.split, ids_TK, weights_TK, E)
                ids_TK, weights_TK, identity_T1 = (call(operator.getitem, split, i) for i in range(3))
            impl_d = impl["quantize_dispatch"]
            args = dispatch_args(spec, x_TD, ids_TK, weights_TK, impl_d, group_name, expert_map, num_local)
            dispatch = call(OPS.quantize_dispatch.default, *args)
            dispatched = tuple(call(operator.getitem, dispatch, i) for i in range(7))
            reduce = match.combine_in_experts  # one device only (`select_lowerings`)
            args = experts_args(spec, x_TD, dispatched, w13, w3, w2, b13, b2, out_dtype, impl["experts"], w13_scale,
                                w2_scale, reduce)  # fmt: skip
            out = y = call(OPS.experts.default, *args)
            if not reduce:  # else experts did combine's sum
                args = combine_args(spec, y, weights_TK, dispatched, impl["combine"], group_name)
                out = combine = call(OPS.combine.default, *args)
        if spec.experts.identity_experts:
            out = call(identity.add, out, x_TD, identity_T1)
        result = match.output if not is_inplace(match.output) else view.root[match.output]
        if len(shape_of(result)) == len(shape_of(match.x)):
            out = call("reshape_as", out, match.x, method=True)
        if match.base is not None:  # the tensor the original combine accumulated into
            out = call(operator.add, match.base, out)
    if routed:
        ops_nodes = ((y, "experts"),)
    else:
        ops_nodes = ((dispatch, "quantize_dispatch"), (y, "experts")) + (() if reduce else ((combine, "combine"),))
        if match.router_recognized:
            ops_nodes = ((route, "route"), *ops_nodes)
    for node, op in ops_nodes:  # a routed_experts node is the block's experts node to the report's lookups
        node.meta["moe_fx"] = {"op": op, "spec": spec, "selection": match.selections[op], "routes": routed}
        shown = "routed_experts" if routed else op  # by GraphModule.print_readable()
        node.meta["custom"] = annotation(shown, spec, impl[op])
    if projection is not None:  # the report says so (`pipeline.rewrite_graph`)
        (y if routed else route).meta["moe_fx"]["projects"] = True

    new = set(new_nodes)
    if is_inplace(match.output):
        after = view.order[match.output]
        for user in list(result.users):
            if user not in new and view.order.get(user, -1) > after:
                user.replace_input_with(result, out)
    match.output.replace_all_uses_with(out, delete_user_cb=lambda u: u not in new)
    _erase(g, match.region | match.router_nodes | {match.output} | ({match.logits} if projection else set()))
    g.lint()
    gm.recompile()
    return [n for n in new_nodes if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "moe_fx"]


_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)


def router_projection(match: MoEMatch, E: int) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(tokens, weight_ED, bias_E) of the router's `linear`, for a route lowering that takes the projection
    (`projects`: Triton's GEMV at decode) when nothing but the router reads the logits (a block that returns
    them keeps its linear); else None."""
    sel, logits = match.selections.get("route"), match.logits
    if not match.router_recognized or sel is None or sel.chosen is None or not sel.chosen.projects:
        return None
    if logits.op != "call_function" or logits.target not in _LINEARS or not set(logits.users) <= match.router_nodes:
        return None
    args = list(logits.args) + [None] * (3 - len(logits.args))
    tokens = args[0]
    weight, bias = logits.kwargs.get("weight", args[1]), logits.kwargs.get("bias", args[2])
    w_shape, b_shape = shape_of(weight), shape_of(bias) if bias is not None else None
    if not isinstance(tokens, fx.Node) or not isinstance(weight, fx.Node) or w_shape is None or len(w_shape) != 2:
        return None
    if w_shape[0] != E or not isinstance(w_shape[1], int) or (bias is not None and b_shape != (E,)):
        return None
    return tokens, weight, bias


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
