"""Fused decode configs' w2 column blocks (`tuning.FUSED_BLOCK_D`): the routed decode step per block width, timed.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

A fused config runs the down GEMM in the up tile's epilogue: each program multiplies its F-slice of h by w2's
F-slice in column blocks of down.block_n, a few blocks in flight at a time. At decode that, not the weight bytes,
bounds a program's stream, so one-byte weights want wider blocks than two-byte ones (bench/NOTES.md,
2026-12-07). For each shape, quant mode and up tile, the layer's routed step up to combine
(`tuner.experts_call(routed=True)`, as `tuner.tune` times it) runs each width; every config is first checked
against the reference lowering (`tuner.agreement`, outputs poisoned) and is timed only if it agrees, as
CUDA-graph replays in rotated rounds (`tuner.confirm`), beside the shipped entry. A table and JSON.

    python bench/fused_widths.py --out OUT [--shapes qwen3 gptoss] [--quant none fp8] [--T 1]
        [--widths 128 256 512 1024] [--warps 4 8] [--up 16x64x256s3 ...]
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import experts_op, write_rows  # noqa: E402
from layer import SHAPES  # noqa: E402

from moe_fx.lowering.triton import tuner, tuning  # noqa: E402

DTYPE = torch.bfloat16


def fused_configs(ups: list[tuning.GemmConfig], widths: list[int], warps: list[int]) -> dict[str, tuning.ExpertsConfig]:
    """{name: fused config} of each up tile of `ups` at each warp count, with w2's column blocks of each width."""
    return {
        f"up {u.block_m}x{u.block_n}x{u.block_k} s{u.num_stages} w{w} | down {width}": tuning.ExpertsConfig(
            replace(u, num_warps=w), tuning.GemmConfig(16, width, 128), fused=True
        )  # fmt: skip
        for u in ups
        for w in warps
        for width in widths
    }


def swapped_tile(text: str) -> tuning.GemmConfig:
    """A decode up tile with swapped operands from "MxNxKsS" (e.g. 16x64x256s3: S pipeline stages)."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)s(\d+)", text)
    if m is None:
        raise ValueError(f"moe_fx: an up tile is MxNxKsS, e.g. 16x64x256s3; got {text!r}")
    M, N, K, S = map(int, m.groups())
    return tuning.GemmConfig(M, N, K, 8, 4, S, swap_ab=True)


def up_tile(E: int, D: int, F: int, K: int, T: int, quant: str, device) -> tuning.GemmConfig:
    """The up tile the widths are tried with: the shipped entry's where it is fused, else a decode tile (one-byte
    operands twice as deep)."""
    shipped = tuning.choose(E, D, F, K, True, DTYPE, device, T * K, quant)
    return shipped.up if shipped.fused else tuning.GemmConfig(16, 64, 128 if quant == "none" else 256, 8, 4, 4)


def agreeing(run, configs: dict, quant: str, dtype: torch.dtype = DTYPE) -> tuple[dict, dict]:
    """({name: config} of the configs whose routed step agrees with the reference lowering, {name: why not} of
    the others: a row's rel err past `tuner.agreement_bound`, or the error that stopped it (shared memory)."""
    ref, bound = run.reference(), tuner.agreement_bound(dtype, quant)
    why = {name: tuner.disagreement(run, config, ref, bound) for name, config in configs.items()}
    return {n: configs[n] for n, w in why.items() if w is None}, {n: w.why for n, w in why.items() if w is not None}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen3", "gptoss"], choices=list(SHAPES))
    p.add_argument("--quant", nargs="+", default=["none", "fp8"], choices=list(tuning.FUSED_BLOCK_D))
    p.add_argument("--T", nargs="+", type=int, default=[1])
    p.add_argument("--widths", nargs="+", type=int, default=[128, 256, 512, 1024])
    p.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    more = "more up tiles (swapped operands), e.g. 16x64x256s3: narrower F-slices, more programs"
    p.add_argument("--up", nargs="*", default=[], metavar="MxNxKsS", help=more)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    device, rows, path = torch.device("cuda"), [], None
    print("| shape | quant | T | config | µs | over the fastest |")
    for shape in args.shapes:
        E, K, D, F = SHAPES[shape]
        for quant in args.quant:
            for T in args.T:
                run = experts_op(shape, T, quant, device, DTYPE, reduce=True, routed=tuning.routes(T, quant, True))
                ups = [up_tile(E, D, F, K, T, quant, device), *map(swapped_tile, args.up)]
                configs = {"shipped": tuning.choose(E, D, F, K, True, DTYPE, device, T * K, quant)}
                configs.update(fused_configs(ups, args.widths, args.warps))
                ok, failed = agreeing(run, configs, quant)
                _, us = tuner.confirm(list(dict.fromkeys(ok.values())), functools.partial(tuner.time_config, run))
                timed = {name: us[config] for name, config in ok.items()}
                fastest = min(timed.values())
                for name, t in sorted(timed.items(), key=lambda kv: kv[1]):
                    print(f"| {shape} | {quant} | {T} | {name}: {tuning.describe(ok[name])} | {t:.1f} | "
                          f"{t / fastest:.2f} |", flush=True)  # fmt: skip
                for name, why in failed.items():
                    print(f"| {shape} | {quant} | {T} | {name} | {why} | |")
                rows.append({"shape": shape, "quant": quant, "T": T, "shipped": tuning.describe(configs["shipped"]),
                             "us": timed, "failed": failed})  # fmt: skip
                path = write_rows(args.out, "fused-widths", rows, path)


if __name__ == "__main__":
    main()
