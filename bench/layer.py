"""One MoE layer on one GPU: HF experts (eager, grouped_mm, compiled), sort+_grouped_mm, moe_fx (triton, vendor).

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

Every variant runs the same HF Mixtral-style block (router linear -> softmax -> top-k -> renormalise
-> SiLU-gated experts) on the same inputs and weights, so the routing is the same. Times are medians of
`triton.testing.do_bench` (L2 flushed before each repetition); decode rows (T <= 16) are also timed as
CUDA-graph replays. The floor is max(bytes / copy bandwidth, flops / bf16 matmul rate), both ceilings
measured in the same run; bytes = weights of the experts hit + router weight + x in + out, flops = 6·T·K·D·F.

    python bench/layer.py [--shapes mixtral qwen3 ...] [--T 1 16 ...] [--variants ...] [--tune] --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from moe_fx.lowering.triton import tuning
from moe_fx.ops import combine_args, dispatch_args, experts_args, route_args
from moe_fx.spec import ExpertsSpec, MoESpec, RouterSpec

OPS = torch.ops.moe_fx
SHAPES = {  # E, K, D, F
    "mixtral": (8, 2, 4096, 14336),
    "qwen3": (128, 8, 2048, 768),
    "gptoss": (32, 4, 2880, 2880),
    "deepseek": (64, 8, 7168, 2048),
}
VARIANTS = ("hf_eager", "hf_gmm", "hf_gmm_compiled", "sort_gmm", "moe_fx_triton", "moe_fx_vendor")


def ceilings() -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul flop/s), measured here."""
    a = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3
    bw = 2 * a.numel() * 2 / t
    n = 8192
    x, y = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = triton.testing.do_bench(lambda: x @ y, return_mode="median") * 1e-3
    return bw, 2 * n**3 / t


def hf_block(E, K, D, F_):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=K)
    config._experts_implementation = "grouped_mm"
    with torch.device("cuda"):
        block = MixtralSparseMoeBlock(config).to(torch.bfloat16).eval()
    torch.nn.init.normal_(block.gate.weight, std=D**-0.5)
    torch.nn.init.normal_(block.experts.gate_up_proj, std=D**-0.5)
    torch.nn.init.normal_(block.experts.down_proj, std=F_**-0.5)
    return block


def moe_fx_layer(block, spec, impl):
    w13, w2, gate = block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight

    def run(x):
        logits = F.linear(x, gate)
        weights, ids = OPS.route(*route_args(spec.router, logits, None, "triton"))
        d = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, weights, "triton"))
        y = OPS.experts(*experts_args(spec, d, w13, None, w2, None, None, x.dtype, impl))
        return OPS.combine(*combine_args(spec, y, weights, d, "triton"))

    return run


def sort_gmm_layer(block, E, K):
    w13, w2, gate = block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight

    def run(x):
        T = x.shape[0]
        w, ids = F.linear(x, gate).float().softmax(-1).topk(K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.view(-1)
        order = flat.argsort(stable=True)
        offs = torch.histc(flat.float(), bins=E, min=0, max=E - 1).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x[order // K], w13.transpose(1, 2), offs=offs)
        gate_h, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate_h) * up, w2.transpose(1, 2), offs=offs)
        y = y * w.view(-1)[order, None].to(y.dtype)
        out = torch.empty_like(y)
        out[order] = y
        return out.view(T, K, -1).sum(1)

    return run


def bench(fn, graph: bool) -> float:
    """Median microseconds; `graph` captures one call and times its replays."""
    if not graph:
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median") * 1e3


def host_us(fn, x, n=50) -> float:
    """Microseconds of host time to enqueue one call (what CUDA graphs remove)."""
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn(x)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run_shape(name, Ts, variants, bw, flops_rate, tune):
    E, K, D, F_ = SHAPES[name]
    block = hf_block(E, K, D, F_)
    spec = MoESpec(ExpertsSpec(E, D, F_, dtype="bfloat16"), K, router=RouterSpec(K, renormalize=True))
    if tune:
        tuning.tune(E, D, F_, K, "silu_gated", torch.bfloat16, Ts)
    compiled = torch.compile(block, dynamic=True) if "hf_gmm_compiled" in variants else None
    fns = {
        "hf_eager": lambda x: _hf(block, x, "eager"),
        "hf_gmm": lambda x: _hf(block, x, "grouped_mm"),
        "hf_gmm_compiled": lambda x: compiled(x[None])[0],
        "sort_gmm": sort_gmm_layer(block, E, K),
        "moe_fx_triton": moe_fx_layer(block, spec, "triton"),
        "moe_fx_vendor": moe_fx_layer(block, spec, "grouped_mm"),
    }
    rows = []
    for T in Ts:
        torch.cuda.empty_cache()
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ids = F.linear(x, block.gate.weight).float().topk(K, dim=-1).indices
            hit = ids.unique().numel()
            nbytes = (hit * 3 * D * F_ + E * D + 2 * T * D) * 2
            floor = max(nbytes / bw, 6 * T * K * D * F_ / flops_rate) * 1e6
            ref = fns["hf_gmm"](x)
            row = {"shape": name, "T": T, "floor_us": floor, "hit_experts": hit, "us": {}, "graph_us": {}, "err": {}}
            for v in variants:
                try:
                    out = fns[v](x)
                    row["err"][v] = rel_err(out, ref)
                    row["us"][v] = bench(lambda v=v, x=x: fns[v](x), graph=False)
                    if T <= 16 and v in ("sort_gmm", "moe_fx_triton", "moe_fx_vendor", "hf_gmm_compiled"):
                        row["graph_us"][v] = bench(lambda v=v, x=x: fns[v](x), graph=True)
                        row.setdefault("host_us", {})[v] = host_us(fns[v], x)
                except Exception as err:  # a peer that cannot run a shape is reported, not fatal
                    row["us"][v] = float("nan")
                    row.setdefault("failed", {})[v] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        _print_row(row, variants)
    torch.cuda.empty_cache()
    return rows


def _hf(block, x, impl):
    block.experts.config._experts_implementation = impl
    try:
        return block(x[None])[0]
    finally:
        block.experts.config._experts_implementation = "grouped_mm"


def _print_row(row, variants):
    cells = []
    for v in variants:
        us = row["us"].get(v, float("nan"))
        g = row["graph_us"].get(v)
        cell = f"{us:.0f}/{us / row['floor_us']:.2f}" if not math.isnan(us) else "fail"
        cells.append(cell + (f" (g {g:.0f}/{g / row['floor_us']:.2f})" if g else ""))
    print(f"| {row['shape']} | {row['T']} | " + " | ".join(cells) + f" | {row['floor_us']:.0f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[1, 16, 128, 1024, 8192])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--tune", action="store_true", help="tune the triton GEMMs per T-bucket first")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.manual_seed(0)
    bw, rate = ceilings()
    print(f"copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; µs/ratio to floor; (g = CUDA graph)")
    print("| shape | T | " + " | ".join(args.variants) + " | floor |")
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in args.shapes:
        rows += run_shape(name, args.T, args.variants, bw, rate, args.tune)
        _write(out, stamp, args, bw, rate, rows)


def _write(out, stamp, args, bw, rate, rows):
    meta = {
        "device": torch.cuda.get_device_name(), "date": f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}",
        "torch": torch.__version__, "triton": triton.__version__, "copy_Bps": bw, "matmul_flops": rate,
        "variants": args.variants, "tuned": args.tune,
        "tuning_cache": str(tuning.cache_path()) if args.tune else None, "host": platform.node(),
        "cuda_graph_note": "graph_us: one call captured, replays timed (T <= 16)",
    }  # fmt: skip
    (out / f"layer-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out / f'layer-{stamp}.json'}", os.environ.get("MOE_FX_TUNING_CACHE", ""))


if __name__ == "__main__":
    main()
