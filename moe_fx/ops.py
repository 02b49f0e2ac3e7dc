"""The op contract: four `moe_fx::` custom ops (and `after_dispatch`, an ordering edge), each with its fake
implementation beside it.

Legend: T tokens, D model dim, F expert ffn dim, E experts (global), L experts on this rank,
K top-k, R dispatched rows (T*K on one device; what this rank receives under expert parallelism).

    route(logits_TE)                          -> weights_TK fp32, ids_TK int32 (id -1: dropped by capacity)
    route(x_TD, proj_weight=w_ED[, proj_bias=b_E]): the same of logits = linear(x, w, b), the router's own
                                                 projection taken into the op (a decode GEMV can beat cuBLAS)
    route(..., n_group, topk_group, group_score_topk, group_fill): group-limited top-k; the dropped groups'
                                                 experts rank at group_fill (0.0 or -inf, read off the graph)
    quantize_dispatch(x_TD, ids_TK, w_TK)     -> xq_ND, xscale_N*, expert_offsets_L1 int64,
                                                 gather_index_R int64, row_weights_R fp32,
                                                 row_index_R int64, comm_splits int64
    experts(xq_ND, xscale, offsets, gather_index_R, row_weights_R, w13, w2)   -> y_RD
    combine(y_RD, weights_TK, row_index_R, comm_splits)                       -> out_TD
    experts(..., reduce=True)                 -> out_ND: combine's weighted sum done by `experts` (one device,
                                                 a lowering registered with reduces=True); no combine node
    routed_experts(x_TD, logits or tokens, route's and experts' arguments) -> out_TD: route, quantize_dispatch
                                                 and experts(reduce=True) as one op (one device, activations
                                                 unquantised or per token: ROUTED_QUANT, an experts lowering
                                                 registered with `routes`), which runs them in fewer kernels at
                                                 decode (Triton: the GEMV, then one kernel)

N is the number of rows this rank holds after dispatch: the received rows under expert parallelism.
Where the rows would be the tokens themselves (one device or tp, activations not quantised:
`rows_are_tokens`), dispatch returns no rows (xq [0, D]) and the rewrite passes x_TD to `experts` in
xq's place: no copy of the tokens (an op's output may not alias its input). The rows are never copied
K times either: `experts` gathers them. Row r of the experts' computation reads `xq[gather_index[r]]`;
rows are grouped by local expert, and `expert_offsets_L1` are the group bounds. `row_weights_R` is the
routing weight of row r, for a lowering that applies it inside `experts` (`weight_at` "input" for Llama4,
or "output" fused into the second GEMM's epilogue); combine then sums unweighted. `row_index_R[r]` is
the flat (t*K + k) slot that row r belongs to (under expert parallelism: where combine puts row r back
before the reverse exchange); `comm_splits` is the int64 handle of the parallel layouts: send/recv row
counts per rank and what else combine needs (each layout's module documents its handle; empty on one
device and under tp). `xscale` is empty unless activations are quantised. Every op takes `impl`, the name
of the registry entry that runs it, chosen at rewrite time.

A dispatch lowering registered with `overlaps=True` (ep_alltoall's) returns once its exchange has started:
xq, xscale and row_weights are filled when `experts` or `combine` next runs, which wait for it first
(`lowering/distributed/exchanges.py`). Code that calls `quantize_dispatch` itself and reads those outputs
directly calls `exchanges.finish_exchanges()` first. For Inductor, which orders the graph itself, the
rewrite pins a block's shared expert between the two with `after_dispatch(x, handle)` (a copy of x) and
`experts(..., after=shared_out)`: a fifth op, for the order alone.

Capacity (`RouterSpec.capacity`, Switch and NLLB-MoE): `route` marks a (token, slot) pick past its
expert's capacity as dropped, id -1 and weight 0. Dispatch puts dropped rows after every expert's group
(`expert_offsets_L1[-1]` < R), `experts` writes zeros for them, so combine adds nothing for a dropped
pick. Only lowerings whose `supports` accepts dropped picks see such ids. Zero-computation experts
(`ExpertsSpec.identity_experts`, LongCat-Flash) reach dispatch as dropped picks too (`MoESpec.dropped_picks`).
"""

from __future__ import annotations

import torch

from moe_fx.lowering import quant as quant_fmt
from moe_fx.lowering import registry
from moe_fx.lowering.distributed import exchanges
from moe_fx.spec import MoESpec, RouterSpec


def _run(op: str, impl: str, **kwargs):
    return registry.lookup(op, impl).fn(**kwargs)


def _run_after_exchanges(op: str, impl: str, **kwargs):
    """`_run` for the ops that read dispatch's outputs: a dispatch that overlaps its exchange with the graph
    (`distributed/exchanges.py`) has them filled first."""
    if exchanges.in_flight():
        exchanges.finish_exchanges()
    return _run(op, impl, **kwargs)


# The ops are defined on a plain `torch.library.Library`, their schemas inferred from the type hints below,
# each run by its Python function for every device (CompositeExplicitAutograd) with no autograd formula.
# `torch.library.custom_op` would do the same with an autograd wrapper and a Dynamo-disabling wrapper around
# every call: 3-4x the host time per call (measured: ~17 against ~5 µs for the 22 arguments of `experts` on
# the CPU, ~115 µs of custom_op overhead per `experts` call on the H200 host), which is what eager decode pays.
_LIB = torch.library.Library("moe_fx", "FRAGMENT")


def _define(fn):
    """Define `moe_fx::<fn name>` with fn's schema and implementation; returns the op (an OpOverloadPacket)."""
    _LIB.define(fn.__name__ + torch.library.infer_schema(fn, mutates_args=()))
    _LIB.impl(fn.__name__, fn, "CompositeExplicitAutograd")
    return getattr(torch.ops.moe_fx, fn.__name__)


@_define
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
    score_dtype: torch.dtype = torch.float32,
    capacity: int = 0,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    group_fill: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits_TE (or [G, S, E], T = G*S) [, bias_E] -> (weights_TK float32, ids_TK int32).

    Math is float32; `score_dtype` bfloat16/float16 rounds the scores to that dtype before top-k, as a
    router that scores in low precision does (ties then fall the same way: lowest expert index first).
    `capacity` > 0: each expert takes at most `capacity` picks per group (a row of [G, S, E] logits, or
    all T tokens), first choices first, then in token order; the others get id -1 and weight 0.
    With `proj_weight` [E, D] (and `proj_bias` [E]), `logits` holds the tokens [..., D] and the logits are
    `linear(tokens, proj_weight, proj_bias)`, in the tokens' dtype: a lowering registered with `projects=True`
    computes them, for any other this op does first (torch's linear, as the original router did).
    `group_fill`: the selection value of experts outside the kept groups (n_group > 1).
    """
    entry = registry.lookup("route", impl)
    if proj_weight is not None and not entry.projects:
        logits, proj_weight, proj_bias = torch.nn.functional.linear(logits, proj_weight, proj_bias), None, None
    projection = dict(proj_weight=proj_weight, proj_bias=proj_bias) if entry.projects else {}
    return entry.fn(
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
        score_dtype=score_dtype,
        capacity=capacity,
        group_fill=group_fill,
        **projection,
    )


@torch.library.register_fake("moe_fx::route")
def _(logits, bias, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, scale, impl,
      score_dtype=torch.float32, capacity=0, proj_weight=None, proj_bias=None, group_fill=0.0):  # fmt: skip
    # [..., E] logits or [..., D] tokens: T is the product of the leading dims either way
    T = logits.numel() // logits.shape[-1] if logits.dim() != 2 else logits.shape[0]
    return logits.new_empty((T, k), dtype=torch.float32), logits.new_empty((T, k), dtype=torch.int32)


@_define
def quantize_dispatch(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    num_local_experts: int,
    quant: str,
    layout: str,
    group_name: str,
    expert_map: torch.Tensor | None,
    impl: str,
    max_tokens_per_rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_TD, ids_TK, weights_TK -> (xq_ND, xscale_N, expert_offsets_L1, gather_index_R, row_weights_R,
    row_index_R, comm_splits).

    Rows are grouped by (local) expert. `expert_map` [2, E] (expert parallel only, else None): row 0
    the rank that owns each global expert, row 1 its slot among that rank's local experts.
    `max_tokens_per_rank` > 0 (ep_alltoall only) bounds every rank's T: the exchange has fixed sizes.
    """
    bound = {"max_tokens_per_rank": max_tokens_per_rank} if max_tokens_per_rank else {}  # the padded lowering's
    return _run(
        "quantize_dispatch",
        impl,
        x=x,
        ids=ids,
        weights=weights,
        num_local_experts=num_local_experts,
        quant=quant,
        layout=layout,
        group_name=group_name,
        expert_map=expert_map,
        **bound,
    )


def rows_are_tokens(quant: str, layout: str) -> bool:
    """Whether dispatch's rows would be x itself (one device or tp, whose ranks sort their own replicated tokens,
    with the activations not quantised): then it returns none, and `experts` reads x (`experts_args`)."""
    return layout in ("single", "tp") and quant not in quant_fmt.ACTIVATION_QUANTISED


@torch.library.register_fake("moe_fx::quantize_dispatch")
def _(x, ids, weights, num_local_experts, quant, layout, group_name, expert_map, impl, max_tokens_per_rank=0):
    T, D = x.shape
    if layout in ("single", "tp"):  # tp: every rank sorts its own (replicated) tokens, no exchange
        N, R, H = 0 if rows_are_tokens(quant, layout) else T, T * ids.shape[1], 0
    elif max_tokens_per_rank:  # the padded exchange: W peers' C rows each, the handle one entry per pick
        from moe_fx.lowering.distributed.alltoall_padded import rows_per_peer
        from moe_fx.lowering.distributed.comm import group_of

        W = group_of(group_name).size()
        N = R = W * rows_per_peer(max_tokens_per_rank, ids.shape[1])
        H = T * ids.shape[1]
    else:  # rows received / routed to local experts, and the handle's length, known only at run time
        ctx = torch.library.get_ctx()
        N, R, H = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
    xq = x.new_empty((N, D), dtype=quant_fmt.activation_dtype(quant, x.dtype))
    xscale_shape = {"fp8": (N,), "int8": (N,), "fp8_block": (N, -(-D // quant_fmt.BLOCK))}.get(quant, (0,))
    xscale = x.new_empty(xscale_shape, dtype=torch.float32)
    offsets = x.new_empty((num_local_experts + 1,), dtype=torch.int64)
    gather_index = x.new_empty((R,), dtype=torch.int64)
    row_weights = x.new_empty((R,), dtype=torch.float32)
    row_index = x.new_empty((R,), dtype=torch.int64)
    splits = x.new_empty((H,), dtype=torch.int64)
    return xq, xscale, offsets, gather_index, row_weights, row_index, splits


@_define
def experts(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    expert_offsets: torch.Tensor,
    gather_index: torch.Tensor,
    row_weights: torch.Tensor,
    w13: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    weight_at: str,
    activation: str,
    gate_up: str,
    w13_transposed: bool,
    w2_transposed: bool,
    alpha: float,
    limit: float,
    quant: str,
    out_dtype: torch.dtype,
    impl: str,
    after: torch.Tensor | None = None,
    reduce: bool = False,
) -> torch.Tensor:
    """Rows xq[gather_index[r]], grouped by expert (expert_offsets_L1) -> y_RD = w2 · act(w13 · x) per row.

    `reduce` (one device, a lowering registered with `reduces=True`): -> out_ND instead, combine's sum done
    here: out[t] = Σ over the rows r of token t (gather_index[r] = t) of y_r, × row_weights[r] unless
    weight_at is "input"; the rewrite then has no `combine` node.

    `after`: a tensor only read for the order, the result of a block's shared expert that runs between its
    dispatch and its experts (`passes/overlap.py`): a compiler that schedules the graph itself (Inductor)
    then keeps it there.

    weight_at: "none" | "input" (row scaled by row_weights before w13) | "output" (y scaled after w2).
    w13 [E, 2F, D] holds gate and up (gate_up: concat | interleaved | up_first), or [E, F, D] for a
    non-gated MLP; with gate_up="separate", w13 is the gate [E, F, D] and w3 the up projection.
    `*_transposed` marks [E, D, 2F] / [E, F, D] storage; a 4-D w2 is [E, D, F] in column blocks,
    [E, ceil(F/W), D, W] (`quant.block_columns`: the rewrite's fp8 / int8 w2). w13_bias [E, 2F] (gate then up),
    w2_bias [E, D].
    """
    return _run_after_exchanges(
        "experts",
        impl,
        xq=xq,
        xscale=xscale,
        expert_offsets=expert_offsets,
        gather_index=gather_index,
        row_weights=row_weights,
        w13=w13,
        w3=w3,
        w2=w2,
        w13_bias=w13_bias,
        w2_bias=w2_bias,
        w13_scale=w13_scale,
        w2_scale=w2_scale,
        weight_at=weight_at,
        activation=activation,
        gate_up=gate_up,
        w13_transposed=w13_transposed,
        w2_transposed=w2_transposed,
        alpha=alpha,
        limit=limit,
        quant=quant,
        out_dtype=out_dtype,
        **({"reduce": True} if reduce else {}),  # only a lowering with `reduces=True` takes it
    )


@torch.library.register_fake("moe_fx::experts")
def _(
    xq,
    xscale,
    expert_offsets,
    gather_index,
    row_weights,
    w13,
    w3,
    w2,
    w13_bias,
    w2_bias,
    w13_scale,
    w2_scale,
    weight_at,
    activation,
    gate_up,
    w13_transposed,
    w2_transposed,
    alpha,
    limit,
    quant,
    out_dtype,
    impl,
    after=None,
    reduce=False,
):
    D = quant_fmt.w2_out_features(w2, w2_transposed)
    return xq.new_empty((xq.shape[0] if reduce else gather_index.shape[0], D), dtype=out_dtype)


# The quant modes `routed_experts` takes: activations unquantised or quantised per token (fp8_block's groups and
# int4's packed weights run the three ops)
ROUTED_QUANT = ("none", *quant_fmt.PER_TOKEN)


@_define
def routed_experts(
    x: torch.Tensor,
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
    route_impl: str,
    score_dtype: torch.dtype,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    group_fill: float,
    dispatch_impl: str,
    w13: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    weight_at: str,
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
    """x_TD and the router's logits (or its tokens, with `proj_weight`) -> out_TD: `route` → `quantize_dispatch` →
    `experts(reduce=True)` on one device, as one op, under `quant` (one of ROUTED_QUANT: the activations quantised
    per token). The experts lowering `impl` (registered with `routes`) runs the three in fewer kernels where it can
    (Triton at decode: the router's GEMV, which also quantises x, then one kernel whose programs each route their
    pick); elsewhere the three ops run, with `route_impl`, `dispatch_impl` and `impl`. The arguments are `route`'s
    and `experts`' (the rewrite's `routed_args`)."""
    if quant not in ROUTED_QUANT:
        raise ValueError(f"moe_fx: routed_experts takes quant in {ROUTED_QUANT}, got {quant!r}")
    entry = registry.lookup("experts", impl)
    if entry.routes is not None:
        routing = dict(logits=None if proj_weight is not None else logits, bias=bias, k=k, scoring=scoring,
                       order=order, renormalize=renormalize, n_group=n_group, topk_group=topk_group,
                       group_score_topk=group_score_topk, scale=scale, score_dtype=score_dtype,
                       group_fill=group_fill)  # fmt: skip
        weights = dict(w13=w13, w3=w3, w2=w2, w13_bias=w13_bias, w2_bias=w2_bias, weight_at=weight_at,
                       activation=activation, gate_up=gate_up, w13_transposed=w13_transposed,
                       w2_transposed=w2_transposed, alpha=alpha, limit=limit, out_dtype=out_dtype, quant=quant,
                       w13_scale=w13_scale, w2_scale=w2_scale)  # fmt: skip
        tokens = logits if proj_weight is not None else None
        out = entry.routes(x, tokens, proj_weight, proj_bias, routing, weights)
        if out is not None:
            return out
    weights_TK, ids_TK = route(logits, bias, k, scoring, order, renormalize, n_group, topk_group, group_score_topk,
                               scale, route_impl, score_dtype, 0, proj_weight, proj_bias, group_fill)  # fmt: skip
    xq, xscale, offsets, gather_index, row_weights, _, _ = quantize_dispatch(
        x, ids_TK, weights_TK, w13.shape[0], quant, "single", "", None, dispatch_impl
    )
    xq = x if rows_are_tokens(quant, "single") else xq
    return experts(xq, xscale, offsets, gather_index, row_weights, w13, w3, w2, w13_bias, w2_bias, w13_scale,
                   w2_scale, weight_at, activation, gate_up, w13_transposed, w2_transposed, alpha, limit, quant,
                   out_dtype, impl, None, True)  # fmt: skip


@torch.library.register_fake("moe_fx::routed_experts")
def _(x, logits, bias, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, scale, route_impl,
      score_dtype, proj_weight, proj_bias, group_fill, dispatch_impl, w13, w3, w2, w13_bias, w2_bias, w13_scale,
      w2_scale, weight_at, activation, gate_up, w13_transposed, w2_transposed, alpha, limit, quant, out_dtype,
      impl):  # fmt: skip
    return x.new_empty((x.shape[0], quant_fmt.w2_out_features(w2, w2_transposed)), dtype=out_dtype)


@_define
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
    return _run_after_exchanges(
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


@torch.library.register_fake("moe_fx::combine")
def _(y, weights, row_index, comm_splits, weighted, layout, group_name, impl):
    return y.new_empty((weights.shape[0], y.shape[1]))


@_define
def after_dispatch(x: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    """x (a copy), read once dispatch's `handle` exists: with `experts(after=...)`, the edges that keep a
    block's shared expert between its dispatch and its experts under Inductor (`passes/overlap.py`)."""
    return x.clone()


@torch.library.register_fake("moe_fx::after_dispatch")
def _(x, handle):
    return torch.empty_like(x)


# ---------------------------------------------------------------- argument builders
# One place that turns a spec into each op's positional arguments. They work on tensors (probes,
# tests) and on FX nodes (the rewrite) alike. `dispatched` is quantize_dispatch's 7-tuple.


def weight_at(spec: MoESpec) -> str:
    """Where `experts` applies the routing weight: "input" (Llama4) or "none" (combine applies it)."""
    return "input" if spec.weight_placement == "input" else "none"


def route_args(router: RouterSpec, logits_TE, bias, impl: str, proj_weight=None, proj_bias=None) -> tuple:
    """`route`'s arguments; with `proj_weight`, `logits_TE` is the tokens and route projects them."""
    r = router
    return (logits_TE, bias, r.k, r.scoring, r.order, r.renormalize, r.n_group, r.topk_group, r.group_score_topk,
            r.scale, impl, getattr(torch, r.score_dtype), r.capacity, proj_weight, proj_bias, r.group_fill)  # fmt: skip


def dispatch_args(spec: MoESpec, x_TD, ids_TK, weights_TK, impl: str, group_name: str = "", expert_map=None,
                  num_local_experts: int | None = None) -> tuple:  # fmt: skip
    L = spec.experts.num_experts if num_local_experts is None else num_local_experts
    return (x_TD, ids_TK, weights_TK, L, spec.quant.mode, spec.layout, group_name, expert_map, impl,
            spec.max_tokens_per_rank)  # fmt: skip


def experts_args(spec: MoESpec, x_TD, dispatched, w13, w3, w2, w13_bias, w2_bias, out_dtype, impl: str,
                 w13_scale=None, w2_scale=None, reduce: bool = False) -> tuple:  # fmt: skip
    """`experts`' arguments; x_TD: dispatch's input, the rows where `rows_are_tokens`; `reduce`: combine's sum
    done by experts too (a lowering with `reduces=True`)."""
    xq, xscale, offsets, gather_index, row_weights = dispatched[:5]
    if rows_are_tokens(spec.quant.mode, spec.layout):
        xq = x_TD
    es = spec.experts
    return (xq, xscale, offsets, gather_index, row_weights, w13, w3, w2, w13_bias, w2_bias, w13_scale, w2_scale,
            weight_at(spec), es.activation, es.gate_up, es.w13_transposed, es.w2_transposed, es.alpha, es.limit,
            spec.quant.mode, out_dtype, impl) + ((None, True) if reduce else ())  # fmt: skip


def routed_args(spec: MoESpec, x_TD, logits_TE, bias, w13, w3, w2, w13_bias, w2_bias, out_dtype, impl: dict[str, str],
                proj_weight=None, proj_bias=None, w13_scale=None, w2_scale=None) -> tuple:  # fmt: skip
    """`routed_experts`' arguments: `route`'s (`logits_TE` the tokens where `proj_weight` is given), then `experts`'
    (the weight scales under spec.quant); `impl`: each op's lowering."""
    r, es = spec.router, spec.experts
    return (x_TD, logits_TE, bias, r.k, r.scoring, r.order, r.renormalize, r.n_group, r.topk_group, r.group_score_topk,
            r.scale, impl["route"], getattr(torch, r.score_dtype), proj_weight, proj_bias, r.group_fill,
            impl["quantize_dispatch"], w13, w3, w2, w13_bias, w2_bias, w13_scale, w2_scale, weight_at(spec),
            es.activation, es.gate_up, es.w13_transposed, es.w2_transposed, es.alpha, es.limit, spec.quant.mode,
            out_dtype, impl["experts"])  # fmt: skip


def combine_args(spec: MoESpec, y_RD, weights_TK, dispatched, impl: str, group_name: str = "") -> tuple:
    row_index, splits = dispatched[5], dispatched[6]
    return y_RD, weights_TK, row_index, splits, weight_at(spec) == "none", spec.layout, group_name, impl
