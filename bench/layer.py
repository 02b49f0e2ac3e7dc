"""One MoE layer on one GPU: HF experts (eager, grouped_mm, compiled), sort+_grouped_mm, moe_fx (triton, vendor),
and moe_fx's quantised Triton lowerings (fp8, fp8_block, int8, int4_weight).

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

The moe_fx variants are the ops the rewrite emits on one GPU (`moe_fx_layer`, `moe_fx_quant_layer`): with the
Triton lowerings one `routed_experts` node (route, dispatch and experts, which sums combine's rows), quantised
weights stored as the rewrite stores them. Every variant runs the same HF Mixtral-style block (router linear ->
softmax -> top-k -> renormalise -> SiLU-gated experts) on the same inputs and weights, so the routing is the same.
Times are medians of `timing.median_us` (the L2 emptied before each repetition, by default by a read: --flush) over
--rounds rounds, each round timing every variant once in an order rotated by one (a long run heats the GPU and
lowers its clocks: a variant timed always last would pay for it); rows with T <= 1024 are also timed as CUDA-graph
replays. The floor is max(bytes / copy bandwidth, flops / bf16 matmul rate), both ceilings measured in the same
run; bytes = weights of the experts hit + router weight + x in + out, flops = 6·T·K·D·F.
A quantised variant `moe_fx_<mode>` has its own floor: its quantised weights (one byte, or half a byte for
int4_weight, plus their fp32 scales) and the e4m3 matmul rate (`torch._scaled_mm`) measured here (int8 too:
H100's int8 and fp8 tensor-core peaks are equal, and `torch._int_mm`, also measured, reaches far less;
int4_weight takes the bf16 rate, its dots multiply bf16 operands); `speedup` is moe_fx_triton (bf16) time
over the quantised time, CUDA-graph times where both have one.

    python bench/layer.py [--shapes mixtral qwen3 ...] [--T 1 16 ...] [--variants ...] [--tune] [--rounds 3]
                          [--profile] --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from moe_fx.lowering import quant
from moe_fx.lowering.triton import timing, tuner, tuning
from moe_fx.ops import ROUTED_QUANT, combine_args, dispatch_args, experts_args, route_args, routed_args
from moe_fx.spec import ExpertsSpec, MoESpec, QuantSpec, RouterSpec

OPS = torch.ops.moe_fx
SHAPES = {  # E, K, D, F
    "mixtral": (8, 2, 4096, 14336),
    "qwen3": (128, 8, 2048, 768),
    "gptoss": (32, 4, 2880, 2880),
    "deepseek": (64, 8, 7168, 2048),
}
QUANT_VARIANTS = {
    "moe_fx_fp8": "fp8", "moe_fx_fp8_block": "fp8_block", "moe_fx_int8": "int8", "moe_fx_int4": "int4_weight",
}  # fmt: skip
# the matmul rate each quantised variant's floor divides its flops by: int4_weight (w4a16) multiplies bf16 operands
QUANT_RATE = {"fp8": "fp8", "fp8_block": "fp8", "int8": "fp8", "int4_weight": "bf16"}
# *_oss: moe_fx on the same weights in GPT-OSS's storage (interleaved gate/up, transposed); moe_fx_triton_linear:
# the router's linear by torch (cuBLAS), route on its logits; moe_fx_triton_combine: four ops, combine's sum in its
# own node (options={"fuse_combine": False}, as deterministic algorithms run it); none of them by default
OSS_VARIANTS = {"moe_fx_triton_oss": "triton", "moe_fx_vendor_oss": "grouped_mm"}
EXTRA_VARIANTS = (*OSS_VARIANTS, "moe_fx_triton_linear", "moe_fx_triton_combine")
VARIANTS = ("hf_eager", "hf_gmm", "hf_gmm_compiled", "sort_gmm", "moe_fx_triton", "moe_fx_vendor", *QUANT_VARIANTS)
GRAPHED = ("sort_gmm", "moe_fx_triton", "moe_fx_vendor", "hf_gmm_compiled", *QUANT_VARIANTS, *EXTRA_VARIANTS)


def ceilings() -> tuple[float, dict[str, float]]:
    """(copy bytes/s counting read + write, {"bf16" | "fp8" | "int8": matmul flop/s}), measured here."""
    a = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a)) * 1e-6
    bw = 2 * a.numel() * 2 / t

    n = 8192
    x, y = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    one = torch.ones((), device="cuda")
    x8, y8 = x.to(quant.FP8), y.to(quant.FP8).T  # _scaled_mm wants the second operand column-major
    xi, yi = x.to(torch.int8), y.to(torch.int8)
    mms = {
        "bf16": lambda: x @ y,
        "fp8": lambda: torch._scaled_mm(x8, y8, one, one, out_dtype=torch.bfloat16),
        "int8": lambda: torch._int_mm(xi, yi),
    }
    return bw, {k: 2 * n**3 / (bench(f) * 1e-6) for k, f in mms.items()}


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


def route(spec, x, gate, linear_outside=False):
    """moe_fx's route as the rewrite builds it on a GPU: Triton's route takes the router's linear (a GEMV at
    decode); `linear_outside`: torch's linear (cuBLAS) then route on its logits, as until 2026-12-05."""
    if linear_outside:
        return OPS.route(*route_args(spec.router, F.linear(x, gate), None, "triton"))
    return OPS.route(*route_args(spec.router, x, None, "triton", gate))


def moe_fx_layer(block, spec, impl, oss_storage=False, linear_outside=False, combine_node=False):
    """moe_fx's ops on the block's weights as the rewrite emits them on one GPU: with Triton's experts (which sums
    combine's rows itself, in its down GEMM's epilogue) one `routed_experts` node, run as the GEMV and one kernel
    that routes each pick where the tokens' tiles are fused (decode), as route, quantize_dispatch and experts
    elsewhere; with another experts lowering (the vendor's) route, quantize_dispatch, experts and combine.
    `oss_storage`: the same weights stored as GPT-OSS stores its own (gate/up interleaved, w13 [E, D, 2F] and w2
    [E, F, D], transposed): the layout's cost alone; `linear_outside`: the router's linear by torch (cuBLAS), then
    route on its logits, dispatch and experts; `combine_node`: the four ops (options={"fuse_combine": False})."""
    w13, w2, gate = block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight
    if oss_storage:
        E, H, D = w13.shape
        gate_EFD, up_EFD = w13.chunk(2, dim=1)
        w13 = torch.stack([gate_EFD, up_EFD], dim=2).reshape(E, H, D).transpose(1, 2).contiguous()
        w2 = w2.transpose(1, 2).contiguous()
        oss = dict(gate_up="interleaved", w13_transposed=True, w2_transposed=True)
        spec = spec.replace(experts=dataclasses.replace(spec.experts, **oss))
    reduce = impl == "triton" and not combine_node
    routed = reduce and not linear_outside

    def run(x):
        if routed:
            impls = {"route": "triton", "quantize_dispatch": "triton", "experts": impl}
            return OPS.routed_experts(*routed_args(spec, x, x, None, w13, None, w2, None, None, x.dtype, impls, gate))
        weights, ids = route(spec, x, gate, linear_outside)
        d = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, weights, "triton"))
        y = OPS.experts(*experts_args(spec, x, d, w13, None, w2, None, None, x.dtype, impl, reduce=reduce))
        return y if reduce else OPS.combine(*combine_args(spec, y, weights, d, "triton"))

    return run


def moe_fx_quant_layer(block, spec, mode, routed=None):
    """moe_fx with the Triton lowerings under quant `mode`, as the rewrite emits and stores it on one GPU: the
    weights quantised once, w2 in the rewrite's layout (`quant.stored_w2`: fp8 / int8 in column blocks); one
    `routed_experts` node where the mode quantises activations per token or not at all (`ops.ROUTED_QUANT`), else
    route, quantize_dispatch and experts summing the rows; `routed` overrides that choice (tests)."""
    w13, s13 = quant.quantize_weight(block.experts.gate_up_proj, mode)
    w2, s2 = quant.quantize_weight(block.experts.down_proj, mode)
    w2 = quant.stored_w2(w2, mode)
    spec, gate = spec.replace(quant=QuantSpec(mode)), block.gate.weight
    weight_bytes = sum(t.numel() * t.element_size() for t in (w13, s13, w2, s2))
    impls = {"route": "triton", "quantize_dispatch": "triton", "experts": "triton"}
    routed = mode in ROUTED_QUANT if routed is None else routed

    def run(x):
        if routed:
            return OPS.routed_experts(*routed_args(spec, x, x, None, w13, None, w2, None, None, x.dtype, impls, gate,
                                                   w13_scale=s13, w2_scale=s2))  # fmt: skip
        weights, ids = route(spec, x, gate)
        d = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, weights, "triton"))
        return OPS.experts(*experts_args(spec, x, d, w13, None, w2, None, None, x.dtype, "triton", s13, s2, True))

    return run, weight_bytes


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


FLUSH = "read"  # how the L2 is emptied before each repetition (`timing.empty_l2`; --flush)


def bench(fn) -> float:
    """Median microseconds of fn, the L2 emptied before each repetition (`timing.median_us`)."""
    return timing.median_us(fn, FLUSH)


def timed_in_rounds(fns: dict, rounds: int) -> dict[str, float]:
    """{name: median µs over `rounds` rounds}; each round times every fn once, starting one later than the
    round before, so no variant always runs on the hottest (most clock-throttled) GPU."""
    names = list(fns)
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(bench(fns[name]))
    return {name: statistics.median(us) for name, us in samples.items()}


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


def kernels(fn, calls: int = 3, top: int = 10, flush: str | None = None) -> dict[str, float]:
    """{GPU kernel or copy name: µs per call} of `fn` under torch.profiler (CUPTI), the `top` longest, each call
    after the L2 is emptied by `flush` (default: as `bench` empties it; the emptying's own kernels subtracted)."""
    flush = FLUSH if flush is None else flush

    def per_call(f):
        from torch.profiler import ProfilerActivity, profile

        f()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                f()
            torch.cuda.synchronize()
        return {e.key[:80]: e.device_time_total / calls for e in prof.key_averages() if e.device_time_total > 0}

    def flushed():
        timing.empty_l2(flush)
        fn()

    emptying = per_call(lambda: timing.empty_l2(flush))
    times = {k: us - emptying.get(k, 0.0) for k, us in per_call(flushed).items()}
    return dict(sorted(((k, us) for k, us in times.items() if us > 0.05), key=lambda kv: -kv[1])[:top])


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run_shape(name, Ts, variants, bw, rates, tune, rounds, profile=False):
    E, K, D, F_ = SHAPES[name]
    block = hf_block(E, K, D, F_)
    spec = MoESpec(ExpertsSpec(E, D, F_, dtype="bfloat16"), K, router=RouterSpec(K, renormalize=True))
    quantised = {v: moe_fx_quant_layer(block, spec, mode) for v, mode in QUANT_VARIANTS.items() if v in variants}
    if tune:
        for mode in ["none"] * ("moe_fx_triton" in variants) + [QUANT_VARIANTS[v] for v in quantised]:
            tuner.tune(E, D, F_, K, "silu_gated", torch.bfloat16, Ts, quant=mode)
    compiled = torch.compile(block, dynamic=True) if "hf_gmm_compiled" in variants else None
    fns = {
        "hf_eager": lambda x: _hf(block, x, "eager"),
        "hf_gmm": lambda x: _hf(block, x, "grouped_mm"),
        "hf_gmm_compiled": lambda x: compiled(x[None])[0],
        "sort_gmm": sort_gmm_layer(block, E, K),
        "moe_fx_triton": moe_fx_layer(block, spec, "triton"),
        "moe_fx_vendor": moe_fx_layer(block, spec, "grouped_mm"),
        **{v: moe_fx_layer(block, spec, impl, True) for v, impl in OSS_VARIANTS.items() if v in variants},
        "moe_fx_triton_linear": moe_fx_layer(block, spec, "triton", linear_outside=True),
        "moe_fx_triton_combine": moe_fx_layer(block, spec, "triton", combine_node=True),
        **{v: fn for v, (fn, _) in quantised.items()},
    }
    rows = []
    for T in Ts:
        torch.cuda.empty_cache()
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ids = F.linear(x, block.gate.weight).float().topk(K, dim=-1).indices
            hit = ids.unique().numel()
            nbytes = (hit * 3 * D * F_ + E * D + 2 * T * D) * 2
            flops = 6 * T * K * D * F_
            floor = max(nbytes / bw, flops / rates["bf16"]) * 1e6
            ref = fns["hf_gmm"](x)
            row = {"shape": name, "T": T, "floor_us": floor, "hit_experts": hit, "us": {}, "graph_us": {}, "err": {}}
            for v, (_, weight_bytes) in quantised.items():  # hit experts' share of the quantised weights
                qbytes = weight_bytes * hit / E + (E * D + 2 * T * D) * 2
                # H100 int8 tensor cores peak as fp8; torch._int_mm reaches far less here
                rate = rates[QUANT_RATE[QUANT_VARIANTS[v]]]
                row.setdefault("quant_floor_us", {})[v] = max(qbytes / bw, flops / rate) * 1e6
            eager, graphs = {}, {}
            for v in variants:
                try:
                    out = fns[v](x)
                    row["err"][v] = rel_err(out, ref)
                    eager[v] = lambda v=v, x=x: fns[v](x)
                    if T <= 1024 and v in GRAPHED:
                        graphs[v] = timing.graph_replay(eager[v])
                        row.setdefault("host_us", {})[v] = host_us(fns[v], x)
                except Exception as err:  # a peer that cannot run a shape is reported, not fatal
                    row["us"][v] = float("nan")
                    row.setdefault("failed", {})[v] = f"{type(err).__name__}: {err}"[:300]
            timed = timed_in_rounds({**eager, **{("graph", v): g for v, g in graphs.items()}}, rounds)
            for variant, us in timed.items():
                if isinstance(variant, tuple):
                    row["graph_us"][variant[1]] = us
                else:
                    row["us"][variant] = us
            if profile:  # the graph replay where there is one: the kernels without the host's gaps
                row["kernels_us"] = {v: kernels(graphs.get(v, fn)) for v, fn in eager.items()}
                for v, ks in row["kernels_us"].items():
                    print(
                        f"  {name} T={T} {v}: " + ", ".join(f"{k.split('(')[0][:40]} {us:.1f}" for k, us in ks.items())
                    )
        _speedups(row)
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


def _best_us(row, v):
    return row["graph_us"].get(v, row["us"].get(v, float("nan")))


def _speedups(row):
    """Each quantised variant's speedup over moe_fx bf16 (moe_fx_triton) and ratio to its own floor (graph times if
    any)."""
    for v, floor in row.get("quant_floor_us", {}).items():
        base = _best_us(row, "moe_fx_triton")
        if not math.isnan(base):  # the bf16 variant was timed
            row.setdefault("speedup_vs_bf16", {})[v] = base / _best_us(row, v)
        row.setdefault("ratio_to_quant_floor", {})[v] = _best_us(row, v) / floor


def _print_row(row, variants):
    cells = []
    for v in variants:
        us = row["us"].get(v, float("nan"))
        g = row["graph_us"].get(v)
        floor = row.get("quant_floor_us", {}).get(v, row["floor_us"])
        cell = f"{us:.0f}/{us / floor:.2f}" if not math.isnan(us) else "fail"
        cell += f" (g {g:.0f}/{g / floor:.2f})" if g else ""
        speedup = row.get("speedup_vs_bf16", {}).get(v)
        cells.append(cell + (f" {speedup:.2f}×" if speedup else ""))
    print(f"| {row['shape']} | {row['T']} | " + " | ".join(cells) + f" | {row['floor_us']:.0f} |", flush=True)


def main():
    global FLUSH
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[1, 16, 128, 1024, 8192])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    p.add_argument("--tune", action="store_true", help="tune the triton GEMMs per T-bucket first")
    p.add_argument("--rounds", type=int, default=3, help="time every variant once per round, in rotated order")
    p.add_argument("--profile", action="store_true", help="record each variant's GPU kernels (torch.profiler)")
    p.add_argument("--flush", choices=timing.FLUSHES, default=FLUSH, help="how the L2 is emptied (timing.empty_l2)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    FLUSH = args.flush
    torch.manual_seed(0)
    bw, rates = ceilings()
    mm = ", ".join(f"{k} matmul {r / 1e12:.0f} TFLOP/s" for k, r in rates.items())
    print(f"copy {bw / 1e12:.2f} TB/s, {mm}; µs/ratio to floor (quantised: to its own floor); (g = CUDA graph); ")
    print("n× = speedup of a quantised variant over moe_fx_triton (bf16)")
    print("| shape | T | " + " | ".join(args.variants) + " | floor |")
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in args.shapes:
        rows += run_shape(name, args.T, args.variants, bw, rates, args.tune, args.rounds, args.profile)
        _write(out, stamp, args, bw, rates, rows)


def _write(out, stamp, args, bw, rates, rows):
    meta = {
        "device": torch.cuda.get_device_name(), "date": f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}",
        "torch": torch.__version__, "triton": triton.__version__, "copy_Bps": bw, "matmul_flops": rates["bf16"],
        "matmul_flops_by_dtype": rates,
        "variants": args.variants, "moe_fx_variants": "rewrite", "tuned": args.tune, "rounds": args.rounds,
        "l2_flush": args.flush,
        "tuning_cache": str(tuning.cache_path()) if args.tune else None, "host": platform.node(),
        "cuda_graph_note": "graph_us: one call captured, replays timed (T <= 1024)",
    }  # fmt: skip
    (out / f"layer-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out / f'layer-{stamp}.json'}", os.environ.get("MOE_FX_TUNING_CACHE", ""))


if __name__ == "__main__":
    main()
