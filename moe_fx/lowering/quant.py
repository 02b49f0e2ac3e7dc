"""Quantisation formats, in pure torch: what every lowering of a quantised block agrees on.

Legend: N rows, D reduction (input) dim, H output dim, E experts, G = BLOCK (128), B = ceil(D / G).
Weights are always quantised in the canonical [E, H, D] layout (out features, then in features).

| mode          | weights                       | w_scale                  | activations            | x_scale  |
|---------------|-------------------------------|--------------------------|------------------------|----------|
| `fp8`         | e4m3 [E, H, D]                | [E, H], per out channel  | e4m3, per token        | [N]      |
| `fp8_block`   | e4m3 [E, H, D]                | [E, ceil(H/G), B], G×G   | e4m3, per 1×G group    | [N, B]   |
| `int8`        | int8 [E, H, D]                | [E, H], per out channel  | int8, per token        | [N]      |
| `int4_weight` | int4, 2 per byte [E, H, D/2]  | [E, H, B], groups of G   | unquantised            | empty    |

**w2 in column blocks** (`block_columns`): the rewrite may store a one-byte mode's w2 [E, D, F] as
[E, ceil(F/W2_BLOCK), D, W2_BLOCK] (zeros past F), so that a program reading a narrow F-slice of every row of D
(the fused decode kernel's down slice) reads contiguous bytes instead of a short piece of each row. Every
lowering reads both: a 4-D w2 is blocked (`w2_out_features`, `unblock_columns`); w2_scale stays [E, D].

All scales are symmetric (q = round(v / scale), scale = amax / qmax) and float32. Activations are quantised
dynamically, one scale per token (or per token and group), so a NaN or Inf in one token never reaches another
token's scale. Dequantisation is `q * scale`; the reference computes products of the quantised values exactly
(float64 accumulation) and applies the scales per token, per channel or per block, as a tensor-core kernel does.
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
QMAX = {"fp8": 448.0, "fp8_block": 448.0, "int8": 127.0, "int4_weight": 7.0}
ACTIVATION_QUANTISED = ("fp8", "fp8_block", "int8")
PER_TOKEN = ("fp8", "int8")  # activations quantised with one scale per token (fp8_block: per token and group)
_TINY = 1e-12  # amax floor: an all-zero row gets a finite scale
# The error a quantised block is expected to stay within, rel err against the unquantised block on random
# inputs: e4m3 keeps 3 mantissa bits (~2.6% RMS relative error per operand, four operands per block, whatever
# the row length); int8's uniform steps cost amax/(127·√3) per value, and amax/rms grows with the row length
# (√(2 ln n) for Gaussian rows): ~0.8% per operand at D=64, ~2% at D=7168, so the block's error measured 1.5%
# on the tiny shapes (tests/passes/test_quantize_weights.py) and 2.5–4.0% at the layer shapes of bench/layer.py
# on an H100; 6e-2 covers rows up to ~1e5; int4 groups of 128 ~9% per weight.
EXPECTED_ERROR = {"fp8": 8e-2, "fp8_block": 8e-2, "int8": 6e-2, "int4_weight": 0.3}


W2_BLOCK = 128  # w2's columns per block where it is stored blocked: one 128-byte row of a one-byte mode
# The modes whose w2 the rewrite stores blocked (`stored_w2`). Measured on an H100 (bench/w2_layout.py,
# bench/NOTES.md 2026-12-07): the T=16 steps of Qwen3 and DeepSeek 7.5-8 % faster (their decode down GEMMs read
# w2 by pointers), the rest within the +-3 % a config spreads between runs (T=1 2.5 % faster, prefill
# 0.98-1.01x). 128 wide: a prefill down tile's 128-deep K-step is one block, read through TMA as before; 64-wide
# blocks sent those to the pointer path (1.3-1.45x slower at T = 1024, 8192).
W2_BLOCKED_MODES: tuple[str, ...] = ("fp8", "int8")


def block_columns(w_EDF: torch.Tensor, width: int = W2_BLOCK) -> torch.Tensor:
    """w [E, D, F] -> [E, ceil(F/width), D, width]: F's columns in blocks of `width`, zeros past F."""
    E, D, F = w_EDF.shape
    blocks = -(-F // width)
    padded = w_EDF.new_zeros((E, D, blocks * width))
    padded[..., :F] = w_EDF
    return padded.view(E, D, blocks, width).permute(0, 2, 1, 3).contiguous()


def unblock_columns(w_EBDW: torch.Tensor, F: int) -> torch.Tensor:
    """Inverse of block_columns: [E, blocks, D, width] -> [E, D, F] (a copy)."""
    return w_EBDW.permute(0, 2, 1, 3).flatten(2)[..., :F].contiguous()


def w2_out_features(w2: torch.Tensor, transposed: bool) -> int:
    """D, the output features of w2 as an experts op takes it: [E, D, F], [E, F, D] (transposed) or blocked."""
    if w2.dim() == 4:
        return w2.shape[2]
    return w2.shape[2] if transposed else w2.shape[1]


W2_MAX_PADDING = 1 / 16  # the zeros past F a blocked w2 may hold, as a fraction of F (GPT-OSS's 2880: 2.2 %)


def stored_w2(wq_EDF: torch.Tensor, mode: str) -> torch.Tensor:
    """The rewrite's w2 of `mode`: blocked (`block_columns`) where mode is in W2_BLOCKED_MODES and the last
    block's padding is at most W2_MAX_PADDING of F, else as given (a small F, e.g. 48, would more than double)."""
    F = wq_EDF.shape[2]
    if mode not in W2_BLOCKED_MODES or -F % W2_BLOCK > W2_MAX_PADDING * F:
        return wq_EDF
    return block_columns(wq_EDF)


def activation_dtype(mode: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype dispatched rows travel in under `mode` (the input dtype when activations stay unquantised)."""
    return {"fp8": FP8, "fp8_block": FP8, "int8": torch.int8}.get(mode, dtype)


def _cast(v: torch.Tensor, mode: str) -> torch.Tensor:
    qmax = QMAX[mode]
    if mode in ("fp8", "fp8_block"):
        return v.clamp(-qmax, qmax).to(FP8)
    return v.round().clamp(-qmax, qmax).to(torch.int8)


def _blocks(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Pad `dim` of t to a multiple of BLOCK with zeros and split it into (blocks, BLOCK)."""
    pad = -t.shape[dim] % BLOCK
    if pad:
        shape = list(t.shape)
        shape[dim] = pad
        t = torch.cat([t, t.new_zeros(shape)], dim)
    return t.unflatten(dim, (-1, BLOCK))


def quantize_rows(x_ND: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantisation: (xq_ND, x_scale [N] or [N, B]); mode in ACTIVATION_QUANTISED."""
    x = x_ND.float()
    D = x.shape[-1]
    if mode == "fp8_block":
        xb = _blocks(x, -1)  # [N, B, G]
        scale_NB = xb.abs().amax(-1).clamp_min(_TINY) / QMAX[mode]
        xq = _cast(xb / scale_NB[..., None], mode).flatten(-2)[..., :D]
        return xq.contiguous(), scale_NB
    scale_N = x.abs().amax(-1).clamp_min(_TINY) / QMAX[mode] if D else x.new_ones(x.shape[0])
    return _cast(x / scale_N[:, None], mode), scale_N


def dequantize_rows(xq_ND: torch.Tensor, scale: torch.Tensor, mode: str) -> torch.Tensor:
    """float64 values of quantised rows."""
    x = xq_ND.double()
    if mode == "fp8_block":
        D = x.shape[-1]
        return (_blocks(x, -1) * scale.double()[..., None]).flatten(-2)[..., :D]
    return x * scale.double()[:, None]


def quantize_weight(w_EHD: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise stacked weights once (rewrite time): (wq, w_scale) in the layout of the table above."""
    w = w_EHD.detach().float()
    E, H, D = w.shape
    qmax = QMAX[mode]
    if mode in ("fp8", "int8"):
        scale_EH = w.abs().amax(-1).clamp_min(_TINY) / qmax
        return _cast(w / scale_EH[..., None], mode), scale_EH
    if mode == "fp8_block":
        wb = _blocks(_blocks(w, 2), 1)  # [E, Hb, G, B, G]
        scale = wb.abs().amax(dim=(2, 4)).clamp_min(_TINY) / qmax  # [E, Hb, B]
        q = _cast(wb / scale[:, :, None, :, None], mode).flatten(3, 4).flatten(1, 2)[:, :H, :D]
        return q.contiguous(), scale
    if mode == "int4_weight":
        wb = _blocks(w, 2)  # [E, H, B, G]
        scale_EHB = wb.abs().amax(-1).clamp_min(_TINY) / qmax
        q = (wb / scale_EHB[..., None]).round().clamp(-8, 7).to(torch.int8).flatten(2)[..., :D]
        return pack_int4(q), scale_EHB
    raise ValueError(f"moe_fx: quant mode {mode!r} has no weight format; expected one of {tuple(QMAX)}")


def dequantize_weight(wq: torch.Tensor, scale: torch.Tensor, mode: str, D: int) -> torch.Tensor:
    """float64 [E, H, D] values of quantised weights."""
    if mode in ("fp8", "int8"):
        return wq.double() * scale.double()[..., None]
    if mode == "fp8_block":
        H = wq.shape[1]
        wb = _blocks(_blocks(wq.double(), 2), 1)
        return (wb * scale.double()[:, :, None, :, None]).flatten(3, 4).flatten(1, 2)[:, :H, :D]
    q = unpack_int4(wq, D).double()
    return (_blocks(q, 2) * scale.double()[..., None]).flatten(2)[..., :D]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [..., D] -> uint8 [..., ceil(D/2)], element 2i in the low nibble."""
    if q.shape[-1] % 2:
        q = torch.cat([q, q.new_zeros((*q.shape[:-1], 1))], -1)
    nibbles = (q & 0xF).to(torch.uint8)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, D: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., ceil(D/2)] -> int8 [..., D]."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.stack([low, high], -1).flatten(-2)[..., :D]
    return torch.where(q > 7, q - 16, q)


def quantised_matmul(
    x_ND: torch.Tensor, x_scale: torch.Tensor | None, wq_HD: torch.Tensor, w_scale: torch.Tensor, mode: str, D: int
) -> torch.Tensor:
    """x · wᵀ for one expert, [N, H] float64, with the scales applied where a tensor-core kernel applies them.

    Activation-quantised modes multiply the quantised values exactly and scale the per-block (or whole-row)
    partial sums; int4_weight multiplies the unquantised activations by the dequantised weights.
    """
    if mode == "int4_weight":
        return x_ND.double() @ dequantize_weight(wq_HD[None], w_scale[None], mode, D)[0].T
    if mode == "fp8_block":
        xb = _blocks(x_ND.double(), -1)  # [N, B, G]
        wb = _blocks(_blocks(wq_HD.double(), 1), 0)  # [Hb, G, B, G]
        H = wq_HD.shape[0]
        w_scale_HB = w_scale.double().repeat_interleave(BLOCK, 0)[:H]  # [H, B]
        partial_NBH = torch.einsum("nbg,hbg->nbh", xb, wb.flatten(0, 1)[:H])
        return torch.einsum("nbh,nb,hb->nh", partial_NBH, x_scale.double(), w_scale_HB)
    return (x_ND.double() @ wq_HD.double().T) * x_scale.double()[:, None] * w_scale.double()[None, :]
