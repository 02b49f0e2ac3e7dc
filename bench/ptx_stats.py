"""The experts' GEMM kernels compiled for a GPU target on any machine (no GPU needed): PTX instruction counts.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

`grouped_gemm.experts` runs with its launches captured instead of made; each captured kernel is compiled by
Triton for the target (sm90 by default) and its PTX summarised: MMA instructions (`wgmma` or `mma.sync`),
conversions, shared-memory traffic, the most frequent instructions. What a config compiles to, read before
spending GPU time on it (e.g. whether a decode tile reaches wgmma, whether an unpacked int4 tile goes through
shared memory).

    python bench/ptx_stats.py --quant int4_weight --swap --tile 16 64 128 4 4 [--arch 90] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe_fx.lowering import quant
from moe_fx.lowering.triton import grouped_gemm, tuning

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8", torch.int8: "i8",
         torch.int64: "i64", torch.int32: "i32", torch.float8_e4m3fn: "fp8e4nv"}  # fmt: skip
WATCH = {"wgmma": r"wgmma\.mma_async", "mma.sync": r"mma\.sync", "int->float cvt": r"cvt\.rn\.f(?:16|32)\.s",
         "->bf16 cvt": r"cvt\.rn\.bf16", "st.shared": r"st\.shared", "ld.shared": r"ld\.shared",
         "ldmatrix": r"ldmatrix", "cp.async": r"cp\.async\.(?:ca|cg)"}  # fmt: skip


def _type(a) -> str:
    if isinstance(a, torch.Tensor):
        return "*" + TYPES[a.dtype]
    return {bool: "i1", int: "i32", float: "fp32"}[type(a)]


def launches(quant_mode: str, config: tuning.ExpertsConfig, E=8, D=256, F=128, T=4, K=2, dtype=torch.bfloat16):
    """[(kernel, args, meta)] that one experts call on CPU tensors of this shape launches with `config`."""
    w13, w2 = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    scales = {}
    if quant_mode != "none":
        (w13, scales["w13_scale"]), (w2, scales["w2_scale"]) = (quant.quantize_weight(w, quant_mode) for w in (w13, w2))
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    x = torch.randn(T, D).to(torch.float8_e4m3fn if quant_mode == "fp8" else dtype)
    R = T * K
    rows = torch.zeros(R, dtype=torch.int64)
    captured = []
    with (
        mock.patch.object(grouped_gemm, "launch", lambda kernel, grid, *a, **meta: captured.append((kernel, a, meta))),
        mock.patch.object(grouped_gemm.quantize, "quantize_rows", lambda h, mode: (h, torch.empty(0))),
    ):  # fmt: skip
        grouped_gemm.experts(x, torch.zeros(E + 1, dtype=torch.int64), rows, torch.zeros(R), w13, None, w2, None, None,
                             "none", "silu_gated", "concat", False, False, 1.7, 7.0, dtype, config=config,
                             quant=quant_mode, xscale=torch.ones(T), **scales)  # fmt: skip
    return captured


def ptx(kernel, args, meta, arch: int) -> str:
    consts = {p.name: meta.get(p.name, p.default) for p in kernel.params if p.is_constexpr}
    signature = {name: _type(a) for name, a in zip(kernel.arg_names, args)} | dict.fromkeys(consts, "constexpr")
    options = {"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}
    return triton.compile(
        ASTSource(kernel, signature, consts), target=GPUTarget("cuda", arch, 32), options=options
    ).asm["ptx"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", default="none", choices=["none", "fp8", "int8", "int4_weight"])
    p.add_argument("--tile", nargs=5, type=int, default=[16, 64, 128, 4, 4], metavar=("M", "N", "K", "WARPS", "STAGES"))
    p.add_argument("--swap", action="store_true", help="swap_ab: the weights as the dot's first operand")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    m, n, k, warps, stages = args.tile
    gemm = tuning.GemmConfig(m, n, k, 8, warps, stages, swap_ab=args.swap)
    for kernel, kargs, meta in launches(args.quant, tuning.conform(tuning.ExpertsConfig(gemm, gemm), args.quant)):
        text = ptx(kernel, kargs, meta, args.arch)
        ops = collections.Counter(re.findall(r"^\s+([a-z][\w.]*)", text, re.M))
        watched = ", ".join(f"{name} {len(re.findall(rx, text))}" for name, rx in WATCH.items())
        print(f"{kernel.__name__} sm{args.arch} {args.quant} tile {args.tile} swap={args.swap}: {watched}")
        print("  most frequent:", ", ".join(f"{op} {c}" for op, c in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
