"""Identify the router between the logits [T, E] and the top-k cut (weights, ids).

Recognised (the route op replaces them):
    softmax(logits) -> topk -> [renormalise] -> [x scale]                 Mixtral, Qwen, OLMoE
    topk(logits) -> softmax                                               GPT-OSS, Granite, JetMoE
    sigmoid(logits) [+ bias_E] -> [group-limited] topk -> gather -> [renorm] -> [x scale]   DeepSeek-V3
    softmax(logits).max(-1)                                               top-1
Candidates come from the ops present; each is checked on probes against the original router.
Anything else stays in the graph as an opaque router, and the rewrite starts at its top-k outputs.
"""

from __future__ import annotations

import itertools

import torch
import torch.fx as fx

from moe_fx.ops import route_args
from moe_fx.passes.graph_view import shape_of, target_name
from moe_fx.spec import RouterSpec


def _float_constants(node: fx.Node) -> list[float]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, float)]


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
    groups = [(1, 1, 2)]
    for n in router_nodes:
        shape = shape_of(n)
        if shape and len(shape) == 3 and 1 < shape[1] < num_experts and shape[1] * shape[2] == num_experts:
            groups = [
                (shape[1], topk_group, score_k)
                for topk_group in _group_topks(router_nodes, shape[1])
                for score_k in (2, 1)
            ]
            break
    scales = {1.0} | {c for n in router_nodes if target_name(n) in ("mul", "__mul__") for c in _float_constants(n)}
    biases = [None] + [b for b in bias_leaves]
    for (order, scoring), (n_group, topk_group, score_k), scale, renorm, bias in itertools.product(
        orders, groups, sorted(scales), (False, True), biases
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
            scale=scale,
        )
        yield spec, bias


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
