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

from moe_fx.lowering.triton import tuner  # noqa: E402


def experts_op(name: str | tuple, T: int, quant: str = "none", device="cuda", dtype=torch.bfloat16,
               reduce: bool = False, routed: bool = False):  # fmt: skip
    """run(config) -> y_RD (`reduce`: out_TD, the rows summed in experts): the SiLU-gated experts op of shape
    `name` (or (E, K, D, F)) at T tokens, dispatched once (`tuner.experts_call`, what `tuner.tune` times;
    `routed`: the layer up to combine, as `routed_experts` runs it); run.inputs holds (x_TD, ids_TK, weights_TK,
    w13_EHD, w2_EDF) (the weights quantised under `quant`), run.row_index the dispatched rows' slots."""
    E, K, D, F = SHAPES[name] if isinstance(name, str) else name
    weights = tuner.random_weights(E, D, F, "silu_gated", dtype, device, quant)
    run = tuner.experts_call(T, K, "silu_gated", dtype, weights, quant, reduce, routed)
    run.inputs = (*run.inputs, *weights[:2])
    return run


def write_rows(out: str, prefix: str, rows: list, path: Path | None = None, **meta) -> Path:
    """OUT/<prefix>-<stamp>.json (or `path`, to rewrite a file as rows come in): {"meta": device, date, torch,
    triton and `meta`, "rows": rows}."""
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": triton.__version__, **meta}  # fmt: skip
    path = path or Path(out) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return path
