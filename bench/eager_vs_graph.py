"""One moe_fx layer at prefill, eager against a CUDA-graph replay, with the profiler's kernel sum and the host's
enqueue time: whether the host or a sync leaves the GPU idle inside a call (then eager > graph).

Each variant is timed alone (`timing.median_us`, the L2 emptied by a read before each repetition), twice, not in
`bench/layer.py`'s rotation.

    python bench/eager_vs_graph.py [--shapes qwen3 mixtral] [--T 8192] --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import layer
import torch

from moe_fx.lowering.triton import timing
from moe_fx.spec import ExpertsSpec, MoESpec, RouterSpec


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen3", "mixtral"], choices=list(layer.SHAPES))
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    print("| shape | variant | eager µs (2 timings) | graph µs (2 timings) | kernel sum µs | host enqueue µs |")
    for name in args.shapes:
        E, K, D, F_ = layer.SHAPES[name]
        block = layer.hf_block(E, K, D, F_)
        spec = MoESpec(ExpertsSpec(E, D, F_, dtype="bfloat16"), K, router=RouterSpec(K, renormalize=True))
        fns = {"bf16": layer.moe_fx_layer(block, spec, "triton"),
               "fp8": layer.moe_fx_quant_layer(block, spec, "fp8")[0]}  # fmt: skip
        x = torch.randn(args.T, D, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            for variant, fn in fns.items():
                graph = timing.graph_replay(lambda fn=fn, x=x: fn(x))
                kernels = layer.kernels(graph, top=20)
                host = layer.host_us(fn, x, n=10)
                eager = [timing.median_us(lambda fn=fn, x=x: fn(x)) for _ in range(2)]
                graphed = [timing.median_us(graph) for _ in range(2)]
                row = {"shape": name, "T": args.T, "variant": variant, "eager_us": eager, "graph_us": graphed,
                       "kernel_sum_us": sum(kernels.values()), "kernels_us": kernels, "host_us": host}  # fmt: skip
                rows.append(row)
                print(f"| {name} | {variant} | {eager[0]:.0f}, {eager[1]:.0f} | {graphed[0]:.0f}, {graphed[1]:.0f} "
                      f"| {row['kernel_sum_us']:.0f} | {host:.0f} |", flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    path = out / f"eager-vs-graph-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
