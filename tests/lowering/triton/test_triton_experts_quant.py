"""Quantised Triton experts (fp8, fp8_block, int8 tensor-core GEMMs; int4_weight unpacked in the B loads)
through the moe_fx ops, against the
reference lowering's exact quantised arithmetic on the same quantised weights, and against the float64
unquantised block: the Triton result must sit far closer to the first than the quantisation error."""

import math

import pytest
import torch

from moe_fx.lowering import quant
from moe_fx.lowering.triton import grouped_gemm, tuning
from moe_fx.ops import combine_args, dispatch_args, experts_args
from moe_fx.spec import CLAMPED_ACTIVATIONS, GATED_ACTIVATIONS, ExpertsSpec, MoESpec, QuantSpec
from tests.conftest import rel_err
from tests.lowering.test_reference import oracle
from tests.lowering.triton.conftest import DEVICE
from tests.lowering.triton.test_triton_dispatch import routing

OPS = torch.ops.moe_fx
E = 4
MODES = ("fp8", "fp8_block", "int8", "int4_weight")
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's bf16 tl.dot is wrong
# rel err of Triton against the reference on the same quantised operands: only fp32 (Triton) vs float64
# (reference) accumulation and the output dtype's rounding differ. Measured: ~1e-7 in fp32 (interpreter).
AGREE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# On an H100's wgmma tiles (fp8: reduced-precision accumulation): fp8 measured 4.8e-3 (fp32, K=136).
PREFILL_AGREE = {"fp8": 1.5e-2, "fp8_block": 1.5e-2, "int8": 1e-2, "int4_weight": 1e-2}


def layer(x, weights, ids, w13, w2, mode, impl, act="silu_gated", gate_up="concat", b13=None, b2=None,
          placement="output", weight_at=None, scales=None, limit=7.0, reduce=False):  # fmt: skip
    """The four ops; quantised modes quantise the canonical [E, H, D] weights first, as the rewrite does, unless
    `scales` holds the (w13, w2) scales of w13, w2 quantised already. `limit`: the clamped activations'.
    `reduce`: three ops, experts doing combine's sum."""
    D, F_ = w2.shape[1], w13.shape[1] // 2 if act in GATED_ACTIVATIONS else w13.shape[1]
    es = ExpertsSpec(E, D, F_, act, gate_up, False, False, b13 is not None, b2 is not None, limit=limit,
                     dtype=str(x.dtype).removeprefix("torch."))  # fmt: skip
    spec = MoESpec(es, ids.shape[1], quant=QuantSpec(mode), weight_placement=placement)
    if scales is None and mode == "none":
        scales = (None, None)
    elif scales is None:
        (w13, s13), (w2, s2) = quant.quantize_weight(w13, mode), quant.quantize_weight(w2, mode)
        scales = (s13, s2)
    d = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, weights, impl))
    args = list(experts_args(spec, x, d, w13, None, w2, b13, b2, x.dtype, impl, *scales, reduce=reduce))
    if weight_at is not None:  # "output": the routing weight fused into the second GEMM's epilogue
        args[12] = weight_at
    y = OPS.experts(*args)
    if reduce:
        return y
    combine = list(combine_args(spec, y, weights, d, impl))
    combine[4] = args[12] == "none"
    return OPS.combine(*combine)


def weights_for(D, F_, dtype, gated=True):
    w13 = (torch.randn(E, 2 * F_ if gated else F_, D) / D**0.5).to(dtype).to(DEVICE)
    return w13, (torch.randn(E, D, F_) / F_**0.5).to(dtype).to(DEVICE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "T,K,pattern,dtype", [(0, 2, "random", torch.float32), (1, 1, "random", HALF),
                          (17, 2, "one_expert", HALF), (9, 2, "empty", torch.float32)],
)  # fmt: skip
def test_against_reference_and_unquantised(mode, T, K, pattern, dtype):
    D, F_ = 40, 24
    x = torch.randn(T, D).to(dtype).to(DEVICE)
    w13, w2 = weights_for(D, F_, dtype)
    weights, ids = routing(T, K, E, pattern)
    out = layer(x, weights, ids, w13, w2, mode, "triton")
    assert out.shape == (T, D) and out.dtype == dtype
    if T == 0:
        return
    ref = layer(x, weights, ids, w13, w2, mode, "reference")
    w1, w3 = w13.double().cpu().chunk(2, 1)
    exact = oracle(x.double().cpu(), weights.cpu(), ids.cpu(), "silu_gated", w1, w3, w2.double().cpu())
    agree, quant_err = rel_err(out, ref), rel_err(ref.cpu(), exact)
    assert agree < AGREE[dtype] and agree < quant_err / 4, (agree, quant_err)
    assert quant_err < quant.EXPECTED_ERROR[mode]


@pytest.mark.parametrize("mode", MODES)
def test_reduce_in_experts_under_every_mode(mode):
    """experts(reduce=True) sums each token's rows in the down GEMM's epilogue whatever the operands: the same
    quantised block as the four ops, to fp32 rounding (the sum's order alone differs)."""
    T, K, D, F_ = 9, 2, 40, 24
    x = torch.randn(T, D, device=DEVICE)
    w13, w2 = weights_for(D, F_, torch.float32)
    weights, ids = routing(T, K, E, "random")
    out = layer(x, weights, ids, w13, w2, mode, "triton", reduce=True)
    assert out.shape == (T, D) and rel_err(out, layer(x, weights, ids, w13, w2, mode, "triton")) < AGREE[torch.float32]


@pytest.mark.parametrize("mode,D,F_", [("fp8_block", 136, 130), ("int4_weight", 137, 131)])
def test_block_scales_partial_128_groups(mode, D, F_):
    """D and F span two 128-wide groups, the second partial (int4_weight: odd, rows end in half a byte), over
    several K-steps per group: scales per K-block, per weight group and per activation group."""
    T, K = 4, 2
    x = torch.randn(T, D, device=DEVICE)
    w13, w2 = weights_for(D, F_, torch.float32)
    weights, ids = routing(T, K, E, "random")
    out = layer(x, weights, ids, w13, w2, mode, "triton")
    assert rel_err(out, layer(x, weights, ids, w13, w2, mode, "reference")) < AGREE[torch.float32]


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("gate_up", ["concat", "up_first", "interleaved"])
def test_fp8_block_scales_of_each_weight_block(gate_up, swap, monkeypatch):
    """F = D = 256: each up tile's gate and up halves (or interleaved runs) and each 256-wide down tile read two
    128-row weight blocks per K-block, whose scales the kernels load as one scalar per run; every 128×128 block
    and activation group is scaled by its own power of two, so a scale read from the wrong block shows. Swapped,
    the accumulator is [N, M] and the rescale's row and column ratios trade places."""
    rows_k = 16 if DEVICE == "cpu" or swap else 64
    up, down = (tuning.GemmConfig(rows_k, n, 32, 1, 4, 1, swap_ab=swap) for n in (128, 256))
    monkeypatch.setattr(tuning, "choose", lambda *args: tuning.ExpertsConfig(up, down))
    T, K, D, F_ = 8, 2, 256, 256
    w13, w2 = weights_for(D, F_, torch.float32)
    blocks = lambda w: 2.0 ** torch.randint(-4, 5, (E, w.shape[1] // 128, w.shape[2] // 128), device=DEVICE)  # noqa: E731
    w13, w2 = (w * blocks(w).repeat_interleave(128, 1).repeat_interleave(128, 2) for w in (w13, w2))
    x = torch.randn(T, D, device=DEVICE) * torch.tensor([1.0, 16.0], device=DEVICE).repeat_interleave(128)
    weights, ids = routing(T, K, E, "random")
    out = layer(x, weights, ids, w13, w2, "fp8_block", "triton", gate_up=gate_up)
    tol = AGREE[torch.float32] if DEVICE == "cpu" else PREFILL_AGREE["fp8_block"]  # wgmma's e4m3 accumulation
    assert rel_err(out, layer(x, weights, ids, w13, w2, "fp8_block", "reference", gate_up=gate_up)) < tol


# (BLOCK_M, BLOCK_K) of int4 tiles whose group scales multiply the K-step's partial product (2·BLOCK_M <= BLOCK_K)
# or the weights; the interpreter's dots are small
INT4_TILES = {"accumulator": (16, 32), "weights": (32, 32)} if DEVICE == "cpu" else {"accumulator": (16, 128),
                                                                                   "weights": (64, 64)}  # fmt: skip


@pytest.mark.parametrize("scaled", list(INT4_TILES))
def test_int4_every_byte_value(gemm_path, scaled, monkeypatch):
    """Packed weights holding every byte value (every nibble pair, -8 too, which quantize_weight never writes)
    unpack exactly: Triton against the reference on the same packed weights and scales, in fp32 and in HALF (on
    a GPU bf16, whose unpack is inline PTX), with the scales on the accumulator and on the weights."""
    if gemm_path == "tma":
        pytest.skip("int4_weight does not take the tma path")
    block_m, block_k = INT4_TILES[scaled]
    tile = tuning.GemmConfig(
        block_m, 32, block_k, 1, 4, 1, swap_ab=gemm_path == "swap", persistent=gemm_path == "persistent"
    )
    monkeypatch.setattr(tuning, "choose", lambda *args: tuning.ExpertsConfig(tile, tile))
    T, K, D, F_ = 7, 2, 64, 32
    w13 = (torch.randperm(E * 2 * F_ * D // 2) % 256).to(torch.uint8).reshape(E, 2 * F_, D // 2).to(DEVICE)
    w2 = torch.randint(0, 256, (E, D, F_ // 2), dtype=torch.uint8, device=DEVICE)
    scales = (torch.rand(E, 2 * F_, 1, device=DEVICE) / 16, torch.rand(E, D, 1, device=DEVICE) / 16)
    weights, ids = routing(T, K, E, "random")
    for dtype in (torch.float32, HALF):
        x = torch.randn(T, D, device=DEVICE).to(dtype)
        out = layer(x, weights, ids, w13, w2, "int4_weight", "triton", scales=scales)
        ref = layer(x, weights, ids, w13, w2, "int4_weight", "reference", scales=scales)
        assert rel_err(out, ref) < AGREE[dtype], dtype


@pytest.mark.parametrize(
    "mode,act,gate_up,bias,placement,weight_at",
    [("fp8", "gelu", "concat", True, "output", "output"), ("fp8_block", "clamped_swiglu", "interleaved", True,
     "output", None), ("int8", "silu_gated", "up_first", False, "input", None),
     ("fp8", "gelu_tanh_gated", "concat", True, "input", None),
     ("int4_weight", "silu_gated", "interleaved", True, "output", "output"),
     ("int8", "clamped_silu_gated", "concat", True, "output", None),
     ("fp8_block", "clamped_silu_gated", "up_first", False, "input", None),
     ("fp8", "relu2", "concat", True, "input", None), ("int4_weight", "relu2", "concat", False, "output", "output")],
)  # fmt: skip
def test_activations_layouts_biases_weight_placement(mode, act, gate_up, bias, placement, weight_at):
    T, K, D, F_ = 9, 2, 41, 23  # odd: ragged K-tiles, and int4 rows that end in half a byte
    gated = act in GATED_ACTIVATIONS
    x = torch.randn(T, D, device=DEVICE) * 2
    w13, w2 = weights_for(D, F_, torch.float32, gated)
    b13 = torch.randn(E, w13.shape[1], device=DEVICE) if bias else None
    b2 = torch.randn(E, D, device=DEVICE) if bias else None
    weights, ids = routing(T, K, E, "random")
    # the clamped activations at a limit of 2: about a third of the gate and up values (std ~2) lie past it
    kw = dict(act=act, gate_up=gate_up, b13=b13, b2=b2, placement=placement, weight_at=weight_at, limit=2.0)
    out = layer(x, weights, ids, w13, w2, mode, "triton", **kw)
    ref = layer(x, weights, ids, w13, w2, mode, "reference", **kw)
    kw.update(b13=None if b13 is None else b13.double(), b2=None if b2 is None else b2.double())
    exact = layer(x.double(), weights, ids, w13.double(), w2.double(), "none", "reference", **kw)
    agree = rel_err(out, ref)
    assert agree < AGREE[torch.float32] and agree < rel_err(ref, exact) / 100
    if act in CLAMPED_ACTIVATIONS:  # the clamps act on these inputs
        unclamped = layer(
            x.double(), weights, ids, w13.double(), w2.double(), "none", "reference", **kw | {"limit": math.inf}
        )
        assert rel_err(unclamped, exact) > 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gate_up", ["concat", "interleaved", "up_first"])
def test_operand_paths_against_reference(mode, gate_up, gemm_path):
    """Every quant mode through each GEMM path it takes (int4_weight's packed weights never go through TMA).
    One-byte operands need 16-element strides for the copy engine: D, F multiples of
    16, several K-steps and N-tiles, a ragged last N-tile (F = 48 on 32-wide tiles)."""
    if (mode, gemm_path) in (("int4_weight", "tma"), ("fp8_block", "swap")):  # fp8_block: tuning.conform
        pytest.skip(f"{mode} does not take the {gemm_path} path")
    T, K, D, F_ = 13, 2, 96, 48
    x = torch.randn(T, D, device=DEVICE)
    w13, w2 = weights_for(D, F_, torch.float32)
    b13, b2 = torch.randn(E, 2 * F_, device=DEVICE), torch.randn(E, D, device=DEVICE)
    weights, ids = routing(T, K, E, "random")
    kw = dict(gate_up=gate_up, b13=b13, b2=b2)
    out = layer(x, weights, ids, w13, w2, mode, "triton", **kw)
    # the swapped tiles' dots are wgmma's (as the prefill tiles'), whose e4m3 accumulation is not full fp32
    wgmma_e4m3 = DEVICE == "cuda" and gemm_path == "swap" and mode in ("fp8", "fp8_block")
    tol = PREFILL_AGREE[mode] if wgmma_e4m3 else AGREE[torch.float32]
    assert rel_err(out, layer(x, weights, ids, w13, w2, mode, "reference", **kw)) < tol


@pytest.mark.parametrize("mode", ("none", "fp8", "fp8_block", "int8"))
@pytest.mark.parametrize("flags", ["tma swap_ab", "tma persistent", "tma swap_ab persistent"])
def test_combined_paths_against_reference(mode, flags, monkeypatch):
    """The operand paths together (the gemm_path fixture takes them one at a time; a GPU's prefill configs
    combine TMA with the others): 32-row tiles, several K-steps, N-tiles and (persistent) tiles per program."""
    if mode == "fp8_block" and "swap_ab" in flags:
        pytest.skip("fp8_block does not swap its operands (tuning.conform)")
    tile = tuning.GemmConfig(32, 32, 32, 1, 4, 1, **dict.fromkeys(flags.split(), True))
    monkeypatch.setattr(tuning, "choose", lambda *args: tuning.ExpertsConfig(tile, tile))
    T, K, D, F_ = 48, 2, 96, 64
    x = torch.randn(T, D, device=DEVICE)
    w13, w2 = weights_for(D, F_, torch.float32)
    weights, ids = routing(T, K, E, "random")
    grouped_gemm.loads.clear()
    out = layer(x, weights, ids, w13, w2, mode, "triton")
    path = "tma+" + "+".join(f for f in ("swap", "persistent") if f in flags)
    assert dict(grouped_gemm.loads) == {f"up/{path}": 1, f"down/{path}": 1}
    ref = layer(x, weights, ids, w13, w2, mode, "reference")
    # swapped, the weights fill wgmma's 64-row side, whose e4m3 accumulation is not full fp32
    wgmma_e4m3 = DEVICE == "cuda" and "swap_ab" in flags and mode in ("fp8", "fp8_block")
    assert rel_err(out, ref) < (PREFILL_AGREE[mode] if wgmma_e4m3 else AGREE[torch.float32])


@pytest.mark.parametrize("mode", MODES)
def test_nan_token_stays_in_its_rows(mode):
    T, K, D, F_ = 6, 2, 40, 24
    x = torch.randn(T, D, device=DEVICE)
    w13, w2 = weights_for(D, F_, torch.float32)
    weights, ids = routing(T, K, E, "random")
    clean = layer(x, weights, ids, w13, w2, mode, "triton")
    x[3, 5] = float("nan")
    poisoned = layer(x, weights, ids, w13, w2, mode, "triton")
    others = [0, 1, 2, 4, 5]
    assert torch.equal(poisoned[others], clean[others]) and torch.isnan(poisoned[3]).all()


@pytest.mark.skipif(DEVICE != "cuda", reason="the prefill tiles' tensor-core path needs a GPU")
@pytest.mark.parametrize("mode", ("none", *MODES))
def test_prefill_tiles_on_every_path(mode, gemm_path):
    """128 rows per expert on the 64/128-row tiles, through pointers, TMA, swapped operands and persistent
    programs (whose tile and K loops Triton flattens into one only when it compiles: the interpreter runs them
    as written). D, F multiples of 16 elements so that one-byte operands fit the copy engine."""
    if (mode, gemm_path) in (("int4_weight", "tma"), ("fp8_block", "swap")):  # fp8_block: tuning.conform
        pytest.skip(f"{mode} does not take the {gemm_path} path")
    T, K, D, F_ = 256, 2, 192, 160
    x = torch.randn(T, D, device=DEVICE).to(torch.bfloat16)
    w13, w2 = weights_for(D, F_, torch.bfloat16)
    weights, ids = routing(T, K, E, "random")
    out = layer(x, weights, ids, w13, w2, mode, "triton")
    ref = layer(x, weights, ids, w13, w2, mode, "reference")
    assert rel_err(out, ref) < (AGREE[torch.bfloat16] if mode == "none" else PREFILL_AGREE[mode])


@pytest.mark.skipif(DEVICE != "cuda", reason="the prefill tiles' tensor-core path needs a GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_tiles_on_tensor_cores(mode, dtype):
    """128 rows per expert: the 64/128-row tiles (wgmma on Hopper). Triton lets sm90's fp8 MMA accumulate in
    the tensor core's reduced precision, so fp8 agrees less tightly here than on the decode tiles; the
    re-quantisation between the GEMMs turns accumulation error into rounding flips of the activation."""
    T, K, D, F_ = 256, 2, 136, 130
    x = torch.randn(T, D).to(dtype).to(DEVICE)
    w13, w2 = weights_for(D, F_, dtype)
    weights, ids = routing(T, K, E, "random")
    out = layer(x, weights, ids, w13, w2, mode, "triton")
    ref = layer(x, weights, ids, w13, w2, mode, "reference")
    w1, w3 = w13.double().cpu().chunk(2, 1)
    exact = oracle(x.double().cpu(), weights.cpu(), ids.cpu(), "silu_gated", w1, w3, w2.double().cpu())
    agree, quant_err = rel_err(out, ref), rel_err(ref.cpu(), exact)
    assert agree < PREFILL_AGREE[mode] and agree < quant_err / 8, (agree, quant_err)


FUSED_N = 32  # the fused tests' F-slice: F_ = 48 is one whole slice and a ragged one
# Fused against `per_slice_oracle`: h is quantised from fp32 values in both, which on a GPU's tensor cores (fp8:
# reduced-precision accumulation) differ from float64's in the last bits; the few elements of h that round to the
# other e4m3 / int8 neighbour then (one step: 6 % / 1 %) move the output by ~1e-2 (measured on an H100: 1.7e-2)
FUSED_AGREE = {dtype: AGREE[dtype] if DEVICE == "cpu" else 3e-2 for dtype in AGREE}


def fused_config(monkeypatch):
    """Every choice a fused config of FUSED_N-wide F-slices and 32-wide column blocks of w2, 32-deep K-steps."""
    gemm = tuning.GemmConfig(16, FUSED_N, 32, 1, 4, 1)
    monkeypatch.setattr(tuning, "_choose", lambda *args: tuning.ExpertsConfig(gemm, gemm, fused=True))


def per_slice_oracle(x, weights, ids, w13q, s13, w2q, s2, mode, act="silu_gated"):
    """float64 out_TD of a fused config's quantised arithmetic: x quantised per token, each expert's h per row of
    every FUSED_N-wide F-slice (the reference quantises h per row); dropped picks (id -1) add nothing."""
    from moe_fx.lowering.reference import activate

    x, weights, ids, w13q, s13, w2q, s2 = (t.cpu() for t in (x, weights, ids, w13q, s13, w2q, s2))
    xq, xs = quant.quantize_rows(x, mode)
    D, F_ = w2q.shape[1], w2q.shape[2]
    out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for t, k in zip(*torch.nonzero(ids >= 0, as_tuple=True)):
        e = ids[t, k]
        h = quant.quantised_matmul(xq[t : t + 1], xs[t : t + 1], w13q[e], s13[e], mode, x.shape[1]).float()
        a = activate(h, act, "concat", 1.702, 7.0)
        for f0 in range(0, F_, FUSED_N):
            aq, a_scale = quant.quantize_rows(a[:, f0 : f0 + FUSED_N], mode)
            y = quant.quantised_matmul(aq, a_scale, w2q[e][:, f0 : f0 + FUSED_N], s2[e], mode, aq.shape[1])
            out[t] += weights[t, k].double() * y[0]
    return out


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("T,K,pattern", [(1, 2, "random"), (9, 2, "dropped"), (17, 2, "one_expert")])
def test_fused_quantises_h_per_row_of_each_slice(mode, dtype, T, K, pattern, monkeypatch):
    """A fused config under fp8 / int8: one kernel; each up tile quantises its rows' F-slice of h with a scale of
    its own and the down slice dequantises its product by it and by w2's channel scales. Equal to that arithmetic
    in float64 (outputs poisoned), and as close to the unquantised block as the reference's per-row scales."""
    fused_config(monkeypatch)
    D, F_ = 40, 48
    x = torch.randn(T, D).to(dtype).to(DEVICE)
    w13, w2 = weights_for(D, F_, dtype)
    weights, ids = routing(T, K, E, pattern)
    weights = weights.masked_fill(ids < 0, 0.0)  # as route leaves dropped picks
    (w13q, s13), (w2q, s2) = quant.quantize_weight(w13, mode), quant.quantize_weight(w2, mode)
    before = grouped_gemm.loads.copy()
    out = layer(x, weights, ids, w13q, w2q, mode, "triton", scales=(s13, s2), reduce=True)
    assert [k.split("/")[0] for k in (grouped_gemm.loads - before).elements()] == ["fused"]
    assert out.shape == (T, D) and out.dtype == dtype and torch.isfinite(out).all()
    exact_q = per_slice_oracle(x, weights, ids, w13q, s13, w2q, s2, mode)
    assert rel_err(out.cpu(), exact_q) < FUSED_AGREE[dtype]
    w1, w3 = w13.double().cpu().chunk(2, 1)
    exact = oracle(x.double().cpu(), weights.cpu(), ids.clamp_min(0).cpu(), "silu_gated", w1, w3, w2.double().cpu())
    per_row = layer(x, weights, ids, w13q, w2q, mode, "reference", scales=(s13, s2))
    assert rel_err(exact_q, exact) < max(1.25 * rel_err(per_row.cpu(), exact), AGREE[dtype])


@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize(
    "tile,width",
    [("pointers", 32), ("tma", 32), ("tma", 16), ("tma swap_ab persistent", 64), ("fused", 32), ("fused", 16)],
)  # fmt: skip
def test_w2_in_column_blocks_gives_the_canonical_result(mode, tile, width, monkeypatch):
    """w2 stored in column blocks (`quant.block_columns`, [E, ceil(F/width), D, width], zeros past F) through every
    path that reads it: the down GEMM's pointer and TMA loads (a 32-deep K-step within a block, or spanning two
    16-wide ones: the pointer path then), persistent and swapped tiles, the fused kernel's down slices. The
    same values in the same order: the same output as the canonical [E, D, F] (F = 48: a ragged last block)."""
    if tile == "fused":
        fused_config(monkeypatch)
    else:
        gemm = tuning.GemmConfig(32, 32, 32, 1, 4, 1, **dict.fromkeys(tile.replace("pointers", "").split(), True))
        monkeypatch.setattr(tuning, "choose", lambda *args: tuning.ExpertsConfig(gemm, gemm))
    T, K, D, F_ = 13, 2, 96, 48
    x = torch.randn(T, D, device=DEVICE)
    w13, w2 = weights_for(D, F_, torch.float32)
    weights, ids = routing(T, K, E, "random")
    (w13q, s13), (w2q, s2) = quant.quantize_weight(w13, mode), quant.quantize_weight(w2, mode)
    blocked = quant.block_columns(w2q, width)
    assert blocked.shape == (E, -(-F_ // width), D, width)
    kw = dict(scales=(s13, s2), reduce=tile == "fused")
    grouped_gemm.loads.clear()
    out = layer(x, weights, ids, w13q, blocked, mode, "triton", **kw)
    expected_down = {"fused": "fused/pointers", "pointers": "down/pointers", "tma swap_ab persistent":
                     "down/tma+swap+persistent"}.get(tile, "down/tma" if width >= 32 else "down/pointers")  # fmt: skip
    assert expected_down in grouped_gemm.loads, dict(grouped_gemm.loads)
    canonical = layer(x, weights, ids, w13q, w2q, mode, "triton", **kw)
    assert torch.isfinite(out).all() and rel_err(out, canonical) < 1e-6
    reference = layer(x, weights, ids, w13q, blocked, mode, "reference", scales=(s13, s2))
    assert torch.equal(reference, layer(x, weights, ids, w13q, w2q, mode, "reference", scales=(s13, s2)))


def test_w2_in_column_blocks_is_refused_where_it_does_not_fit():
    """A blocked w2 whose blocks do not cover F, or whose D is not the model's, is a `moe_fx:` error naming both."""
    D, F_ = 32, 48
    w13, w2 = weights_for(D, F_, torch.float32)
    (w13q, s13), (w2q, s2) = quant.quantize_weight(w13, "fp8"), quant.quantize_weight(w2, "fp8")
    x = torch.randn(3, D, device=DEVICE)
    weights, ids = routing(3, 2, E, "random")
    for bad in (quant.block_columns(w2q, 16)[:, :2], quant.block_columns(w2q, 16).transpose(1, 2)):
        with pytest.raises(ValueError, match="moe_fx: a w2 in column blocks"):
            layer(x, weights, ids, w13q, bad, "fp8", "triton", scales=(s13, s2))
