"""Triton's decode step in two kernels: the router's GEMV, then one kernel that routes, gathers and runs the experts.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

At decode the four-op chain is five dependent kernels (GEMV, route, the sort, the fill of the fused kernel's
sums, the experts), and each costs ~2 µs of its own serial chain of loads and reductions plus the boundary,
however little work it does (bench/NOTES.md, 2026-12-06). Where the experts run a fused config at this T (the
down GEMM in the up tile's epilogue, the sum of each token's rows in fp32 atomics), `routed_experts` runs:
  1. the GEMV (`route.project`), whose programs also write the zeros of the fused kernel's sums;
  2. the fused experts kernel with `routing`: its program for F-slice s of pick p routes token p // K itself
     (`route._route_row`, the route kernel's own code) and takes the (p % K)-th expert. No sort: each program
     holds one real row.
The result is `experts(reduce=True)`'s over `route` and `quantize_dispatch`'s rows: the same picks, weights and
sums, in another order of fp32 atomic adds. Elsewhere (more tokens, a config that is not fused, a fused config
that does not compile) it returns None: the op runs the chain, as it does under deterministic algorithms.
"""

from __future__ import annotations

import torch
import triton

from moe_fx.lowering.triton import grouped_gemm, route
from moe_fx.lowering.triton.grouped_gemm import Routing

MAX_TOKENS = route.PROJECT_MAX_T  # the GEMV's range: above it torch's linear, and picks enough to sort


def routed_experts(
    x_TD: torch.Tensor,
    tokens_TD: torch.Tensor | None,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    routing: Routing,
    experts_args: dict,
) -> torch.Tensor | None:
    """out_TD of `experts(reduce=True)` over the rows `routing` picks, in two kernels; None where it does not route.

    `proj_weight` set: the logits are linear(tokens_TD, proj_weight, proj_bias) (routing.logits is ignored);
    `experts_args`: `grouped_gemm.experts`' keyword arguments past the rows (w13 … out_dtype)."""
    a = experts_args
    if not 0 < x_TD.shape[0] <= MAX_TOKENS:
        return None
    if not grouped_gemm.routes_at(x_TD, a["w13"], a["w2"], a["w2_transposed"], a["activation"], routing.k):
        return None
    D = a["w2"].shape[2] if a["w2_transposed"] else a["w2"].shape[1]
    sums = torch.empty((x_TD.shape[0] * D + 1,), dtype=torch.int32, device=x_TD.device)
    if proj_weight is not None:
        routing = routing._replace(logits=route.project(tokens_TD, proj_weight, proj_bias, zero=sums))
    else:
        sums.zero_()
    try:
        return grouped_gemm.experts(x_TD, None, None, None, **a, reduce=True, routing=routing, sums=sums)
    except triton.runtime.errors.OutOfResources:  # recorded by `tuning.unfit`: the next call's config is not fused
        return None
