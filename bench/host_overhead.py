"""Host time (µs) to enqueue each piece of the moe_fx Triton path, at a decode shape: where eager time goes.

    python bench/host_overhead.py --out DIR [--profile]
    python bench/host_overhead.py --out DIR --bodies      # also on a CPU

`--profile` also writes `host_profile.txt`: cProfile of the four ops through the dispatcher, by cumulative time.
`--bodies` times the four ops and their launchers with the kernel launches replaced by a no-op: the Python
around the launches (dispatcher, sizes, allocations, config choice), which needs no GPU; writes
`host_overhead-bodies.json`. The "T=1" rows are a decode step's summing block: route (projecting), dispatch
and experts(reduce=True) as three ops, and as one `routed_experts` op where the experts' config is fused (its
two launches; under `--bodies` every config is taken as fused, as Qwen3's shipped T=1 entry is on a GPU); the
"T=16" rows the same past the routing kernel's tokens, where `routed_experts` runs the three ops itself.

Times n calls with no synchronisation in between (the GPU is idle enough not to back-pressure):
a do-nothing Triton kernel, torch.empty, each moe_fx op through the dispatcher, and each launcher direct.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import platform
import pstats
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from moe_fx.lowering.triton import combine, dispatch, grouped_gemm, route, tuning
from moe_fx.ops import combine_args, dispatch_args, experts_args, route_args, routed_args
from moe_fx.spec import ExpertsSpec, MoESpec, RouterSpec

OPS = torch.ops.moe_fx


@triton.jit
def _noop_kernel(x_ptr, n, BLOCK: tl.constexpr):
    pass


def host_us(fn, n=200) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(5):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    sync()
    return elapsed / n * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    p.add_argument("--profile", action="store_true", help="cProfile the ops, written to host_profile.txt")
    p.add_argument("--bodies", action="store_true", help="the launchers without their kernel launches")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.bodies:
        raise SystemExit("moe_fx: bench/host_overhead.py launches CUDA kernels; on a CPU run it with --bodies")
    E, K, D, F_, T = 128, 8, 2048, 768, 16
    spec = MoESpec(ExpertsSpec(E, D, F_, dtype="bfloat16"), K, router=RouterSpec(K, renormalize=True))
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    logits = torch.randn(T, E, device=device, dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * F_, D, device=device, dtype=torch.bfloat16) / 50
    w2 = torch.randn(E, D, F_, device=device, dtype=torch.bfloat16) / 30
    setup = "triton" if device == "cuda" else "reference"  # the inputs of the rows below (the CPU has no kernels)
    w, ids = OPS.route(*route_args(spec.router, logits, None, setup))
    d = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, w, setup))
    y = torch.randn(T * K, D, device=device, dtype=torch.bfloat16)
    r = spec.router
    x1, gate = x[:1], torch.randn(E, D, device=device, dtype=torch.bfloat16)
    impls = dict.fromkeys(("route", "quantize_dispatch", "experts"), "triton")

    def chain(x_TD):  # route, dispatch, experts(reduce=True)
        w_, ids_ = OPS.route(*route_args(r, x_TD, None, "triton", gate))
        d_ = OPS.quantize_dispatch(*dispatch_args(spec, x_TD, ids_, w_, "triton"))
        return OPS.experts(*experts_args(spec, x_TD, d_, w13, None, w2, None, None, x.dtype, "triton", reduce=True))

    def routed(x_TD):
        return OPS.routed_experts(*routed_args(spec, x_TD, x_TD, None, w13, None, w2, None, None, x.dtype, impls, gate))

    rows = {
        "noop triton launch": lambda: _noop_kernel[(1,)](x, 1, BLOCK=16),
        "torch.empty": lambda: torch.empty(16, device=device),
        "op route": lambda: OPS.route(*route_args(r, logits, None, "triton")),
        "launcher route": lambda: route.route(logits, None, K, "softmax", r.order, True, 1, 1, 2, 1.0),
        "op dispatch": lambda: OPS.quantize_dispatch(*dispatch_args(spec, x, ids, w, "triton")),
        "launcher dispatch": lambda: dispatch.dispatch(x, ids, w, E),
        "op experts": lambda: OPS.experts(*experts_args(spec, x, d, w13, None, w2, None, None, x.dtype, "triton")),
        "launcher experts": lambda: grouped_gemm.experts(x, d[2], d[3], d[4], w13, None, w2, None, None, "none",
                                                         "silu_gated", "concat", False, False, 1.702, 7.0, x.dtype),
        "op combine": lambda: OPS.combine(*combine_args(spec, y, w, d, "triton")),
        "launcher combine": lambda: combine.combine(y, w, d[5], True),
    }  # fmt: skip
    decode_rows = {  # T=16: past the routing kernel's tokens, routed_experts runs the three ops itself
        "ops chain T=1": lambda: chain(x1),
        "op routed_experts T=1": lambda: routed(x1),
        "ops chain T=16": lambda: chain(x),
        "op routed_experts T=16": lambda: routed(x),
    }
    if args.bodies:
        for module in (route, dispatch, grouped_gemm, combine):
            module.launch = lambda *args, **kwargs: None
        rows = {name: fn for name, fn in rows.items() if name != "noop triton launch"}
    result = {name: host_us(fn) for name, fn in rows.items()}
    if args.bodies:  # as on a GPU with a fused T=1 entry: routed_experts takes its two launches
        choose = tuning._choose
        tuning._choose = lambda *args: dataclasses.replace(choose(*args), fused=True)
    result |= {name: host_us(fn) for name, fn in decode_rows.items()}
    for name, us in result.items():
        print(f"{name:22s} {us:8.1f} µs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "triton": triton.__version__, "torch": torch.__version__, "bodies": args.bodies}  # fmt: skip
    name = "host_overhead-bodies.json" if args.bodies else "host_overhead.json"
    (out / name).write_text(json.dumps({"meta": meta, "us": result}, indent=1))
    if args.profile:
        ops = [fn for name, fn in rows.items() if name.startswith("op ")]
        profile = cProfile.Profile()
        profile.runcall(lambda: [op() for _ in range(200) for op in ops])
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(60)
        (out / "host_profile.txt").write_text(text.getvalue())


if __name__ == "__main__":
    main()
