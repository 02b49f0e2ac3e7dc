"""Triton `experts`' launcher: checks the operands, picks the tuned or default config (`tuning.choose`), builds the
TMA descriptors where they fit, and launches `experts_kernels`' up and down GEMMs (or the fused decode kernel).

Legend: T tokens, D model dim, F expert ffn dim, E experts, R routed rows, H = 2F (gated) or F.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from moe_fx.lowering import quant as quant_fmt
from moe_fx.lowering.triton import quantize, tuning
from moe_fx.lowering.triton.experts_kernels import ACTIVATION_CODES, _down_kernel, _up_kernel
from moe_fx.lowering.triton.launch import launch
from moe_fx.lowering.triton.route import route_meta
from moe_fx.lowering.triton.sizes import cdiv, next_power_of_2
from moe_fx.spec import GATED_ACTIVATIONS


def _gate_up_rows(gate_up: str, gated: bool, F: int) -> tuple[int, int, int]:
    """(gate row, up row, row step) of column 0 in the H rows of w13 (or of w3 for "separate")."""
    if not gated or gate_up in ("concat", "separate"):
        return 0, F, 1
    if gate_up == "interleaved":
        return 0, 1, 2
    return F, 0, 1  # up_first


QUANT_CODES = {"none": 0, "fp8": 1, "int8": 1, "fp8_block": 2, "int4_weight": 3}
loads = collections.Counter()  # GEMM launches by operand path, e.g. "up/tma", "down/pointers+swap" (tests read it)


class Routing(NamedTuple):
    """What the fused decode kernel routes each pick by (`experts(routing=...)`): the router's logits_TE and the
    rest of `route`'s arguments (`route.route_meta`)."""

    logits: torch.Tensor
    bias: torch.Tensor | None
    k: int
    scoring: str
    order: str
    renormalize: bool
    n_group: int
    topk_group: int
    group_score_topk: int
    scale: float
    score_dtype: torch.dtype
    group_fill: float


# The routing meta-parameters under the up kernel's names (its own K and BLOCK_K are the GEMM's).
_ROUTED_NAMES = {"K": "TOP_K", "HAS_BIAS": "HAS_ROUTE_BIAS", "BLOCK_E": "BLOCK_ER", "BLOCK_K": "BLOCK_KR"}


def _choice(xq: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w2_transposed: bool, activation: str, R: int,
            quant: str, out_dtype: torch.dtype) -> tuple:  # fmt: skip
    """`tuning.choose`'s arguments for `experts` over R rows of xq's tokens: (E, D, F, K, gated, dtype, device, R,
    quant)."""
    gated, code = activation in GATED_ACTIVATIONS, QUANT_CODES[quant]
    D, F = (w2.shape[2], w2.shape[1]) if w2_transposed else (w2.shape[1], w2.shape[2])
    if code == 3 or w2.dim() == 4:  # w2's F packed two per byte, or in column blocks: F off the canonical w13
        D, F = quant_fmt.w2_out_features(w2, w2_transposed), w13.shape[1] // 2 if gated else w13.shape[1]
    dtype = xq.dtype if code == 0 else out_dtype
    return (w13.shape[0], D, F, R // max(xq.shape[0], 1), gated, dtype, xq.device, R, quant)


def routes_at(x_TD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w2_transposed: bool, activation: str, k: int,
              quant: str = "none", config: tuning.ExpertsConfig | None = None) -> bool:  # fmt: skip
    """Whether `experts(routing=...)` can run for x_TD's tokens (in the model's dtype), k picks each, under `quant`:
    the mode runs fused (`tuning.runs_fused`) and `config`, else the config chosen at this T (the one `experts`
    will choose), is fused."""
    if not tuning.runs_fused(quant):
        return False
    if config is None:
        config = tuning.choose(*_choice(x_TD, w13, w2, w2_transposed, activation, x_TD.shape[0] * k, quant,
                                        x_TD.dtype))  # fmt: skip
    return config.fused


def experts(
    xq: torch.Tensor,
    expert_offsets: torch.Tensor,
    gather_index: torch.Tensor,
    row_weights: torch.Tensor,
    w13: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    weight_at: str,
    activation: str,
    gate_up: str,
    w13_transposed: bool,
    w2_transposed: bool,
    alpha: float,
    limit: float,
    out_dtype: torch.dtype,
    config: tuning.ExpertsConfig | None = None,
    quant: str = "none",
    xscale: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    reduce: bool = False,
    routing: Routing | None = None,
    sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows xq_ND[gather_index_R], grouped by expert_offsets_E1 -> y_RD (see the `moe_fx::experts` contract).

    reduce: -> out_ND instead, each row's y (× its routing weight unless weight_at is "input") added into its
    token's row gather_index[r] by the down GEMM's epilogue, in out_dtype atomics (the up GEMM's programs write
    the zeros first): `combine` done without y's round trip through memory, in no fixed order.

    quant "fp8" | "int8" | "fp8_block": xq, w13, w2 and their scales in the formats of `quant.py`; both GEMMs
    run on e4m3 (fp32 accumulation) or int8 (int32) operands. The activation between them is quantised as
    the reference does: per 1×128 group in the up GEMM's epilogue (fp8_block, BLOCK_N = 128), per token
    otherwise, by `quantize.quantize_rows` on the activation stored in the model's dtype (a row's scale needs
    the whole row; as vLLM does, and half the bytes of an fp32 round trip). A fused config (fp8, int8) has no
    row's whole h in one program: the up epilogue quantises each row of its F-slice with its own scale, finer
    groups than the reference's, and the down slice dequantises its product by that scale and w2's.
    int4_weight (w4a16): each K-step loads its packed weight bytes once, unpacks them in registers to exact int4
    values in the activations' dtype and multiplies the even and odd K-columns of the activations by the low
    and high nibbles; the group scales multiply the K-step's partial product (decode tiles) or the weights
    (`_int4_mma`); the activations stay in their dtype throughout.
    `config` overrides the tuned/default block sizes (used by `tuner.tune`). Without it, a tuned config that
    does not compile on this GPU and Triton (out of shared memory or registers) gives way to the defaults, with
    a warning (`tuning.unfit`).

    routing (reduce, where `routes_at`: a fused config): no dispatch; xq is x_TD (under fp8 / int8 its rows
    quantised, `xscale` theirs: `quantize.quantize_rows`), each of its tokens routed by `routing` (the router's
    logits and `route`'s arguments) inside the fused kernel, whose program for pick p finds its expert by running
    the token's top-k itself (`route._route_row`); the three dispatch tensors are not read. `sums`: the fused
    kernel's fp32 sums and counter, int32 [T·D + 1] of zeros, where the caller zeroed them (the router's GEMV,
    `route.project(zero=...)`); else this call allocates and zeroes them.
    """
    call = dict(locals())  # the arguments, for a second run with the defaults
    if routing is not None:  # placeholders: the routing kernel reads none of the dispatch tensors
        expert_offsets = gather_index = row_weights = routing.logits
    if quant not in QUANT_CODES:
        raise NotImplementedError(f"moe_fx: triton experts runs quant in {tuple(QUANT_CODES)}, got {quant!r}")
    if quant != "none" and (w3 is not None or w13_scale is None or w2_scale is None):
        raise ValueError(f"moe_fx: quant={quant!r} experts take canonical w13 (no w3) and both weight scales")
    R = xq.shape[0] * routing.k if routing is not None else gather_index.shape[0]
    shape = _choice(xq, w13, w2, w2_transposed, activation, R, quant, out_dtype)  # `tuning.choose`'s arguments
    E, D, F, _, gated = shape[:5]
    w2_EDF = w2.transpose(1, 2) if w2_transposed else w2  # strides only
    code, G = QUANT_CODES[quant], quant_fmt.BLOCK
    w2_block = _column_blocks(w2, w2_transposed, code, D, F)
    # w2's (expert, D, F) strides: a blocked w2's D stride is its block width, its F stride 1 within a block
    w2_strides = (w2.stride(0), w2.stride(2), 1) if w2_block else w2_EDF.stride()
    h_dtype = {0: xq.dtype, 1: out_dtype, 2: xq.dtype, 3: xq.dtype}[code]  # 1: stored, then quantised per row
    h_RF = torch.empty((R, F), dtype=h_dtype, device=xq.device)  # (fused: never written)
    h_scale = torch.empty((R, cdiv(F, G)) if code == 2 else (0,), dtype=torch.float32, device=xq.device)
    y = torch.empty((xq.shape[0] if reduce else R, D), dtype=out_dtype, device=xq.device)  # y_RD, or out_ND
    if R == 0:
        return y.zero_()
    chosen = None  # `tuning.choose`'s config, where it chose
    if config is None:
        config = chosen = tuning.choose(*shape)
    try:
        config = tuning.conform(config, quant)
        w13_EHD = w13.transpose(1, 2) if w13_transposed else w13
        gate_row, up_row, step = _gate_up_rows(gate_up, gated, F)
        bias_gate, bias_up = gate_row, up_row
        c = config.up
        interleaved = gated and gate_up == "interleaved"
        wg = None
        if _tma_fits(c, code, xq.device) and not (gated and gate_up == "separate"):
            wg = _weight_descriptor(w13, gated, interleaved, not w13_transposed, c)
        up_tma = wg is not None
        up_first = up_tma and gated and gate_up == "up_first"
        if up_first:  # the descriptor's tile holds the halves as stored; the kernel swaps them after the K loop
            gate_row, up_row = 0, F
        wu = w13_EHD
        if gate_up == "separate" and gated:
            wu = w3.transpose(1, 2) if w13_transposed else w3
            up_row = 0
            if wu.stride(2) != w13_EHD.stride(2):  # one K-stride for the whole weight tile
                w13_EHD, wu = w13_EHD.contiguous(), wu.contiguous()
        precision = "ieee" if xq.dtype == torch.float32 or code in (1, 2) else "tf32"
        is_int = quant == "int8"
        BLOCK_E = next_power_of_2(E)
        bias13 = w13_bias if w13_bias is not None else w13
        xs = _scale_strides(xscale, row_weights)
        ws13, ws2 = _scale_strides(w13_scale, row_weights), _scale_strides(w2_scale, row_weights)
        bias2 = w2_bias if w2_bias is not None else w2
        weight_output = weight_at == "output" or (reduce and weight_at == "none")
        fused = config.fused and reduce and tuning.runs_fused(quant)
        if routing is not None and not fused:
            raise ValueError(f"moe_fx: experts routes its picks in a fused config only, got {tuning.describe(config)}")
        # fused: the F-slices' fp32 partial sums sum_TD, then the count of programs done (int32, the last element);
        # otherwise the kernel never reads them (row_weights stands in: no allocation, no fill)
        sum_TD, done = row_weights, gather_index
        if fused:
            if sums is None:
                sums = torch.zeros((y.numel() + 1,), dtype=torch.int32, device=xq.device)
            sum_TD, done = sums[:-1].view(torch.float32), sums[-1:]
        loads[load_path("routed" if routing is not None else "fused" if fused else "up", up_tma, c)] += 1
        grid, route_args, route_kw = _programs(c, R, E, F, xq.device), (row_weights,) * 2 + (0, 1, 1.0, 0.0, 0, 0), {}
        if routing is not None:  # a program per F-slice of each pick, which routes its token itself
            r, logits = routing, routing.logits
            grid = R * cdiv(F, c.block_n)
            route_args = (logits, r.bias if r.bias is not None else logits, R, logits.shape[1] // max(r.n_group, 1),
                          float(r.scale), float(r.group_fill), logits.stride(0), logits.stride(1))  # fmt: skip
            meta = route_meta(logits.shape[1], r.bias, r.k, r.scoring, r.order, r.renormalize, r.n_group,
                              r.topk_group, r.group_score_topk, r.score_dtype)  # fmt: skip
            route_kw = dict(ROUTED=True, ROUTE_COPIES=c.num_warps,
                            **{_ROUTED_NAMES.get(name, name): value for name, value in meta.items()})  # fmt: skip
        launch(
            _up_kernel, (grid,),
            xq, gather_index, expert_offsets, row_weights, wg if up_tma else w13_EHD, wu, bias13, h_RF, xs[0], ws13[0],
            h_scale if code == 2 else row_weights, y, w2, bias2, ws2[0], sum_TD, done,
            D, F, E, grid, float(alpha), float(limit), y.numel() if reduce else 0,
            gate_row, up_row, step, bias_gate, bias_up,
            xq.stride(0), xq.stride(1), w13_EHD.stride(0), w13_EHD.stride(1), w13_EHD.stride(2),
            wu.stride(0), wu.stride(1),
            bias13.stride(0), bias13.stride(-1), h_RF.stride(0), h_RF.stride(1),
            xs[1], xs[2], ws13[1], ws13[2], ws13[3], h_scale.stride(0),
            *w2_strides, bias2.stride(0), bias2.stride(-1), ws2[1], ws2[2],
            *route_args,
            GATED=gated, ACT=ACTIVATION_CODES[activation], HAS_BIAS=w13_bias is not None,
            WEIGHT_INPUT=weight_at == "input", EVEN_K=D % c.block_k == 0, PRECISION=precision,
            QUANT=code, QMAX=quant_fmt.QMAX.get(quant, 1.0), IS_INT=is_int, PACK=2 if code == 3 else 1,
            INTERLEAVED=interleaved, SEPARATE=gated and gate_up == "separate", W_TMA=up_tma,
            W_KMAJOR=not w13_transposed, UP_FIRST=up_first, SWAP=c.swap_ab, PERSISTENT=c.persistent,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_E=BLOCK_E, GROUP_M=c.group_m, G=G,
            ZERO_OUT=reduce and not fused, FUSED=fused, HAS_B2=w2_bias is not None, WEIGHT_OUTPUT=weight_output,
            BLOCK_D=config.down.block_n, W2_BLOCK=w2_block, **route_kw, num_warps=c.num_warps,
            num_stages=c.num_stages,
        )  # fmt: skip
        if fused:
            return y
        if code == 1:
            h_RF, h_scale = quantize.quantize_rows(h_RF, quant)
        hs = _scale_strides(h_scale, row_weights)
        c = config.down
        h_in = w_in = None
        if _tma_fits(c, code, xq.device):
            k_major = not w2_transposed
            h_in = _descriptor(h_RF, list(h_RF.shape), list(h_RF.stride()), [c.block_m, c.block_k])
            w_in = _blocked_descriptor(w2, c) if w2_block else _weight_descriptor(w2, False, False, k_major, c)
        down_tma = h_in is not None and w_in is not None
        if not down_tma:
            h_in, w_in = h_RF, w2_EDF
        loads[load_path("down", down_tma, c)] += 1
        grid = _programs(c, R, E, D, xq.device)
        launch(
            _down_kernel, (grid,),
            h_in, expert_offsets, row_weights, w_in, bias2, y, hs[0], ws2[0], gather_index,
            D, F, E, R, grid,
            h_RF.stride(0), h_RF.stride(1), *w2_strides,
            bias2.stride(0), bias2.stride(-1), y.stride(0), y.stride(1),
            hs[1], hs[2], ws2[1], ws2[2], ws2[3],
            HAS_BIAS=w2_bias is not None, WEIGHT_OUTPUT=weight_output,
            EVEN_K=F % c.block_k == 0,
            PRECISION=precision, QUANT=code, IS_INT=is_int, PACK=2 if code == 3 else 1, W_TMA=down_tma,
            W_KMAJOR=not w2_transposed, SWAP=c.swap_ab, PERSISTENT=c.persistent, REDUCE=reduce,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_E=BLOCK_E, GROUP_M=c.group_m, G=G,
            W2_BLOCK=w2_block, num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip
        return y
    except triton.runtime.errors.OutOfResources as err:  # a chosen tuned config this GPU and Triton cannot compile
        fallback = None if chosen is None else tuning.unfit(chosen, err, *shape)
        if fallback is None or fallback == chosen or routing is not None:  # given, or the default (a config the
            raise  # tests compile), or routed (a fused config only: the caller then runs route and dispatch)
        args = {name: value for name, value in call.items() if name != "config"}
        return experts(**args, config=fallback)


def load_path(gemm: str, tma: bool, c: tuning.GemmConfig) -> str:
    """The `loads` key of one launch: the GEMM, how its operands load, whether the dot's operands are swapped,
    whether its programs are persistent."""
    return f"{gemm}/{'tma' if tma else 'pointers'}{'+swap' if c.swap_ab else ''}{'+persistent' if c.persistent else ''}"


def _programs(c: tuning.GemmConfig, R: int, E: int, N: int, device: torch.device) -> int:
    """The grid of a GEMM over N output columns: a program per tile that may do work (M-tiles: at most
    cdiv(R, BLOCK_M) + min(E, R), as at most R experts are hit and each adds at most one partial tile; the
    dropped rows' zero tiles are fewer), sized without reading the offsets (no host sync). Persistent: two
    programs per SM (one where a program's shared memory fills an SM; a second one then takes the other half
    of the tiles), each taking every grid-th tile; three in the interpreter, so that a program takes several."""
    tiles = (cdiv(R, c.block_m) + min(E, R)) * cdiv(N, c.block_n)
    if c.persistent:
        sms = tuning.sm_count(device)  # None off CUDA
        return min(tiles, 2 * sms if sms else 3)
    return tiles


def _tma_fits(c: tuning.GemmConfig, code: int, device: torch.device) -> bool:
    """Whether a GEMM may load through TMA descriptors: the config asks for it, the operands are not
    int4-packed, and the device has the copy engine (sm90+; the interpreter emulates it)."""
    if not c.tma or code == 3:
        return False
    return tuning.interpreting() or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def _descriptor(t: torch.Tensor, shape: list, strides: list, block: list) -> TensorDescriptor | None:
    """A descriptor of the view (shape, strides) of t, or None where the copy engine can't address it (a base
    or a stride not a multiple of 16 bytes, a last stride other than 1)."""
    fits = t.data_ptr() % 16 == 0 and strides[-1] == 1 and all(s * t.element_size() % 16 == 0 for s in strides[:-1])
    return TensorDescriptor(t, shape, strides, block) if fits else None


def _weight_descriptor(w: torch.Tensor, gated: bool, interleaved: bool, k_major: bool, c: tuning.GemmConfig):
    """A descriptor over an expert weight as stored, [E, N, K] (k_major) or [E, K, N], whose block is one
    K-step's weight tile of `_weight_tile`: a gated weight's N = 2F is split into its gate and up halves,
    [2, F] (the tile takes the N-tile's rows of each) or [F, 2] (interleaved: adjacent pairs), so that the
    copy engine zero-fills past F and past K (never the next expert's rows). None where it doesn't fit."""
    E, s_e = w.shape[0], w.stride(0)
    bn, bk = c.block_n, c.block_k
    if k_major:
        N, K = w.shape[1], w.shape[2]
        s_n = w.stride(1)
        if gated and interleaved:
            return _descriptor(w, [E, N // 2, 2, K], [s_e, 2 * s_n, s_n, w.stride(2)], [1, bn, 2, bk])
        if gated:
            return _descriptor(w, [E, 2, N // 2, K], [s_e, (N // 2) * s_n, s_n, w.stride(2)], [1, 2, bn, bk])
        return _descriptor(w, [E, N, K], list(w.stride()), [1, bn, bk])
    K, N = w.shape[1], w.shape[2]
    if gated and not interleaved:
        return _descriptor(w, [E, K, 2, N // 2], [s_e, w.stride(1), (N // 2) * w.stride(2), w.stride(2)],
                           [1, bk, 2, bn])  # fmt: skip
    return _descriptor(w, [E, K, N], list(w.stride()), [1, bk, 2 * bn if gated else bn])


def _column_blocks(w2: torch.Tensor, w2_transposed: bool, code: int, D: int, F: int) -> int:
    """The width of w2's column blocks (`quant.block_columns`: [E, ceil(F / width), D, width], each expert's
    blocks contiguous), or 0 for a w2 stored [E, D, F] (or transposed)."""
    if w2.dim() != 4:
        return 0
    E, blocks, D_, width = w2.shape
    contiguous = w2.stride()[2:] == (width, 1) and (blocks == 1 or w2.stride(1) == D * width)
    if w2_transposed or code in (2, 3) or D_ != D or blocks * width < F or not contiguous:
        raise ValueError(
            f"moe_fx: a w2 in column blocks is [E, ceil(F/width), D, width] with each expert's blocks contiguous, "
            f"not transposed, under quant none, fp8 or int8; got shape {tuple(w2.shape)}, strides {w2.stride()}, "
            f"w2_transposed={w2_transposed} for D={D}, F={F}"
        )
    return width


def _blocked_descriptor(w2: torch.Tensor, c: tuning.GemmConfig) -> TensorDescriptor | None:
    """A descriptor over w2 in column blocks whose box is one K-step's [BLOCK_N, BLOCK_K] tile within one block;
    None where a K-step would span two blocks (the pointer path reads those)."""
    if w2.shape[3] % c.block_k:
        return None
    return _descriptor(w2, list(w2.shape), list(w2.stride()), [1, 1, c.block_n, c.block_k])


def _scale_strides(scale: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """(scale, its strides padded to 3 with 0): [N], [N, B], [E, H] or [E, Hb, B]; `dummy` when unquantised."""
    if scale is None or scale.numel() == 0:
        return dummy, 0, 0, 0
    return (scale, *scale.stride(), *(0,) * (3 - scale.dim()))
