"""`experts` through `torch._grouped_mm` (cuBLAS/CUTLASS grouped GEMM; sm90, bf16).

Legend: D model dim, F ffn dim, H = 2F (gated) or F, E experts, R routed rows.

    x_RD = xq[gather_index]                  (a gather copy: the library GEMM cannot fuse it)
    h_RH = _grouped_mm(x_RD, w13ᵀ, offs)     offs = expert_offsets[1:] as int32, no host sync
    y_RD = _grouped_mm(act(h_RH), w2ᵀ, offs) (activation, biases and weights in eager torch)
"""

from __future__ import annotations

import logging

import torch

from moe_fx.lowering.reference import activate
from moe_fx.lowering.registry import register_lowering
from moe_fx.spec import MoESpec

log = logging.getLogger("moe_fx")
NAME = "grouped_mm"
PRIORITY = 10  # below triton (20), which fuses the gather and the activation


def supports(spec: MoESpec) -> str | None:
    if spec.quant.mode != "none":
        return f"quant={spec.quant.mode!r} is not implemented by {NAME}"
    if spec.dropped_picks():
        return f"{spec.dropped_picks()} is not implemented by {NAME}"
    if spec.experts.dtype != "bfloat16":
        return f"torch._grouped_mm runs bfloat16 here, the block is {spec.experts.dtype}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"torch._grouped_mm's fast path needs sm90, this device is sm{major}{minor}"
    return None


def _row_experts(expert_offsets: torch.Tensor, R: int) -> torch.Tensor:
    """expert id of each row, from the group bounds (searchsorted: no host sync)."""
    rows = torch.arange(R, device=expert_offsets.device)
    return torch.searchsorted(expert_offsets[1:], rows, right=True)


def _gmm(x_RK: torch.Tensor, w_ENK: torch.Tensor, transposed: bool, offs: torch.Tensor) -> torch.Tensor:
    """x_RK · w[e]ᵀ per group; w is [E, N, K], or [E, K, N] storage when `transposed`."""
    return torch._grouped_mm(x_RK, w_ENK if transposed else w_ENK.transpose(1, 2), offs=offs)


def experts(
    xq,
    xscale,
    expert_offsets,
    gather_index,
    row_weights,
    w13,
    w3,
    w2,
    w13_bias,
    w2_bias,
    w13_scale,
    w2_scale,
    weight_at,
    activation,
    gate_up,
    w13_transposed,
    w2_transposed,
    alpha,
    limit,
    quant,
    out_dtype,
):
    """The `moe_fx::experts` contract through two `torch._grouped_mm` calls."""
    R = gather_index.shape[0]
    D = w2.shape[2] if w2_transposed else w2.shape[1]
    if R == 0:
        return xq.new_empty((0, D), dtype=out_dtype)
    offs = expert_offsets[1:].to(torch.int32)
    x_RD = xq[gather_index]
    if weight_at == "input":
        x_RD = (x_RD * row_weights[:, None]).to(xq.dtype)
    h_RH = _gmm(x_RD, w13, w13_transposed, offs)
    if w3 is not None:  # gate_up == "separate"
        h_RH, gate_up = torch.cat([h_RH, _gmm(x_RD, w3, w13_transposed, offs)], dim=1), "concat"
    row_expert = _row_experts(expert_offsets, R) if w13_bias is not None or w2_bias is not None else None
    if w13_bias is not None:
        h_RH = h_RH + w13_bias[row_expert]
    y_RD = _gmm(activate(h_RH, activation, gate_up, alpha, limit), w2, w2_transposed, offs)
    if w2_bias is not None:
        y_RD = y_RD + w2_bias[row_expert]
    if weight_at == "output":
        y_RD = y_RD * row_weights[:, None]
    return y_RD.to(out_dtype)


if hasattr(torch, "_grouped_mm"):
    register_lowering("experts", device="cuda", name=NAME, priority=PRIORITY, supports=supports)(experts)
else:
    log.debug("moe_fx: torch._grouped_mm is missing from torch %s; %s not registered", torch.__version__, NAME)
