"""Triton's decode step in two kernels: the router's GEMV, then one kernel that routes, gathers and runs the experts.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

At decode the four-op chain is five dependent kernels (GEMV, route, the sort, the fill of the fused kernel's
sums, the experts), and each costs ~2 µs of its own serial chain of loads and reductions plus the boundary,
however little work it does (bench/NOTES.md, 2026-12-06). Where the experts run a fused config at this T (the
down GEMM in the up tile's epilogue, the sum of each token's rows in fp32 atomics), `routed_experts` runs:
  1. the GEMV (`route.project`), whose programs also write the zeros of the fused kernel's sums and, under fp8
     or int8, quantise x's rows per token (`route.project_quantised`; where the router reads other tokens than
     the experts, a quantisation launch of its own);
  2. the fused experts kernel with `routing`: its program for F-slice s of pick p routes token p // K itself
     (`route._route_row`, the route kernel's own code) and takes the (p % K)-th expert. No sort: each program
     holds one real row.
The result is `experts(reduce=True)`'s over `route` and `quantize_dispatch`'s rows: the same picks, weights and
sums, in another order of fp32 atomic adds (fp8 / int8: h quantised per F-slice of a row, as fused configs do).
Elsewhere (more tokens, a config that is not fused, a fused config that does not compile) it returns None: the op
runs the chain, as it does under deterministic algorithms.
"""

from __future__ import annotations

import torch
import triton

from moe_fx.lowering.quant import w2_out_features
from moe_fx.lowering.triton import grouped_gemm, quantize, route
from moe_fx.lowering.triton.grouped_gemm import Routing
from moe_fx.lowering.triton.tuning import ExpertsConfig

MAX_TOKENS = route.PROJECT_MAX_T  # the GEMV's range: above it torch's linear, and picks enough to sort


def routed_experts(
    x_TD: torch.Tensor,
    tokens_TD: torch.Tensor | None,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    routing: Routing,
    experts_args: dict,
    config: ExpertsConfig | None = None,
) -> torch.Tensor | None:
    """out_TD of `experts(reduce=True)` over the rows `routing` picks, in two kernels; None where it does not route.

    `proj_weight` set: the logits are linear(tokens_TD, proj_weight, proj_bias) (routing.logits is ignored);
    `experts_args`: `grouped_gemm.experts`' keyword arguments past the rows (w13 … out_dtype; quant and the weight
    scales under fp8 / int8). `config` (tuning): the experts' config in place of the chosen one; it routes where it
    is fused, and raises where it does not compile (the chosen one gives way to the chain then)."""
    a, quant = experts_args, experts_args.get("quant", "none")
    if not 0 < x_TD.shape[0] <= MAX_TOKENS:
        return None
    if not grouped_gemm.routes_at(x_TD, a["w13"], a["w2"], a["w2_transposed"], a["activation"], routing.k, quant,
                                  config):  # fmt: skip
        return None
    D = w2_out_features(a["w2"], a["w2_transposed"])
    sums = torch.empty((x_TD.shape[0] * D + 1,), dtype=torch.int32, device=x_TD.device)
    xq = xscale = None
    if proj_weight is not None:  # the GEMV quantises x's rows too (fp8, int8) where its tokens are x
        in_gemv = quant if _same_view(tokens_TD, x_TD) else "none"
        logits, xq, xscale = route.project_quantised(tokens_TD, proj_weight, proj_bias, in_gemv, zero=sums)
        routing = routing._replace(logits=logits)
    else:
        sums.zero_()
    if quant == "none":
        xq = x_TD
    elif xq is None:
        xq, xscale = quantize.quantize_rows(x_TD, quant)
    try:
        return grouped_gemm.experts(xq, None, None, None, **a, config=config, xscale=xscale, reduce=True,
                                    routing=routing, sums=sums)  # fmt: skip
    except triton.runtime.errors.OutOfResources:  # recorded by `tuning.unfit`: the next call's config is not fused
        if config is not None:
            raise
        return None


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same values: the same memory, dtype, shape and strides (two reshapes of one tensor)."""
    return (a.data_ptr(), a.dtype, a.shape, a.stride()) == (b.data_ptr(), b.dtype, b.shape, b.stride())
