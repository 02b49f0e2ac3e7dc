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


def experts_op(name: str | tuple, T: int, quant: str = "none", device="cuda", dtype=torch.bfloat16):
    """run(config) -> y_RD: the experts op of shape `name` (or (E, K, D, F)) at T tokens, SiLU-gated, dispatched
    once; run.inputs holds (x_TD, ids_TK, weights_TK, w13_EHD, w2_EDF) (the weights quantised under `quant`),
    run.row_index the dispatched rows' slots (for combine)."""
    E, K, D, F = SHAPES[name] if isinstance(name, str) else name
    w13 = torch.randn(E, 2 * F, D, device=device, dtype=dtype) / D**0.5
    w2 = torch.randn(E, D, F, device=device, dtype=dtype) / F**0.5
    scales = {}
    if quant != "none":
        (w13, scales["w13_scale"]), (w2, scales["w2_scale"]) = quantize_weight(w13, quant), quantize_weight(w2, quant)
    x = torch.randn(T, D, device=device, dtype=dtype)
    ids = torch.rand(T, E, device=device).argsort(dim=-1)[:, :K].to(torch.int32)
    weights = torch.rand(T, K, device=device)
    dispatched = dispatch(x, ids, weights, E, quant)
    xq, xscale, offsets, gather, row_weights, row_index, _ = dispatched

    def run(config=None):
        return experts(xq, offsets, gather, row_weights, w13, None, w2, None, None, "none", "silu_gated", "concat",
                       False, False, 1.702, 7.0, dtype, config=config, quant=quant, xscale=xscale,
                       **scales)  # fmt: skip

    run.inputs, run.row_index = (x, ids, weights, w13, w2), row_index
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
