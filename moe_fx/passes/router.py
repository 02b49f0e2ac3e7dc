"""Identify the router between the logits [T, E] and the top-k cut (weights, ids).

Recognised (the route op replaces them):
    softmax(logits) -> topk -> [renormalise] -> [x scale]                 Mixtral, Qwen, OLMoE
    topk(logits) -> softmax                                               GPT-OSS, Granite, JetMoE
    sigmoid(logits) [+ bias_E] -> [group-limited] topk -> gather -> [renorm] -> [x scale]   DeepSeek-V3
        (the dropped groups' experts set to 0.0 as in transformers, or to -inf as in DeepSeek's own code)
    softmax(logits).max(-1)                                               top-1
Candidates come from the ops present; each is checked on probes against the original router.
Anything else stays in the graph as an opaque router, and the rewrite starts at its top-k outputs.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from moe_fx.ops import route_args
from moe_fx.passes.graph_view import is_function, shape_of, target_name, tensor_meta
from moe_fx.spec import RouterSpec


def _float_constants(node: fx.Node) -> list[float]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, float)]


def _score_dtype(router_nodes: list[fx.Node], scoring: str) -> str:
    """The dtype the router's scoring op produces: scores rounded to bf16/fp16 tie where fp32 ones would not."""
    for n in router_nodes:
        t = tensor_meta(n)
        if target_name(n) == scoring and t is not None and t.dtype in (torch.bfloat16, torch.float16):
            return str(t.dtype).removeprefix("torch.")
    return "float32"


def candidates(router_nodes: list[fx.Node], anchor: fx.Node, k: int, num_experts: int, bias_leaves):
    """RouterSpec candidates (with the bias leaf they use) suggested by the router's ops."""
    before = [n for n in router_nodes if n is not anchor and _precedes(n, anchor)]
    names_before = {target_name(n) for n in before}
    names_after = {target_name(n) for n in router_nodes if n not in before}
    orders = []
    for scoring in ("softmax", "sigmoid"):
        if scoring in names_before:
            orders.append(("score_then_topk", scoring))
        if scoring in names_after:
            orders.append(("topk_then_score", scoring))
    orders = orders or [("score_then_topk", "none")]
    groups, fills = [(1, 1, 2)], (0.0,)
    for n in router_nodes:
        shape = shape_of(n)
        if shape and len(shape) == 3 and 1 < shape[1] < num_experts and shape[1] * shape[2] == num_experts:
            groups = [
                (shape[1], topk_group, score_k)
                for topk_group in _group_topks(router_nodes, shape[1])
                for score_k in (2, 1)
            ]
            fills = _group_fills(anchor)
            break
    scales = {1.0} | {c for n in router_nodes if target_name(n) in ("mul", "__mul__") for c in _float_constants(n)}
    biases = [None] + [b for b in bias_leaves]
    for (order, scoring), (n_group, topk_group, score_k), fill, scale, renorm, bias in itertools.product(
        orders, groups, fills, sorted(scales), (False, True), biases
    ):
        if bias is not None and order != "score_then_topk":
            continue
        spec = RouterSpec(
            k=k,
            scoring=scoring,
            order=order,
            renormalize=renorm,
            has_bias=bias is not None,
            n_group=n_group,
            topk_group=topk_group,
            group_score_topk=score_k,
            group_fill=fill,
            scale=scale,
            score_dtype=_score_dtype(router_nodes, scoring),
        )
        yield spec, bias


# ops between the group mask and the top-k that leave the masked values as they are
_KEEPS_VALUES = ("flatten", "view", "reshape", "float", "to", "contiguous", "type_as")


def _group_fills(anchor: fx.Node) -> tuple[float, ...]:
    """The value a group-limited router writes over the experts of the groups it drops, read off the op that
    feeds its top-k: `masked_fill(drop, v)` or `where(keep, x, v)` (transformers' DeepSeek-V3 writes 0.0,
    DeepSeek's own code -inf). Both are tried, 0.0 first, where no such op shows it: the probes cannot tell
    them apart unless a bias makes the kept experts' values negative."""
    n = anchor.args[0] if anchor.args else anchor.kwargs.get("input")
    while isinstance(n, fx.Node) and target_name(n) in _KEEPS_VALUES:
        n = n.args[0]
    if isinstance(n, fx.Node) and target_name(n) in ("masked_fill", "masked_fill_") and len(n.args) > 2:
        fill = n.args[2]
    elif isinstance(n, fx.Node) and target_name(n) == "where" and len(n.args) == 3:
        fill = next((a for a in n.args[1:] if isinstance(a, (int, float))), None)
    else:
        fill = None
    return (float(fill),) if isinstance(fill, (int, float)) and not isinstance(fill, bool) else (0.0, float("-inf"))


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    n = a
    while n is not None and n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def _group_topks(router_nodes, n_group) -> list[int]:
    ks = []
    for n in router_nodes:
        if target_name(n) == "topk":
            src = shape_of(n.args[0]) if isinstance(n.args[0], fx.Node) else None
            if src and src[-1] == n_group:
                ks.append(n.args[1] if len(n.args) > 1 else n.kwargs.get("k"))
    return [k for k in ks if isinstance(k, int)] or list(range(1, n_group + 1))


def run_route(spec: RouterSpec, logits_TE: torch.Tensor, bias: torch.Tensor | None, impl="reference"):
    return torch.ops.moe_fx.route(*route_args(spec, logits_TE, bias, impl))


def routing_error(weights_TK, ids_TK, ref_weights, ref_ids) -> float:
    """inf unless the same experts are picked per token; else the relative error of the weights."""
    ids_a, order_a = ids_TK.reshape(ref_ids.shape[0], -1).long().sort(dim=-1)
    ids_b, order_b = ref_ids.reshape(ref_ids.shape[0], -1).long().sort(dim=-1)
    if ids_a.shape != ids_b.shape or not torch.equal(ids_a, ids_b):
        return float("inf")
    wa = weights_TK.reshape(ids_a.shape).double().gather(1, order_a)
    wb = ref_weights.reshape(ids_b.shape).double().gather(1, order_b)
    return ((wa - wb).norm() / wb.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- Llama4: sigmoid of a scattered top-k
_SIGMOIDS = (torch.sigmoid, torch.nn.functional.sigmoid, "sigmoid")
_FLOAT_CASTS = ("float", "to")
# layout ops that commute with sigmoid: llama-models' reference code transposes the scattered [T, E] scores to
# [E, T] before the sigmoid
_TRANSPOSES = ("transpose", "t", "permute")


def _is_neg_inf_full(node) -> bool:
    if not isinstance(node, fx.Node) or target_name(node) not in ("full_like", "full"):
        return False
    fill = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
    return isinstance(fill, float) and fill == float("-inf")


def _layout_or_cast(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_method"
        and node.target in _FLOAT_CASTS + _TRANSPOSES
        or is_function(node, torch.transpose, torch.t, torch.permute)
    )


def sigmoid_after_scatter_sites(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """Llama4's router: s_TE = sigmoid(full_like(logits, -inf).scatter_(1, ids_TK, v_TK)[.float()]), with
    transposes between the scatter and the sigmoid too (llama-models' reference code).

    Returns (sigmoid node, scatter node, the casts and transposes between them) for each such site."""
    sites = []
    for node in graph.nodes:
        if not (node.op in ("call_function", "call_method") and (node.target in _SIGMOIDS)):
            continue
        casts, src = [], node.args[0]
        while _layout_or_cast(src):
            casts.append(src)
            src = src.args[0]
        if isinstance(src, fx.Node) and target_name(src) in ("scatter", "scatter_") and len(src.args) == 4:
            base, _, index, values = src.args
            shape = shape_of(src)
            if not (_is_neg_inf_full(base) and isinstance(index, fx.Node) and isinstance(values, fx.Node)):
                continue
            if shape and isinstance(src.args[1], int) and isinstance(shape[src.args[1]], int):  # E known
                sites.append((node, src, casts[::-1]))
    return sites


def _made(node: fx.Node, set_meta, like: fx.Node) -> fx.Node:
    """A node a normalisation inserted, with its fake value and the module stack and trace of the node it stands
    for."""
    set_meta(node)
    node.meta.update({k: like.meta[k] for k in ("nn_module_stack", "stack_trace") if k in like.meta})
    return node


def _shape_from(g: fx.Graph, shape, index: fx.Node, made) -> tuple:
    """`shape` with each symbolic size read off `index` (`index.size(d)`), which spans it there."""
    return tuple(s if isinstance(s, int) else made(g.call_method("size", (index, d))) for d, s in enumerate(shape))


def sink_sigmoid_into_scatter(gm: fx.GraphModule, set_meta) -> int:
    """Rewrite each `sigmoid(full(-inf).scatter(d, ids, v))` as `zeros.scatter(d, ids, sigmoid(v))`: equal
    exactly (sigmoid(-inf) = 0), and the [T, K] routing weights sigmoid(v) become a tensor of the graph,
    so the top-k cut exists and the dense [T, E] scores no longer read the logits. Returns the count."""
    count = 0
    for sig, scatter, casts in sigmoid_after_scatter_sites(gm.graph):
        _, dim, index, values = scatter.args
        g = gm.graph

        def made(node: fx.Node, like: fx.Node = sig) -> fx.Node:
            return _made(node, set_meta, like)

        with g.inserting_before(sig):
            w = values
            for c in casts:  # the same casts, now on the [T, K] values
                if c.target in _FLOAT_CASTS:
                    w = made(g.call_method(c.target, (w, *c.args[1:]), dict(c.kwargs)))
            w = made(g.call_function(sig.target, (w,), dict(sig.kwargs)))
            zeros = made(g.call_method("new_zeros", (w, _shape_from(g, shape_of(scatter), index, made))))
            dense = made(g.call_method("scatter", (zeros, dim, index, w)))
            for c in casts:  # the transposes, in their order, now on the dense scores
                if c.target not in _FLOAT_CASTS:
                    dense = made(g.create_node(c.op, c.target, (dense, *c.args[1:]), dict(c.kwargs)))
        sig.replace_all_uses_with(dense)
        g.erase_node(sig)
        for c in reversed(casts):
            if not c.users:
                g.erase_node(c)
        base = scatter.args[0]
        if not scatter.users and set(base.users) == {scatter}:  # nothing else reads the -inf tensor
            g.erase_node(scatter)
            g.erase_node(base)
        count += 1
    if count:
        g.lint()
        gm.recompile()
    return count


# ---------------------------------------------------------------- dense scores scattered into a fill like the logits
# fills that read their tensor argument's shape, dtype and device alone -> the `new_*` method that makes the same
_FILLS_LIKE = {
    "zeros_like": "new_zeros", "new_zeros": "new_zeros", "ones_like": "new_ones", "new_ones": "new_ones",
    "empty_like": "new_empty", "new_empty": "new_empty", "full_like": "new_full", "new_full": "new_full",
}  # fmt: skip


def _fill_value(fill: fx.Node):
    """A full's fill value (a number), None for the other fills, or False where it is not a plain number."""
    if target_name(fill) not in ("full_like", "new_full"):
        return None
    positional = len(fill.args) > (1 if target_name(fill) == "full_like" else 2)
    v = fill.args[-1] if positional else fill.kwargs.get("fill_value")
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else False


def fills_from_scatter_index(gm: fx.GraphModule, set_meta) -> int:
    """Rebuild each fill made like a computed tensor (`zeros_like(logits)`, `logits.new_zeros(T, E)`) that is the
    base of a `scatter(dim, index, src)` from the index's sizes: `index.new_zeros(shape, dtype=...)`, the same
    values. The dense [T, E] weights that naive blocks (and GPT-OSS's 4.57 router) scatter from the top-k then read
    the top-k ids' sizes instead of the logits, so that no router value but the top-k reaches the experts.
    Only where the index spans the fill on every dimension but `dim` and the fill's size along `dim` is static.
    Returns the count."""
    count, g = 0, gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    for fill in list(g.nodes):
        if target_name(fill) not in _FILLS_LIKE or not fill.args or not isinstance(fill.args[0], fx.Node):
            continue
        value, meta = _fill_value(fill), tensor_meta(fill)
        scatters = [u for u in fill.users if target_name(u) in ("scatter", "scatter_") and len(u.args) == 4]
        if value is False or meta is None or not scatters or set(fill.kwargs) - {"dtype", "device", "fill_value"}:
            continue
        _, dim, index, _ = scatters[0].args
        index_meta = tensor_meta(index) if isinstance(index, fx.Node) else None
        if not isinstance(dim, int) or index_meta is None or index_meta.dim() != meta.dim() or meta.dim() == 0:
            continue
        dim %= meta.dim()
        if index_meta.device != meta.device or not isinstance(meta.shape[dim], int):
            continue
        pairs = [(a, b) for d, (a, b) in enumerate(zip(meta.shape, index_meta.shape)) if d != dim]
        if not all(statically_known_true(a == b) for a, b in pairs):  # the index spans the fill but along dim
            continue
        first_use = min(fill.users, key=order.__getitem__)
        if order[index] > order[first_use]:  # the rebuilt fill goes before its first use, after the index
            continue
        with g.inserting_before(first_use):
            made = functools.partial(_made, set_meta=set_meta, like=fill)
            args = (index, _shape_from(g, meta.shape, index, made)) + ((value,) if value is not None else ())
            rebuilt = made(g.call_method(_FILLS_LIKE[target_name(fill)], args, {"dtype": meta.dtype}))
        fill.replace_all_uses_with(rebuilt)
        g.erase_node(fill)
        count += 1
    if count:
        g.lint()
        gm.recompile()
    return count
