"""Shared expert overlapped with the ep_alltoall exchange: one MoE layer with a shared expert, rewritten by
`moe_fx.apply` with `overlap_shared` on and off, against its parts timed alone.

Legend: T tokens per rank, D model dim, F ffn dim (routed and shared experts), E experts, K top-k, W ranks.

    python bench/overlap.py --cpu [--T 256 1024] [--json out.json]        # gloo, 2 spawned CPU ranks
    torchrun --nproc-per-node 2 bench/overlap.py [--T 128 4096] [--json]  # NCCL, bf16

Columns (µs, medians over repetitions each started after a barrier, slowest rank): `off` the layer with the
shared expert after the block, `on` with it moved between dispatch and experts, `shared` the shared expert
alone, `exchange` the layer's dispatch + combine alone (through `bench/ep.py`'s timing of the ops).
`saved` = off - on; the most overlap can save is min(shared, exchange), the `ideal` column.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moe_fx  # noqa: E402
from moe_fx import examples as ex  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ep import timed  # noqa: E402


def layer(E: int, K: int, D: int, F: int, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return ex.NaiveMoE(num_experts=E, k=K, dim=D, ffn=F, shared=True).eval().to(device, dtype)


def exchange_us(model: torch.nn.Module, x: torch.Tensor, device, reps: int) -> float:
    """dispatch + combine of the rewritten layer alone: their lowerings rerun on the arguments one call of
    the layer gave them (recorded in `moe_fx.ops._run`), the exchange waited for."""
    from moe_fx import ops
    from moe_fx.lowering import registry
    from moe_fx.lowering.distributed import exchanges

    calls, run = {}, ops._run
    ops._run = lambda op, impl, **kw: (calls.setdefault(op, (impl, kw)), run(op, impl, **kw))[1]
    try:
        with torch.no_grad():
            model(x)
    finally:
        ops._run = run
    (d_impl, d_kw), (c_impl, c_kw) = calls["quantize_dispatch"], calls["combine"]

    def both():
        registry.lookup("quantize_dispatch", d_impl).fn(**d_kw)
        exchanges.finish_exchanges()
        registry.lookup("combine", c_impl).fn(**c_kw)

    return timed(both, device, dist.group.WORLD, reps)[0] * 1e6


def measure(T: int, device, dtype, reps: int, shape=(16, 2, 1024, 1024)) -> dict:
    E, K, D, F = shape
    rank = dist.get_rank()
    base = layer(E, K, D, F, device, dtype)
    torch.manual_seed(1 + rank)
    x = torch.randn(T, D, device=device, dtype=dtype)
    row = {"T": T, "E": E, "K": K, "D": D, "F": F}
    models = {}
    for overlap in (False, True):
        model = copy.deepcopy(base)
        moe_fx.apply(model, x, options={"layout": "ep_alltoall", "overlap_shared": overlap})
        models[overlap] = model
    with torch.no_grad():
        for overlap, model in models.items():
            row["on_us" if overlap else "off_us"] = timed(lambda m=model: m(x), device, dist.group.WORLD, reps)[0] * 1e6
        row["shared_us"] = timed(lambda: base.shared_expert(x), device, dist.group.WORLD, reps)[0] * 1e6
    row["exchange_us"] = exchange_us(models[False], x, device, reps)
    row["saved_us"] = row["off_us"] - row["on_us"]
    row["ideal_us"] = min(row["shared_us"], row["exchange_us"])
    return row


def report(rows: list[dict], meta: dict, path: str | None) -> None:
    if dist.get_rank() != 0:
        return
    print(f"{meta['world']}x {meta['device']} ({meta['backend']}), {meta['dtype']}; µs per layer call")
    print("| T | E K D F | off | on | saved | shared | exchange | ideal |\n|---|---|---|---|---|---|---|---|")
    cols = ("off_us", "on_us", "saved_us", "shared_us", "exchange_us", "ideal_us")
    for r in rows:
        cells = " | ".join(f"{r[c]:.0f}" for c in cols)
        print(f"| {r['T']} | {r['E']} {r['K']} {r['D']} {r['F']} | {cells} |")
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {path}")


def _cpu_rank(rank: int, world: int, init_file: str, Ts: list[int], reps: int, path: str | None) -> None:
    torch.set_num_threads(1)  # two ranks on a small CPU: one compute thread each, gloo's own beside it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = [measure(T, torch.device("cpu"), torch.float32, reps) for T in Ts]
        meta = {"device": "CPU", "backend": "gloo", "world": world, "dtype": "float32", "torch": torch.__version__}
        report(rows, meta, path)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="gloo on 2 spawned CPU ranks (fp32)")
    p.add_argument("--T", type=int, nargs="+", default=None)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.cpu:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_cpu_rank, args=(2, os.path.join(tmp, "rdzv"), args.T or [256, 1024], args.reps, args.json),
                     nprocs=2)  # fmt: skip
        return
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the lent machines
    dist.init_process_group("nccl")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    torch.cuda.set_device(device)
    try:
        rows = [measure(T, device, torch.bfloat16, args.reps, (64, 8, 7168, 2048)) for T in args.T or [128, 4096]]
        meta = {"device": torch.cuda.get_device_name(device), "backend": "nccl", "world": dist.get_world_size(),
                "dtype": "bfloat16", "torch": torch.__version__}  # fmt: skip
        report(rows, meta, args.json)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
