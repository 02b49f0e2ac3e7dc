"""How the L2 is emptied before each timed call, and what it does to a decode step's time: the Triton experts op
alone and the whole moe_fx layer (`layer.py`'s), as CUDA-graph replays, after the L2 is emptied by writing a
buffer (as `triton.testing.do_bench` does), by reading one (`timing.median_us`'s default), or not at all,
against the weight-bytes floor (the hit experts' weights over the copy bandwidth); with `--profile`, the
layer's kernels after each emptying.

    python bench/flush.py --out OUT [--shapes qwen3 gptoss] [--T 1 16] [--profile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import layer  # noqa: E402
from experts_op import experts_op, write_rows  # noqa: E402

from moe_fx.lowering.triton import timing  # noqa: E402
from moe_fx.spec import ExpertsSpec, MoESpec, RouterSpec  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(layer.SHAPES), choices=list(layer.SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[1, 16])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.manual_seed(0)
    bw, _ = layer.ceilings()
    print(f"copy {bw / 1e12:.2f} TB/s; µs per graph replay, L2 emptied by: " + ", ".join(timing.FLUSHES))
    print("| shape | T | what | weights floor | " + " | ".join(timing.FLUSHES) + " | write − read |")
    rows, path = [], None
    for shape in args.shapes:
        E, K, D, F = layer.SHAPES[shape]
        block = layer.hf_block(E, K, D, F)
        spec = MoESpec(ExpertsSpec(E, D, F, dtype="bfloat16"), K, router=RouterSpec(K, renormalize=True))
        run_layer = layer.moe_fx_layer(block, spec, "triton")
        for T in args.T:
            op = experts_op(shape, T)
            hit = op.inputs[1].unique().numel()
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                layer_hit = torch.nn.functional.linear(x, block.gate.weight).topk(K, dim=-1).indices.unique().numel()
                calls = {"experts op": (timing.graph_replay(lambda op=op: op()), hit),
                         "layer": (timing.graph_replay(lambda x=x, f=run_layer: f(x)), layer_hit)}  # fmt: skip
                for what, (replay, experts_hit) in calls.items():
                    floor = experts_hit * 3 * D * F * 2 / bw * 1e6
                    us = {flush: timing.median_us(replay, flush) for flush in timing.FLUSHES}
                    row = {"shape": shape, "T": T, "what": what, "weights_floor_us": floor, "us": us}
                    if args.profile and what == "layer":
                        row["kernels_us"] = {}
                        for flush in ("write", "read"):
                            row["kernels_us"][flush] = layer.kernels(replay, flush=flush)
                            named = row["kernels_us"][flush].items()
                            print(
                                f"  {shape} T={T} {flush}: "
                                + ", ".join(f"{k.split('(')[0][:40]} {v:.1f}" for k, v in named)
                            )
                    cells = " | ".join(f"{us[f]:.1f}" for f in timing.FLUSHES)
                    print(f"| {shape} | {T} | {what} | {floor:.1f} | {cells} | {us['write'] - us['read']:.1f} |",
                          flush=True)  # fmt: skip
                    rows.append(row)
                    path = write_rows(args.out, "flush", rows, path, copy_Bps=bw)
            del calls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
