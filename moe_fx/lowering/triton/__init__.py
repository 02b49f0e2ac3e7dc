"""Triton lowerings for ("cuda", "single"): route, quantize_dispatch, experts and combine.

Importing this package registers them; nothing here touches the GPU driver (kernels compile on their
first launch). Under TRITON_INTERPRET=1 the same launchers run on CPU tensors (the CI tests do that).
"""

from __future__ import annotations

import torch

from moe_fx.lowering.registry import register_lowering
from moe_fx.lowering.triton import combine as _combine
from moe_fx.lowering.triton import decode as _decode
from moe_fx.lowering.triton import dispatch as _dispatch
from moe_fx.lowering.triton import grouped_gemm as _gemm
from moe_fx.lowering.triton import route as _route
from moe_fx.lowering.triton import tuning as _tuning
from moe_fx.spec import MoESpec

NAME = "triton"
PRIORITY = 20
MAX_EXPERTS = 1024  # route and the tile lookup hold all E in registers
DTYPES = ("float32", "float16", "bfloat16")


def supports_router(spec: MoESpec) -> str | None:
    """Dropped picks are fine downstream (dispatch puts them after the groups, experts writes them zeros);
    the capacity that drops them is counted by the reference route only."""
    r, E = spec.router, spec.experts.num_experts + spec.experts.identity_experts
    if r is not None and r.capacity:
        return f"token capacity ({r.capacity}) is not implemented by {NAME} route"
    if E > MAX_EXPERTS:
        return f"{E} experts exceed the {MAX_EXPERTS} that {NAME} route holds in registers"
    if r is not None and r.n_group > 1 and E % r.n_group:
        return f"experts ({E}) not divisible by n_group ({r.n_group})"
    return None


# The compute capability each quant mode's tensor-core operands need: e4m3 from sm89 (Ada, Hopper); int8 and
# int4_weight (bf16/fp16 operands after unpacking) sm80.
CAPABILITY = {"fp8": (8, 9), "fp8_block": (8, 9), "int8": (8, 0), "int4_weight": (8, 0)}


def supports_quant(mode: str) -> str | None:
    """None if this process's CUDA device runs `mode`; asks the driver only for a quantised mode, at rewrite time."""
    if mode == "none":
        return None
    if mode not in CAPABILITY:
        return f"quant={mode!r} is not implemented by {NAME} (it runs {tuple(CAPABILITY)})"
    if not torch.cuda.is_available():
        return f"quant={mode!r} needs a CUDA device, none is available"
    have, need = torch.cuda.get_device_capability(), CAPABILITY[mode]
    if tuple(have) < need:
        cores = {"int8": "int8", "int4_weight": "bf16"}.get(mode, "fp8")
        return (f"quant={mode!r} needs compute capability >= {need[0]}.{need[1]} ({cores} tensor cores), "
                f"this device has {have[0]}.{have[1]}")  # fmt: skip
    return None


def supports_rows(spec: MoESpec) -> str | None:
    reason = supports_quant(spec.quant.mode)
    if reason is not None:
        return reason
    if spec.experts.num_experts > MAX_EXPERTS:
        return f"{spec.experts.num_experts} experts exceed the {MAX_EXPERTS} that {NAME} holds in registers"
    return None


def supports_experts(spec: MoESpec) -> str | None:
    if spec.experts.dtype not in DTYPES:
        return f"dtype {spec.experts.dtype} is not one of {DTYPES}"
    return supports_rows(spec)


@register_lowering("route", device="cuda", name=NAME, priority=PRIORITY, supports=supports_router, projects=True)
def triton_route(logits, bias, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, scale,
                 score_dtype, capacity, group_fill=0.0, proj_weight=None, proj_bias=None):  # fmt: skip
    if capacity:
        raise NotImplementedError(f"moe_fx: {NAME} route has no token capacity, got capacity={capacity}")
    if proj_weight is not None:  # `logits` holds the tokens
        logits = _route.project(logits.reshape(-1, logits.shape[-1]), proj_weight, proj_bias)
    return _route.route(logits, bias, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, scale,
                        score_dtype, group_fill)  # fmt: skip


@register_lowering("quantize_dispatch", device="cuda", name=NAME, priority=PRIORITY, supports=supports_rows)
def triton_quantize_dispatch(x, ids, weights, num_local_experts, quant, layout, group_name, expert_map):
    if quant not in ("none", *CAPABILITY) or layout != "single" or expert_map is not None:
        raise NotImplementedError(
            f"moe_fx: {NAME} quantize_dispatch runs quant in {('none', *CAPABILITY)} on one device, got "
            f"quant={quant!r}, layout={layout!r}, expert_map={'set' if expert_map is not None else None}"
        )
    return _dispatch.dispatch(x, ids, weights, num_local_experts, quant)


def reduces_natively(spec: MoESpec) -> bool:
    """Whether this GPU adds the experts' dtype atomically in L2 (`tuning.native_atomics`): then Triton's
    experts does combine's sum too (`experts(reduce=True)`)."""
    return _tuning.native_atomics(getattr(torch, spec.experts.dtype))


def sums_in_order() -> bool:
    """Whether `experts(reduce=True)` must give the same bits on every run: torch.use_deterministic_algorithms(True)
    (warn_only too: PyTorch's ops take their deterministic implementations then as well)."""
    return torch.are_deterministic_algorithms_enabled()


def routes(x, tokens, proj_weight, proj_bias, routing, weights):
    """`moe_fx::routed_experts` in two kernels where the experts' config at this T is fused (`decode.py`); None
    elsewhere, and under deterministic algorithms (its sums are atomics)."""
    if sums_in_order():
        return None
    return _decode.routed_experts(x, tokens, proj_weight, proj_bias, _gemm.Routing(**routing), weights)


@register_lowering("experts", device="cuda", name=NAME, priority=PRIORITY, supports=supports_experts,
                   reduces=reduces_natively, routes=routes)  # fmt: skip
def triton_experts(
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
    reduce=False,
):
    """reduce under torch.use_deterministic_algorithms(True) (a graph rewritten before it was set): the rows are
    stored, weighted as the sum would weight them, and summed per token in row order, in place of the down GEMM's
    atomics, whose order differs from run to run."""
    in_order = reduce and sums_in_order()
    if in_order and weight_at == "none":  # the sum weights each row by its routing weight
        weight_at = "output"
    y = _gemm.experts(xq, expert_offsets, gather_index, row_weights, w13, w3, w2, w13_bias, w2_bias, weight_at,
                      activation, gate_up, w13_transposed, w2_transposed, alpha, limit, out_dtype, quant=quant,
                      xscale=xscale, w13_scale=w13_scale, w2_scale=w2_scale,
                      reduce=reduce and not in_order)  # fmt: skip
    if not in_order:
        return y
    # y_RD -> out_TD: index_add_ is deterministic in this mode (rows of a token in row order: by expert)
    out_TD = torch.zeros((xq.shape[0], y.shape[1]), dtype=torch.float32, device=y.device)
    return out_TD.index_add_(0, gather_index, y.float()).to(out_dtype)


@register_lowering("combine", device="cuda", name=NAME, priority=PRIORITY)
def triton_combine(y, weights, row_index, comm_splits, weighted, layout, group_name):
    if layout != "single":
        raise NotImplementedError(f"moe_fx: {NAME} combine runs layout='single' only, got {layout!r}")
    return _combine.combine(y, weights, row_index, weighted)
