"""Parallel layouts on 2 GPUs (NCCL): dispatch + combine time, bytes on the wire, bandwidth against a
plain all-to-all of the same bytes, and the whole layer, per layout, shape and tokens per rank.

Legend: T tokens per rank, D model dim, F expert ffn dim, E experts, K top-k, W ranks.

    torchrun --nproc-per-node 2 bench/ep.py [--json ep.json] [--quant none,fp8]   # NCCL, bf16, real shapes
    python bench/ep.py --cpu-smoke                                    # gloo, 2 spawned CPU ranks, tiny
                                                                      # shapes: exercises the logic only

Each layer: random router logits -> route -> quantize_dispatch -> experts -> combine, through the
moe_fx ops and the lowerings the registry picks for the device. Times are medians over repetitions,
each started after a barrier; a row reports the slowest rank. "bytes" is what this rank sends to
other ranks in dispatch + combine (its own chunk excluded), from the real split sizes; "vs a2a" is
dispatch+combine time over the time of one plain all_to_all_single moving the same bytes.
`ep_alltoall_padded` is ep_alltoall with max_tokens_per_rank = T (fixed-size exchanges, no host sync); its
layer is also timed replayed as a CUDA graph ("g"). Under
--quant fp8 / fp8_block / int8 the expert-parallel rows travel as 1-byte values plus float32 scales.
Target (issue 6): dispatch+combine within 1.2x of the plain all-to-all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_fx.lowering import registry  # noqa: E402
from moe_fx.lowering.distributed import exchanges, plan_shard  # noqa: E402
from moe_fx.lowering.distributed.placement import shard_weights  # noqa: E402
from moe_fx.lowering.quant import ACTIVATION_QUANTISED, BLOCK, quantize_weight  # noqa: E402
from moe_fx.ops import combine_args, dispatch_args, experts_args, route_args  # noqa: E402
from moe_fx.spec import ExpertsSpec, MoESpec, QuantSpec, RouterSpec  # noqa: E402

OPS = torch.ops.moe_fx
PADDED = "ep_alltoall_padded"  # ep_alltoall with max_tokens_per_rank = T: fixed-size exchanges, no host sync
LAYOUTS = ("ep_alltoall", PADDED, "ep_allgather", "tp")


@dataclass(frozen=True)
class Shape:
    E: int
    K: int
    D: int
    F: int


SHAPES = {
    "qwen3-30b-a3b": Shape(E=128, K=8, D=2048, F=768),
    "deepseek-v3-like": Shape(E=64, K=8, D=7168, F=2048),  # as in notes/perf-anchors.md
}
TOKENS = (1, 128, 4096)
SMOKE_SHAPES = {"tiny": Shape(E=8, K=2, D=32, F=16)}
SMOKE_TOKENS = (1, 5)
SMOKE_QUANTS = ("none", "fp8_block")


def row_bytes(s: Shape, elt: int, quant: str) -> int:
    """Bytes of one dispatched row: D values (1 byte each under fp8 / fp8_block / int8, else `elt`) and its
    float32 scales (one per token, or one per 128-group under fp8_block)."""
    if quant not in ACTIVATION_QUANTISED:
        return s.D * elt
    return s.D + 4 * (-(-s.D // BLOCK) if quant == "fp8_block" else 1)


def wire_bytes(layout: str, handle: list[int], W: int, rank: int, T: int, s: Shape, elt: int,
               quant: str = "none") -> int:  # fmt: skip
    """Bytes this rank sends to other ranks in dispatch + combine, from the dispatch handle's sizes.
    Rows travel quantised under an activation-quantised `quant` (see `row_bytes`); results come back in `elt`."""
    row = row_bytes(s, elt, quant)
    if layout == PADDED:  # counts all-gather; T*K rows (+ fp32 weight and slot) to each peer and back
        return (W - 1) * (s.E * 8 + T * s.K * (row + 8 + s.D * elt))
    if layout == "ep_alltoall":  # counts all-gather; rows (+ fp32 weight) out; rows back
        send, recv = handle[:W], handle[W : 2 * W]
        out_rows = sum(n for r, n in enumerate(send) if r != rank)
        back_rows = sum(n for r, n in enumerate(recv) if r != rank)
        return (W - 1) * s.E * 8 + out_rows * (row + 4) + back_rows * s.D * elt
    if layout == "ep_allgather":  # T and rows per expert; padded tokens + routing; fp32 reduce-scatter (ring)
        t_max = max(handle[:W])
        return (W - 1) * (8 * (s.E + 1) + t_max * (row + 2 * s.K * 4) + t_max * s.D * 4)
    return 2 * (W - 1) * T * s.D * 4 // W  # tp: fp32 ring all-reduce


class Layer:
    """One MoE layer of `shape` under `layout`: this rank's weight shard and the lowerings chosen."""

    def __init__(self, shape: Shape, layout: str, group, device: torch.device, dtype: torch.dtype,
                 quant: str = "none"):  # fmt: skip
        s = shape
        self.shape, self.layout, self.dtype, self.quant = s, layout, dtype, quant
        self.spec = MoESpec(
            ExpertsSpec(s.E, s.D, s.F, dtype=str(dtype).removeprefix("torch.")),
            s.K,
            RouterSpec(s.K, renormalize=True),
            QuantSpec(quant),
            layout="ep_alltoall" if layout == PADDED else layout,
            max_tokens_per_rank=1 if layout == PADDED else 0,  # set per T by `bound`
        )
        self.shard = plan_shard(self.spec, group, None, device.type)
        torch.manual_seed(0)  # the same full weights on every rank, then each keeps its shard
        full = {
            "w13": torch.randn(s.E, 2 * s.F, s.D, device=device, dtype=dtype) / s.D**0.5,
            "w2": torch.randn(s.E, s.D, s.F, device=device, dtype=dtype) / s.F**0.5,
        }
        local = shard_weights(self.shard, self.spec.replace(quant=QuantSpec()), full)
        self.w13, self.w2 = local["w13"].contiguous(), local["w2"].contiguous()
        self.w13_scale = self.w2_scale = None
        if quant != "none":  # expert parallel only (tp refuses quant): the local experts, quantised
            self.w13, self.w13_scale = quantize_weight(self.w13, quant)
            self.w2, self.w2_scale = quantize_weight(self.w2, quant)
        del full
        self.expert_map = self.shard.expert_map(device)
        self.num_local = self.shard.num_local_experts(s.E)
        self.impl = {op: registry.select(op, device.type, self.spec).chosen.name for op in registry.OPS}

    def bound(self, T: int) -> None:
        """The padded layout's max_tokens_per_rank: T (every rank sends T tokens here)."""
        if self.layout == PADDED:
            self.spec = self.spec.replace(max_tokens_per_rank=max(T, 1))

    def route(self, logits_TE):
        return OPS.route(*route_args(self.spec.router, logits_TE, None, self.impl["route"]))

    def dispatch(self, x_TD, weights_TK, ids_TK):
        args = dispatch_args(self.spec, x_TD, ids_TK, weights_TK, self.impl["quantize_dispatch"],
                             self.shard.group_name, self.expert_map, self.num_local)  # fmt: skip
        dispatched = OPS.quantize_dispatch(*args)
        exchanges.finish_exchanges()  # ep_alltoall returns once its exchange has started: time it landing
        return dispatched

    def experts(self, x_TD, dispatched):
        impl = self.impl["experts"]
        args = experts_args(self.spec, x_TD, dispatched, self.w13, None, self.w2, None, None, self.dtype, impl,
                            self.w13_scale, self.w2_scale)  # fmt: skip
        return OPS.experts(*args)

    def combine(self, y, weights_TK, dispatched):
        return OPS.combine(*combine_args(self.spec, y, weights_TK, dispatched, self.impl["combine"],
                                         self.shard.group_name))  # fmt: skip


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn, device: torch.device, group, reps: int) -> tuple[float, object]:
    """Median seconds of fn() over `reps` runs, each after a barrier, slowest rank; and the last result."""
    times, result = [], None
    for _ in range(reps):
        dist.barrier(group=group)
        start = _now(device)
        result = fn()
        times.append(_now(device) - start)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item(), result


def plain_all_to_all_s(nbytes: int, W: int, device: torch.device, group, reps: int) -> float:
    """Time of one all_to_all_single sending `nbytes` to the other ranks (and its own chunk to itself)."""
    chunk = max(1, nbytes // max(1, W - 1))
    send = torch.empty(chunk * W, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    return timed(lambda: dist.all_to_all_single(recv, send, group=group), device, group, reps)[0]


def bench_layer(layer: Layer, T: int, device: torch.device, group, reps: int) -> dict:
    s, W, rank = layer.shape, dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator(device=device).manual_seed(1 + (0 if layer.layout == "tp" else rank))
    x_TD = torch.randn(T, s.D, device=device, dtype=layer.dtype, generator=gen)  # tp: the same tokens everywhere
    logits_TE = torch.randn(T, s.E, device=device, generator=gen)
    weights_TK, ids_TK = layer.route(logits_TE)
    dispatch_s, dispatched = timed(lambda: layer.dispatch(x_TD, weights_TK, ids_TK), device, group, reps)
    y = layer.experts(x_TD, dispatched)
    combine_s, _ = timed(lambda: layer.combine(y, weights_TK, dispatched), device, group, reps)

    def whole():
        w, ids = layer.route(logits_TE)
        d = layer.dispatch(x_TD, w, ids)
        return layer.combine(layer.experts(x_TD, d), w, d)

    layer_s, _ = timed(whole, device, group, reps)
    graph_s = None
    if layer.layout == PADDED and device.type == "cuda":  # no host sync: the whole layer replays as a graph
        whole()
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            whole()
        graph_s, _ = timed(graph.replay, device, group, reps)
    elt = torch.empty((), dtype=layer.dtype).element_size()
    handle = [] if layer.layout == PADDED else dispatched[6][: 2 * W].tolist()
    nbytes = wire_bytes(layer.layout, handle, W, rank, T, s, elt, layer.quant)
    nbytes_t = torch.tensor([nbytes], dtype=torch.float64, device=device)
    dist.all_reduce(nbytes_t, op=dist.ReduceOp.MAX, group=group)
    nbytes = int(nbytes_t.item())
    a2a_s = plain_all_to_all_s(nbytes, W, device, group, reps)
    comm_s = dispatch_s + combine_s
    return {
        "layout": layer.layout,
        "quant": layer.quant,
        "T": T,
        "dispatch_us": dispatch_s * 1e6,
        "combine_us": combine_s * 1e6,
        "dispatch_combine_us": comm_s * 1e6,
        "bytes": nbytes,
        "GBps": nbytes / comm_s / 1e9,
        "plain_a2a_us": a2a_s * 1e6,
        "plain_a2a_GBps": nbytes / a2a_s / 1e9,
        "vs_a2a": comm_s / a2a_s,
        "layer_us": layer_s * 1e6,
        "layer_graph_us": None if graph_s is None else graph_s * 1e6,
        "impl": layer.impl,
    }


def table(rows: list[dict]) -> str:
    head = ["shape", "layout", "quant", "T", "disp+comb µs", "bytes", "GB/s", "a2a µs", "a2a GB/s", "vs a2a",
            "layer µs"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        us = [f"{r[k]:.0f}" for k in ("dispatch_combine_us", "plain_a2a_us", "layer_us")]
        if r.get("layer_graph_us") is not None:
            us[2] += f" (g {r['layer_graph_us']:.0f})"
        rates = [f"{r[k]:.2f}" for k in ("GBps", "plain_a2a_GBps", "vs_a2a")]
        cells = [r["shape"], r["layout"], r.get("quant", "none"), r["T"], us[0], r["bytes"], rates[0], us[1], rates[1],
                 rates[2], us[2]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def run(shapes: dict[str, Shape], tokens, device: torch.device, dtype: torch.dtype, reps: int,
        quants: tuple[str, ...] = ("none",)) -> list[dict]:  # fmt: skip
    """Rows per shape, layout, quant mode (expert-parallel layouts only; tp refuses quant) and T."""
    group = dist.group.WORLD
    rows = []
    for name, shape in shapes.items():
        for layout in LAYOUTS:
            for quant in quants if layout != "tp" else ("none",):
                layer = Layer(shape, layout, group, device, dtype, quant)
                for T in tokens:
                    layer.bound(T)
                    with torch.no_grad():
                        rows.append({"shape": name, **asdict(shape), **bench_layer(layer, T, device, group, reps)})
                del layer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def report(rows: list[dict], path: str | None, meta: dict) -> None:
    if dist.get_rank() != 0:
        return
    print(table(rows))
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {path}")


def _smoke_rank(rank: int, world: int, init_file: str, path: str | None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = run(SMOKE_SHAPES, SMOKE_TOKENS, torch.device("cpu"), torch.float32, reps=2, quants=SMOKE_QUANTS)
        report(rows, path, {"device": "cpu", "backend": "gloo", "world": world, "smoke": True})
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the rows here (rank 0)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true", help="gloo on 2 spawned CPU ranks, tiny shapes")
    p.add_argument("--quant", default="none", help="comma-separated quant modes for the expert-parallel layouts "
                   "(rows travel quantised); e.g. none,fp8")  # fmt: skip
    args = p.parse_args(argv)
    if args.cpu_smoke:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_smoke_rank, args=(2, os.path.join(tmp, "rendezvous"), args.json), nprocs=2)
        return
    if not torch.cuda.is_available():
        raise SystemExit("moe_fx: bench/ep.py needs CUDA GPUs (run it with torchrun), or pass --cpu-smoke")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the lent machines
    dist.init_process_group("nccl")
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    try:
        rows = run(SHAPES, TOKENS, device, torch.bfloat16, args.reps, tuple(args.quant.split(",")))
        meta = {"device": torch.cuda.get_device_name(device), "backend": "nccl", "world": dist.get_world_size(),
                "torch": torch.__version__, "dtype": "bfloat16", "reps": args.reps}  # fmt: skip
        report(rows, args.json, meta)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
