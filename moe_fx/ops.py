"""The op contract: four `moe_fx::` custom ops, each with its fake implementation beside it.

Legend: T tokens, D model dim, F expert ffn dim, E experts (global), L experts on this rank,
K top-k, R dispatched rows (T*K on one device; what this rank receives under expert parallelism).

    route(logits_TE)                         -> weights_TK fp32, ids_TK int32
    quantize_dispatch(x_TD, ids_TK, w_TK)    -> xq_RD, xscale_R*, expert_offsets_L1 int64,
                                                row_index_R int64, comm_splits int64
    experts(xq_RD, xscale, offsets, w13, w2) -> y_RD
    combine(y_RD, weights_TK, row_index_R)   -> out_TD

`row_index_R[r]` is the flat (t*K + k) slot that dispatched row r came from; `comm_splits` holds the
send/recv row counts per rank for the parallel layouts (empty on one device). `xscale` is empty
unless activations are quantised. Every op takes `impl`, the name of the registry entry that runs it,
chosen at rewrite time.
"""

from __future__ import annotations

import torch

from moe_fx.lowering import registry


def _run(op: str, impl: str, **kwargs):
    return registry.lookup(op, impl).fn(**kwargs)


@torch.library.custom_op("moe_fx::route", mutates_args=())
def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    scoring: str,
    order: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    group_score_topk: int,
    scale: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits_TE [, bias_E] -> (weights_TK float32, ids_TK int32)."""
    return _run(
        "route",
        impl,
        logits=logits,
        bias=bias,
        k=k,
        scoring=scoring,
        order=order,
        renormalize=renormalize,
        n_group=n_group,
        topk_group=topk_group,
        group_score_topk=group_score_topk,
        scale=scale,
    )


@route.register_fake
def _(logits, bias, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, scale, impl):
    T = logits.shape[0]
    return logits.new_empty((T, k), dtype=torch.float32), logits.new_empty((T, k), dtype=torch.int32)


@torch.library.custom_op("moe_fx::quantize_dispatch", mutates_args=())
def quantize_dispatch(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    num_local_experts: int,
    quant: str,
    weight_on_input: bool,
    layout: str,
    group_name: str,
    expert_map: torch.Tensor | None,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_TD, ids_TK, weights_TK -> (xq_RD, xscale, expert_offsets_L1, row_index_R, comm_splits).

    Rows are grouped by (local) expert; `weight_on_input` multiplies each row by its routing weight
    here (Llama4) instead of in combine. `expert_map` [E] maps global -> local expert id (-1: remote).
    """
    return _run(
        "quantize_dispatch",
        impl,
        x=x,
        ids=ids,
        weights=weights,
        num_local_experts=num_local_experts,
        quant=quant,
        weight_on_input=weight_on_input,
        layout=layout,
        group_name=group_name,
        expert_map=expert_map,
    )


@quantize_dispatch.register_fake
def _(x, ids, weights, num_local_experts, quant, weight_on_input, layout, group_name, expert_map, impl):
    T, D = x.shape
    if layout == "single":
        R = T * ids.shape[1]
    else:
        R = torch.library.get_ctx().new_dynamic_size()
    xq = x.new_empty((R, D))
    xscale = x.new_empty((0,), dtype=torch.float32)
    offsets = x.new_empty((num_local_experts + 1,), dtype=torch.int64)
    row_index = x.new_empty((R,), dtype=torch.int64)
    splits = x.new_empty((0,), dtype=torch.int64)
    return xq, xscale, offsets, row_index, splits


@torch.library.custom_op("moe_fx::experts", mutates_args=())
def experts(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    expert_offsets: torch.Tensor,
    w13: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    row_weights: torch.Tensor | None,
    activation: str,
    gate_up: str,
    w13_transposed: bool,
    w2_transposed: bool,
    alpha: float,
    limit: float,
    quant: str,
    out_dtype: torch.dtype,
    impl: str,
) -> torch.Tensor:
    """xq_RD rows grouped by expert (expert_offsets_L1) -> y_RD = w2 · act(w13 · x) per row.

    w13 [E, 2F, D] holds gate and up (gate_up: concat | interleaved | up_first), or [E, F, D] for a
    non-gated MLP; with gate_up="separate", w13 is the gate [E, F, D] and w3 the up projection.
    `*_transposed` marks [E, D, 2F] / [E, F, D] storage. w13_bias [E, 2F] (gate then up), w2_bias [E, D].
    """
    return _run(
        "experts",
        impl,
        xq=xq,
        xscale=xscale,
        expert_offsets=expert_offsets,
        w13=w13,
        w3=w3,
        w2=w2,
        w13_bias=w13_bias,
        w2_bias=w2_bias,
        w13_scale=w13_scale,
        w2_scale=w2_scale,
        row_weights=row_weights,
        activation=activation,
        gate_up=gate_up,
        w13_transposed=w13_transposed,
        w2_transposed=w2_transposed,
        alpha=alpha,
        limit=limit,
        quant=quant,
        out_dtype=out_dtype,
    )


@experts.register_fake
def _(
    xq,
    xscale,
    expert_offsets,
    w13,
    w3,
    w2,
    w13_bias,
    w2_bias,
    w13_scale,
    w2_scale,
    row_weights,
    activation,
    gate_up,
    w13_transposed,
    w2_transposed,
    alpha,
    limit,
    quant,
    out_dtype,
    impl,
):
    D = w2.shape[2] if w2_transposed else w2.shape[1]
    return xq.new_empty((xq.shape[0], D), dtype=out_dtype)


@torch.library.custom_op("moe_fx::combine", mutates_args=())
def combine(
    y: torch.Tensor,
    weights: torch.Tensor,
    row_index: torch.Tensor,
    comm_splits: torch.Tensor,
    weighted: bool,
    layout: str,
    group_name: str,
    impl: str,
) -> torch.Tensor:
    """y_RD, weights_TK, row_index_R -> out_TD = sum_k weights[t, k] * y[row of (t, k)]."""
    return _run(
        "combine",
        impl,
        y=y,
        weights=weights,
        row_index=row_index,
        comm_splits=comm_splits,
        weighted=weighted,
        layout=layout,
        group_name=group_name,
    )


@combine.register_fake
def _(y, weights, row_index, comm_splits, weighted, layout, group_name, impl):
    return y.new_empty((weights.shape[0], y.shape[1]))
