"""Triton experts (through the moe_fx ops, with triton dispatch and combine) against the float64 oracle."""

from dataclasses import replace

import pytest
import torch

from moe_fx.lowering.triton import grouped_gemm, tuner, tuning
from moe_fx.ops import combine_args, dispatch_args, experts_args, weight_at
from moe_fx.spec import ExpertsSpec, MoESpec
from tests.conftest import TOLERANCE, fuse_every_config, rel_err
from tests.lowering.test_reference import ACT, PLAIN, UNCLAMPED, oracle, unclamped_oracle
from tests.lowering.triton.conftest import DEVICE, DTYPES
from tests.lowering.triton.test_triton_dispatch import routing

OPS = torch.ops.moe_fx
E = 4


def run(x, weights, ids, w13, w3, w2, b13, b2, act, gate_up="concat", t13=False, t2=False, placement="output",
        impl="triton", spec_weight_at=None, num_experts=E, reduce=False):  # fmt: skip
    """The four ops (three with `reduce`: experts does combine's sum)."""
    F_ = w2.shape[1] if t2 else w2.shape[2]
    experts = ExpertsSpec(num_experts, x.shape[1], F_, act, gate_up, t13, t2, b13 is not None, b2 is not None,
                          dtype=str(x.dtype).removeprefix("torch."))  # fmt: skip
    spec = MoESpec(experts, ids.shape[1], weight_placement=placement)
    dispatched = OPS.quantize_dispatch(*dispatch_args(spec, x, ids, weights, "triton"))
    args = list(experts_args(spec, x, dispatched, w13, w3, w2, b13, b2, x.dtype, impl, reduce=reduce))
    if spec_weight_at is not None:  # "output": the routing weight fused into the second GEMM
        args[12] = spec_weight_at
    y = OPS.experts(*args)
    if reduce:
        return y
    combine = list(combine_args(spec, y, weights, dispatched, "triton"))
    combine[4] = args[12] == "none"
    return OPS.combine(*combine)


def weights_for(dtype, D, FF, bias=False, scale=(4, 4, 5), num_experts=E):
    n = num_experts
    w1, w3, w2 = (torch.randn(n, FF, D) / scale[0], torch.randn(n, FF, D) / scale[1], torch.randn(n, D, FF) / scale[2])
    b = (torch.randn(n, FF), torch.randn(n, FF), torch.randn(n, D)) if bias else (None, None, None)
    return [t if t is None else t.to(dtype) for t in (w1, w3, w2, *b)]


def dev(*ts):
    return [t if t is None else t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,pattern", [(1, 1, "random"), (7, 2, "random"), (7, 4, "random"),
                                         (33, 2, "one_expert"), (9, 2, "empty")])  # fmt: skip
@pytest.mark.parametrize("D,FF", [(24, 20), (32, 32)])  # ragged and even K-loops
def test_silu_gated_against_oracle(dtype, T, K, pattern, D, FF, gemm_path):
    x = torch.randn(T, D).to(dtype)
    w1, w3, w2, *_ = weights_for(dtype, D, FF)
    weights, ids = routing(T, K, E, pattern)
    out = run(*dev(x, weights, ids, torch.cat([w1, w3], 1), None, w2), None, None, "silu_gated")
    assert out.shape == (T, D) and out.dtype == dtype
    ref = oracle(x, weights.cpu(), ids.cpu(), "silu_gated", w1, w3, w2)
    assert rel_err(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("T,K,pattern", [(1, 8, "random"), (3, 8, "random"), (5, 4, "dropped"), (3, 8, "one")])
def test_more_experts_than_rows(T, K, pattern, monkeypatch):
    """R = T·K < E: the grid's M-tiles are cdiv(R, BLOCK_M) + R (each hit expert adds at most one partial
    tile; the dropped rows' zero tiles are fewer), not + E; "one": 17 of the 24 rows on expert 7 (two 16-row
    tiles in the interpreter), the rest apart."""
    num_experts, D, FF = 40, 24, 20
    x = torch.randn(T, D)
    w1, w3, w2, *_ = weights_for(torch.float32, D, FF, num_experts=num_experts)
    weights, ids = routing(T, K, num_experts, "random" if pattern == "one" else pattern)
    if pattern == "one":
        ids = torch.cat([torch.full((17,), 7), torch.arange(10, 10 + T * K - 17)]).view(T, K)
        ids = ids.to(torch.int32).to(DEVICE)
    weights = weights.masked_fill(ids < 0, 0.0)  # dropped picks: as route leaves them
    grids, tiles = [], []  # tiles: (BLOCK_M, BLOCK_N) each launch ran with (the interpreter's 16×16, a GPU's own)
    real_launch = grouped_gemm.launch

    def recording_launch(kernel, grid, *a, **kw):
        grids.append(grid)
        tiles.append((kw["BLOCK_M"], kw["BLOCK_N"]))
        return real_launch(kernel, grid, *a, **kw)

    monkeypatch.setattr(grouped_gemm, "launch", recording_launch)
    out = run(*dev(x, weights, ids, torch.cat([w1, w3], 1), None, w2), None, None, "silu_gated",
              num_experts=num_experts)  # fmt: skip
    ref = oracle(x, weights.cpu(), ids.clamp_min(0).cpu(), "silu_gated", w1, w3, w2)  # weight 0: nothing added
    assert rel_err(out.cpu(), ref) < TOLERANCE[torch.float32]
    R, cdiv = T * K, lambda a, b: (a + b - 1) // b
    (up_m, up_n), (down_m, down_n) = tiles
    assert grids[0] == ((cdiv(R, up_m) + R) * cdiv(FF, up_n),)  # up
    assert grids[1] == ((cdiv(R, down_m) + R) * cdiv(D, down_n),)  # down


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_tokens(dtype):
    w1, w3, w2, *_ = weights_for(dtype, 24, 20)
    weights, ids = routing(0, 2, E, "random")
    out = run(*dev(torch.randn(0, 24).to(dtype), weights, ids, torch.cat([w1, w3], 1), None, w2), None, None,
              "silu_gated")  # fmt: skip
    assert out.shape == (0, 24) and out.dtype == dtype


@pytest.mark.parametrize("act", [*ACT, *PLAIN])
@pytest.mark.parametrize(
    "layout", ["concat", "interleaved", "up_first", "separate", "transposed", "interleaved_transposed"]
)  # interleaved_transposed: GPT-OSS's [E, D, 2F] storage
def test_activations_layouts_biases(act, layout, gemm_path):
    T, K, D, FF = 9, 2, 16, 24
    if act in PLAIN and layout not in ("concat", "transposed"):
        pytest.skip("layouts only differ for gated experts")
    x = torch.randn(T, D) * 2
    w1, w3, w2, b1, b3, b2 = weights_for(torch.float32, D, FF, bias=True, scale=(3, 3, 4))
    weights, ids = routing(T, K, E, "random")
    ref = oracle(x, weights.cpu(), ids.cpu(), act, w1, w3, w2, b1, b3, b2)
    out = run(*dev(x, weights, ids), *stored(act, layout, w1, w3, w2, b1, b3, b2), act, *storage(layout))
    assert rel_err(out.cpu(), ref) < TOLERANCE[torch.float32]
    if act in UNCLAMPED:  # the inputs reach the limit (7): the clamps change the result
        assert rel_err(unclamped_oracle(x, weights.cpu(), ids.cpu(), act, w1, w3, w2, b1, b3, b2), ref) > 1e-3


def storage(layout):
    """(gate_up, w13 transposed, w2 transposed) of a test layout."""
    t = layout.endswith("transposed")
    return {"transposed": "concat", "interleaved_transposed": "interleaved"}.get(layout, layout), t, t


def stored(act, layout, w1, w3, w2, b1, b3, b2):
    """(w13, w3, w2, b13, b2) on the device, as `layout` stores the gate (w1), up (w3) and down (w2) weights."""
    gate_up, t, _ = storage(layout)
    w3_arg = None
    if act in PLAIN:
        w13, b13 = w1, b1
    elif gate_up == "interleaved":
        w13, b13 = torch.stack([w1, w3], dim=2).reshape(E, -1, w1.shape[2]), torch.stack([b1, b3], dim=2).reshape(E, -1)
    elif layout == "up_first":
        w13, b13 = torch.cat([w3, w1], 1), torch.cat([b3, b1], 1)
    elif layout == "separate":
        w13, w3_arg, b13 = w1, w3, torch.cat([b1, b3], 1)
    else:
        w13, b13 = torch.cat([w1, w3], 1), torch.cat([b1, b3], 1)
    if t:
        w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    return dev(w13, w3_arg, w2, b13, b2)


@pytest.mark.parametrize("where", ["input", "output"])
def test_routing_weight_inside_experts(where):
    T, K, D, FF = 6, 2, 16, 24
    x = torch.randn(T, D)
    w1, w3, w2, *_ = weights_for(torch.float32, D, FF)
    weights, ids = routing(T, K, E, "random")
    w13 = torch.cat([w1, w3], 1)
    out = run(*dev(x, weights, ids, w13, None, w2), None, None, "silu_gated", placement=where,
              spec_weight_at="output" if where == "output" else None)  # fmt: skip
    ref = oracle(x, weights.cpu(), ids.cpu(), "silu_gated", w1, w3, w2, weight_on_input=where == "input")
    assert rel_err(out.cpu(), ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("placement", ["output", "input"])
def test_routing_weight_applied_exactly_once(placement):
    spec = MoESpec(ExpertsSpec(E, 8, 8), 2, weight_placement=placement)
    dispatched = tuple(torch.zeros(1) for _ in range(7))
    experts_weight = experts_args(spec, None, dispatched, *[None] * 6, "triton")[12]
    combine_weighted = combine_args(spec, None, None, dispatched, "triton")[4]
    assert (experts_weight != "none") != combine_weighted
    assert experts_weight == weight_at(spec) and (placement != "input" or experts_weight == "input")


@pytest.mark.parametrize("weight_in_experts", [False, True])
@pytest.mark.parametrize("T,K", [(1, 2), (9, 2), (40, 4)])
def test_dropped_picks_contribute_nothing(T, K, weight_in_experts, gemm_path):
    """Picks with id -1 (token capacity, zero-computation experts): dispatch puts them after the groups, the
    down GEMM writes them zeros (the outputs are poisoned first), combine adds nothing for them, whether
    the routing weight is applied in the experts' epilogue or in combine."""
    D, FF = 16, 24
    x = torch.randn(T, D)
    w1, w3, w2, *_ = weights_for(torch.float32, D, FF)
    weights, ids = routing(T, K, E, "dropped")
    weights = weights.masked_fill(ids < 0, 0.0)  # as route and the identity split leave them
    out = run(*dev(x, weights, ids, torch.cat([w1, w3], 1), None, w2), None, None, "silu_gated",
              spec_weight_at="output" if weight_in_experts else None)  # fmt: skip
    ref = oracle(x, weights.cpu(), ids.clamp_min(0).cpu(), "silu_gated", w1, w3, w2)  # weight 0: nothing added
    assert torch.isfinite(out).all() and rel_err(out.cpu(), ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,pattern", [(0, 2, "random"), (1, 4, "random"), (7, 2, "one_expert"), (33, 2, "empty"),
                                         (40, 4, "dropped"), (64, 4, "random")])  # fmt: skip
@pytest.mark.parametrize("placement", ["output", "input"])
def test_reduce_sums_each_tokens_rows(dtype, T, K, pattern, placement, gemm_path):
    """experts(reduce=True) returns combine's out_TD itself: the down GEMM's epilogue adds each row, weighted
    unless the weight went in before w13 (placement "input"), into its token's row, which the up GEMM's programs
    zero first (the outputs are poisoned: a row left unwritten shows); dropped picks add nothing."""
    out, ref = summed_rows(dtype, T, K, pattern, placement, 24, 20)
    assert T == 0 or rel_err(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,pattern", [(1, 4, "random"), (7, 2, "one_expert"), (33, 2, "empty"),
                                         (40, 4, "dropped")])  # fmt: skip
@pytest.mark.parametrize("placement", ["output", "input"])
def test_fused_down_sums_each_tokens_rows(dtype, T, K, pattern, placement, gemm_path, monkeypatch):
    """A fused config (`ExpertsConfig.fused`): one kernel, each up tile's F-slice of activations through w2's
    F-slice in its epilogue, the partial products summed in fp32 and cast by the last program, b2 added once per
    row; against the float64 oracle, outputs poisoned, with every load path of the up tile."""
    fuse_every_config(monkeypatch)  # over the gemm_path fixture's choice
    before = grouped_gemm.loads.copy()
    # D, FF: three ragged F-slices and two ragged column blocks of w2 in the interpreter's 16-wide tiles
    out, ref = summed_rows(dtype, T, K, pattern, placement, 24, 40)
    assert [k.split("/")[0] for k in (grouped_gemm.loads - before).elements()] == ["fused"]  # one launch
    assert rel_err(out.cpu(), ref) < TOLERANCE[dtype]


def summed_rows(dtype, T, K, pattern, placement, D, FF):
    """(experts(reduce=True)'s out_TD, the float64 oracle) for silu-gated experts with b2 (none where a dropped
    pick's zero-weighted input would run it in the oracle), dropped picks zero-weighted as route leaves them;
    asserts out's shape, dtype and that every element was written (the outputs are poisoned)."""
    x = torch.randn(T, D).to(dtype)
    w1, w3, w2, _, _, b2 = weights_for(dtype, D, FF, bias=True)
    if placement == "input" and pattern == "dropped":
        b2 = None  # the oracle would run a dropped pick on its zero-weighted input: b2, where dispatch drops it
    weights, ids = routing(T, K, E, pattern)
    weights = weights.masked_fill(ids < 0, 0.0)  # as route leaves dropped picks
    out = run(*dev(x, weights, ids, torch.cat([w1, w3], 1), None, w2, None, b2), "silu_gated", placement=placement,
              reduce=True)  # fmt: skip
    assert out.shape == (T, D) and out.dtype == dtype and torch.isfinite(out).all()
    ref = oracle(x, weights.cpu(), ids.clamp_min(0).cpu(), "silu_gated", w1, w3, w2, b2=b2,
                 weight_on_input=placement == "input")  # fmt: skip
    return out, ref


@pytest.mark.parametrize("act,layout", [("gelu", "transposed"), ("clamped_swiglu", "interleaved_transposed"),
                                        ("silu_gated", "separate"), ("gelu_tanh_gated", "up_first")])  # fmt: skip
def test_fused_down_layouts_and_activations(act, layout, monkeypatch):
    """The fused kernel on GPT-OSS's storage (interleaved gate/up, both weights transposed: w2's F-slice is then
    rows, not columns), a plain activation, separate and up-first gate/up, with both biases, against the oracle."""
    monkeypatch.setattr(tuning, "_choose", lambda *args: replace(tuning.default_config(1, torch.float32), fused=True))
    T, K, D, FF = 9, 2, 24, 40
    x = torch.randn(T, D) * 2
    w1, w3, w2, b1, b3, b2 = weights_for(torch.float32, D, FF, bias=True, scale=(3, 3, 4))
    weights, ids = routing(T, K, E, "random")
    before = grouped_gemm.loads.copy()
    out = run(*dev(x, weights, ids), *stored(act, layout, w1, w3, w2, b1, b3, b2), act, *storage(layout),
              reduce=True)  # fmt: skip
    assert [k.split("/")[0] for k in (grouped_gemm.loads - before).elements()] == ["fused"]
    ref = oracle(x, weights.cpu(), ids.cpu(), act, w1, w3, w2, b1, b3, b2)
    assert rel_err(out.cpu(), ref) < TOLERANCE[torch.float32]


def test_tuning_times_the_reduce_path():
    """`tuner.experts_call(reduce=True)`, what `tuner.tune` times where the rewrite sums in experts, returns the
    tokens' out_TD: the stored rows of the same call summed by combine."""
    from moe_fx.lowering.triton import combine

    weights = tuner.random_weights(E, 32, 32, "silu_gated", torch.float32, DEVICE)
    runs = []
    for reduce in (False, True):
        torch.manual_seed(1)  # the same tokens and routing
        runs.append(tuner.experts_call(9, 2, "silu_gated", torch.float32, weights, reduce=reduce))
    plain, summed = runs
    assert all(torch.equal(a, b) for a, b in zip(plain.inputs, summed.inputs))
    ref = combine.combine(plain(), plain.inputs[2], plain.row_index, True)
    out = summed()
    assert out.shape == (9, 32) and rel_err(out.cpu(), ref.cpu()) < TOLERANCE[torch.float32]
