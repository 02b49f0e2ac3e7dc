"""The Triton experts op alone on one `bench/layer.py` shape: random weights, uniform random routing.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from layer import SHAPES  # noqa: E402

from moe_fx.lowering.quant import quantize_weight  # noqa: E402
from moe_fx.lowering.triton.dispatch import dispatch  # noqa: E402
from moe_fx.lowering.triton.grouped_gemm import experts  # noqa: E402


def experts_op(name: str, T: int, quant: str = "none"):
    """run(config) -> y: the experts op of shape `name` at T tokens (SiLU-gated, bf16), dispatched once."""
    E, K, D, F = SHAPES[name]
    w13 = torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    w2 = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) / F**0.5
    scales = {}
    if quant != "none":
        (w13, scales["w13_scale"]), (w2, scales["w2_scale"]) = quantize_weight(w13, quant), quantize_weight(w2, quant)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(T, E, device="cuda").argsort(dim=-1)[:, :K].to(torch.int32)
    xq, xscale, offsets, gather, row_weights, *_ = dispatch(x, ids, torch.rand(T, K, device="cuda"), E, quant)

    def run(config):
        return experts(xq, offsets, gather, row_weights, w13, None, w2, None, None, "none", "silu_gated", "concat",
                       False, False, 1.702, 7.0, torch.bfloat16, config=config, quant=quant, xscale=xscale,
                       **scales)  # fmt: skip

    return run


def write_rows(out: str, prefix: str, rows: list, **meta) -> Path:
    """OUT/<prefix>-<stamp>.json: {"meta": device, date, torch, triton and `meta`, "rows": rows}."""
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": triton.__version__, **meta}  # fmt: skip
    path = Path(out) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return path
