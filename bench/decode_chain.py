"""What a decode step's chain of small kernels costs, and so what fusing route and the sort into experts could save.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

At T=1 the Triton layer (one device, bf16, the sum in experts) is five dependent kernels: the router's GEMV
(`route.project`), `route`, the decode sort (`dispatch`), the fill of the fused kernel's fp32 sums, the experts
kernel. Each variant below is one CUDA graph, replayed after the L2 is emptied by a read:
  - chain: all five, as the layer runs them;
  - routed: `decode.routed_experts`, the GEMV (writing the sums' zeros) and the fused kernel that routes each pick
    itself, where the experts' config at this T is fused (else not timed);
  - no_route_sort: the GEMV, then experts on rows dispatched once beforehand: route and the sort cost nothing,
    the lower bound of a kernel that routes inside experts (which would still pay for its top-k);
  - experts: the experts op alone (its fill included); fill: that fill alone;
  - project, route, dispatch: each alone.
A table and JSON. Shapes from `bench/layer.py`; uniform random weights, softmax routing with renormalisation.

    python bench/decode_chain.py --out OUT [--shapes qwen3 gptoss] [--T 1 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import write_rows  # noqa: E402
from layer import SHAPES  # noqa: E402

from moe_fx.lowering.triton import decode, route, timing, tuner  # noqa: E402
from moe_fx.lowering.triton.dispatch import dispatch  # noqa: E402
from moe_fx.lowering.triton.grouped_gemm import Routing, experts  # noqa: E402

VARIANTS = ("chain", "routed", "no_route_sort", "experts", "fill", "project", "route", "dispatch")


def variants(shape: str, T: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """{variant: fn} on one set of random inputs (see the module's docstring)."""
    E, K, D, F = SHAPES[shape]
    w13, w2, _ = tuner.random_weights(E, D, F, "silu_gated", dtype, device)
    x = torch.randn(T, D, device=device, dtype=dtype)
    w_router = torch.randn(E, D, device=device, dtype=dtype) / D**0.5

    routing = Routing(None, None, K, "softmax", "score_then_topk", True, 1, 1, 1, 1.0, torch.float32, 0.0)
    experts_kw = dict(w13=w13, w3=None, w2=w2, w13_bias=None, w2_bias=None, weight_at="none", activation="silu_gated",
                      gate_up="concat", w13_transposed=False, w2_transposed=False, alpha=1.702, limit=7.0,
                      out_dtype=dtype)  # fmt: skip

    def route_of(logits):
        return route.route(logits, None, K, routing.scoring, routing.order, True, 1, 1, 1, 1.0)

    def experts_of(offsets, gather, row_weights):
        return experts(x, offsets, gather, row_weights, **experts_kw, reduce=True)

    logits = route.project(x, w_router, None)
    weights_TK, ids_TK = route_of(logits)
    _, _, offsets, gather, row_weights, _, _ = dispatch(x, ids_TK, weights_TK, E)

    def chain():
        w, ids = route_of(route.project(x, w_router, None))
        _, _, o, g, rw, _, _ = dispatch(x, ids, w, E)
        return experts_of(o, g, rw)

    def routed():
        return decode.routed_experts(x, x, w_router, None, routing, experts_kw)

    def no_route_sort():
        route.project(x, w_router, None)
        return experts_of(offsets, gather, row_weights)

    return {
        "chain": chain,
        **({"routed": routed} if routed() is not None else {}),
        "no_route_sort": no_route_sort,
        "experts": lambda: experts_of(offsets, gather, row_weights),
        "fill": lambda: torch.zeros((T * D + 1,), dtype=torch.int32, device=device),
        "project": lambda: route.project(x, w_router, None),
        "route": lambda: route_of(logits),
        "dispatch": lambda: dispatch(x, ids_TK, weights_TK, E),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen3", "gptoss"], choices=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[1, 4])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    rows, path = [], None
    print("| shape | T | " + " | ".join(VARIANTS) + " | chain - no_route_sort |")
    for shape in args.shapes:
        for T in args.T:
            fns = variants(shape, T)
            err = None
            if "routed" in fns:  # the same picks, summed in another order: fp32 atomics, then bf16
                ref, out = fns["chain"]().double(), fns["routed"]().double()
                err = ((out - ref).norm() / ref.norm()).item()
            names = [name for name in VARIANTS if name in fns]
            replays = {name: timing.graph_replay(fns[name]) for name in names}
            samples = {name: [] for name in names}
            for r in range(args.rounds):  # each round times every variant once, in an order rotated by one
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    samples[name].append(timing.median_us(replays[name]))
            us = {name: statistics.median(s) for name, s in samples.items()}
            rows.append(dict(shape=shape, T=T, us=us, routed_vs_chain_rel_err=err))
            cells = " | ".join(f"{us[v]:.1f}" if v in us else "-" for v in VARIANTS)
            print(f"| {shape} | {T} | {cells} | {us['chain'] - us['no_route_sort']:.1f} | routed err {err} |")
            path = write_rows(args.out, "decode-chain", rows, path, rounds=args.rounds)


if __name__ == "__main__":
    main()
