"""The experts' GEMM kernels compiled for a GPU target on any machine (no GPU needed): PTX instruction counts.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

`grouped_gemm.experts` runs with its launches captured instead of made; each captured kernel is compiled by
Triton for the target (sm90 by default), its arguments specialised as Triton's launcher does (`specialise`:
unit strides become constants, so loads vectorise as on the GPU), and its PTX summarised: MMA instructions
(`wgmma` or `mma.sync`), conversions, shared-memory traffic, the most frequent instructions. `--sass` also
reads the cubin (Triton's bundled ptxas, nvdisasm and cuobjdump): registers, shared memory, thread blocks per
SM, and the main loop's SASS instruction mix per warp and K-step. What a config compiles to, read before
spending GPU time on it (e.g. whether a decode tile reaches wgmma, how many instructions a K-step issues).

    python bench/ptx_stats.py --quant int4_weight --swap --tile 16 64 128 4 4 [--tma] [--persistent] [--sass]
        [--arch 90] [--top 25] [--fused [--routed]]
    python bench/ptx_stats.py --table [MATCH] [--json rows.json]   # every mode and path: diff before/after
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends import nvidia as nvidia_backend
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.tensor_descriptor import TensorDescriptor

from moe_fx.lowering import quant
from moe_fx.lowering.triton import grouped_gemm, tuning

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8", torch.int8: "i8",
         torch.int64: "i64", torch.int32: "i32", torch.float8_e4m3fn: "fp8e4nv"}  # fmt: skip
WATCH = {"wgmma": r"wgmma\.mma_async", "mma.sync": r"mma\.sync", "int->float cvt": r"cvt\.rn\.f(?:16|32)\.s",
         "->bf16 cvt": r"cvt\.rn\.bf16", "st.shared": r"st\.shared", "ld.shared": r"ld\.shared",
         "ldmatrix": r"ldmatrix", "cp.async": r"cp\.async\.(?:ca|cg)"}  # fmt: skip
# Hopper's MMAs in SASS: mma.sync (HMMA 16-bit, IMMA int8, QMMA fp8) and wgmma (HGMMA, IGMMA, QGMMA)
MMA_SASS = r"\b(?:HMMA|IMMA|QMMA|HGMMA|IGMMA|QGMMA)\b"


def _type(a) -> str:
    if isinstance(a, torch.Tensor):
        return "*" + TYPES[a.dtype]
    return {bool: "i1", int: "i32", float: "fp32"}[type(a)]


def launches(quant_mode: str, config: tuning.ExpertsConfig, E=8, D=256, F=128, T=4, K=2, dtype=torch.bfloat16,
             routed: bool = False):  # fmt: skip
    """[(kernel, args, meta)] that one experts call on CPU tensors of this shape launches with `config` (summing
    each token's rows in experts, `reduce`, where the config is fused; `routed`: each program routing its own
    pick from softmax logits, as `routed_experts` runs a fused config at decode)."""
    w13, w2 = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    scales = {}
    if quant_mode != "none":
        (w13, scales["w13_scale"]), (w2, scales["w2_scale"]) = (quant.quantize_weight(w, quant_mode) for w in (w13, w2))
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    x, xscale = torch.randn(T, D, dtype=dtype), torch.ones(T)
    if quant_mode in quant.ACTIVATION_QUANTISED:  # the operands the GPU's kernels get: quantised activations
        x, xscale = quant.quantize_rows(x, quant_mode)
    R = T * K
    rows = torch.zeros(R, dtype=torch.int64)
    routing = None
    if routed:
        logits = torch.randn(T, E, dtype=dtype)
        routing = grouped_gemm.Routing(logits, None, K, "softmax", "score_then_topk", True, 1, 1, 1, 1.0,
                                       torch.float32, 0.0)  # fmt: skip
    captured = []
    with (
        mock.patch.object(grouped_gemm, "launch", lambda kernel, grid, *a, **meta: captured.append((kernel, a, meta))),
        mock.patch.object(grouped_gemm.quantize, "quantize_rows", quant.quantize_rows),  # the reference, for h
        mock.patch.object(grouped_gemm, "_tma_fits", lambda c, code, device: c.tma and code != 3),  # as on sm90
    ):  # fmt: skip
        grouped_gemm.experts(x, torch.zeros(E + 1, dtype=torch.int64), rows, torch.zeros(R), w13, None, w2, None, None,
                             "none", "silu_gated", "concat", False, False, 1.7, 7.0, dtype, config=config,
                             quant=quant_mode, xscale=xscale, reduce=config.fused, routing=routing,
                             **scales)  # fmt: skip
    return captured


def specialise(kernel, args) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch with these runtime arguments, as Triton's launcher makes them:
    an int equal to 1 becomes the constant 1 (a unit stride: what lets the compiler vectorise along it), ints
    and tensor addresses divisible by 16 carry that divisibility. Without this, strides stay unknown and the
    compiled code is not what a GPU runs."""
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, a) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(a, TensorDescriptor):
            signature[name] = f"tensordesc<{TYPES[a.base.dtype]}{list(a.block_shape)}>"
            continue
        if isinstance(a, torch.Tensor):
            signature[name] = "*" + TYPES[a.dtype]
            divisible = a.data_ptr() % 16 == 0
        elif isinstance(a, bool):
            signature[name], divisible = "i1", False
        elif isinstance(a, int):
            if a == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name], divisible = ("i32" if -(2**31) <= a < 2**31 else "i64"), a % 16 == 0
        else:
            signature[name], divisible = _type(a), False
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_for(kernel, args, meta, arch: int):
    """The kernel compiled by Triton for sm`arch` (PTX, and a cubin through Triton's bundled ptxas)."""
    consts = {p.name: meta.get(p.name, p.default) for p in kernel.params if p.is_constexpr}
    signature, ones, attrs = specialise(kernel, args)
    signature |= dict.fromkeys(consts, "constexpr")
    options = {"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}
    return triton.compile(
        ASTSource(kernel, signature, consts | ones, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )


def _tool(name: str) -> str:
    """A CUDA binary Triton ships beside its ptxas (nvdisasm, cuobjdump)."""
    return str(Path(nvidia_backend.__file__).parent / "bin" / name)


def sass(compiled, warps: int) -> dict:
    """What the cubin holds: registers, stack (spills) and shared memory per thread block, the blocks an SM can
    hold at once (Hopper: 64K registers, 227 KB of shared memory, 64 warps, 32 blocks), and the instruction mix of the
    main loop (the branch-delimited SASS block with the most MMA instructions), per warp and iteration."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
        code = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage.stdout).group(1))  # spilled registers live on the stack
    shared = compiled.metadata.shared
    per_sm = min(65536 // (regs * 32 * warps), (227 * 1024) // max(shared, 1), 64 // warps, 32)
    blocks = re.split(r"\n\.L_x_\d+:\n", code)
    loop = max(blocks, key=lambda b: len(re.findall(MMA_SASS, b)))
    if not re.search(MMA_SASS, loop):
        raise RuntimeError(f"moe_fx: no MMA instruction ({MMA_SASS}) in the SASS of {compiled.name}")
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", loop)
    return {"regs": regs, "stack": stack, "shared": shared, "blocks_per_sm": per_sm, "loop": collections.Counter(ops)}


# --table: one decode and one prefill config of every mode and operand path, to compare a kernel change's code
# before and after it (quant, M, N, K, warps, stages, the GemmConfig flags set)
TABLE = (
    ("none", 16, 64, 128, 4, 4, ""), ("none", 16, 64, 128, 4, 4, "swap_ab"), ("none", 64, 64, 64, 4, 4, ""),
    ("none", 128, 128, 64, 8, 3, "tma"), ("none", 128, 128, 64, 8, 3, "tma persistent"),
    ("fp8", 16, 64, 256, 4, 3, "swap_ab"), ("fp8", 128, 128, 128, 8, 3, "tma"),
    ("fp8_block", 16, 128, 128, 4, 3, "swap_ab"), ("fp8_block", 128, 128, 128, 8, 3, "tma"),
    ("int8", 16, 64, 256, 4, 4, ""), ("int4_weight", 16, 64, 128, 4, 4, ""), ("int4_weight", 64, 64, 64, 4, 4, ""),
)  # fmt: skip


def table(arch: int, match: str) -> list[dict]:
    """SASS facts of both kernels of every TABLE config whose description contains `match`: registers, spill
    stack, shared memory, blocks per SM and main-loop instructions per warp, one row per (config, kernel)."""
    rows = []
    for q, m, n, k, warps, stages, flags in TABLE:
        name = f"{q} {m}x{n}x{k} w{warps} s{stages} {flags}".strip()
        if match not in name:
            continue
        gemm = tuning.GemmConfig(m, n, k, 8, warps, stages, **dict.fromkeys(flags.split(), True))
        for kernel, kargs, meta in launches(q, tuning.conform(tuning.ExpertsConfig(gemm, gemm), q)):
            s = sass(compile_for(kernel, kargs, meta, arch), meta["num_warps"])
            loop = sum(s.pop("loop").values())
            rows.append({"config": name, "kernel": kernel.__name__} | s | {"loop": loop})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", default="none", choices=["none", *quant.QMAX])
    p.add_argument("--tile", nargs=5, type=int, default=[16, 64, 128, 4, 4], metavar=("M", "N", "K", "WARPS", "STAGES"))
    p.add_argument("--swap", action="store_true", help="swap_ab: the weights as the dot's first operand")
    p.add_argument("--tma", action="store_true", help="TMA descriptor loads (the weights; the down GEMM's h too)")
    p.add_argument("--persistent", action="store_true", help="persistent programs (tile and K loops flattened)")
    p.add_argument("--fused", action="store_true", help="one kernel, the down GEMM in the up tile's epilogue")
    p.add_argument("--routed", action="store_true", help="--fused, each program routing its own pick")
    p.add_argument("--shape", nargs=4, type=int, default=[8, 2, 256, 128], metavar=("E", "K", "D", "F"))
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--sass", action="store_true", help="also the cubin: registers, occupancy, the main loop's SASS")
    p.add_argument("--table", nargs="?", const="", metavar="MATCH",
                   help="SASS facts of the TABLE configs (containing MATCH) instead of one config")  # fmt: skip
    p.add_argument("--json", type=Path, help="--table: also write the rows here (to diff before/after a change)")
    args = p.parse_args()
    if args.table is not None:
        rows = table(args.arch, args.table)
        columns = ("config", "kernel", "regs", "stack", "shared", "blocks_per_sm", "loop")
        print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in columns) + " |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return
    m, n, k, warps, stages = args.tile
    gemm = tuning.GemmConfig(m, n, k, 8, warps, stages, tma=args.tma, swap_ab=args.swap, persistent=args.persistent)
    config = tuning.ExpertsConfig(gemm, gemm)
    if args.fused:  # w2 in the column blocks `tune` times fused candidates with
        width = tuning.FUSED_BLOCK_D.get(args.quant, tuning.FUSED_BLOCK_D["none"])
        config = tuning.ExpertsConfig(gemm, replace(gemm, block_n=width), fused=True)
    E, K, D, F = args.shape
    for kernel, kargs, meta in launches(args.quant, tuning.conform(config, args.quant), E, D, F, 4, K,
                                        routed=args.routed):  # fmt: skip
        compiled = compile_for(kernel, kargs, meta, args.arch)
        text = compiled.asm["ptx"]
        ops = collections.Counter(re.findall(r"^\s+([a-z][\w.]*)", text, re.M))
        watched = ", ".join(f"{name} {len(re.findall(rx, text))}" for name, rx in WATCH.items())
        loops = len(re.findall(r"scf\.for ", compiled.asm["ttgir"]))  # persistent: flattened into one
        watched += f", loops {loops}"
        print(f"{kernel.__name__} sm{args.arch} {args.quant} tile {args.tile} swap={args.swap}: {watched}")
        print("  most frequent:", ", ".join(f"{op} {c}" for op, c in ops.most_common(args.top)))
        if args.sass:
            s = sass(compiled, meta["num_warps"])
            mix = ", ".join(f"{op} {c}" for op, c in s["loop"].most_common(args.top))
            print(f"  sass: {s['regs']} registers, {s['shared']} B shared, {s['blocks_per_sm']} blocks per SM, "
                  f"{s['stack']} B stack; "
                  f"main loop {sum(s['loop'].values())} instructions per warp: {mix}")  # fmt: skip


if __name__ == "__main__":
    main()
