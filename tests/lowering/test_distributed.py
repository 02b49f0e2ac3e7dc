"""Parallel layouts on real multi-process gloo groups (2 and 4 ranks, spawned on localhost).

Every rank's output must equal single-process eager on its own tokens (rel err < 1e-5 in fp32), with
uneven token counts per rank and experts that get no tokens. Quantised layouts must equal the
single-process quantised block on the rank's own tokens within QUANT_TOL = 1e-6: rows are quantised per
token before the exchange exactly as on one device and the experts run the same quantised arithmetic
(float64 products), so only float32 summation order in combine can differ. Process start-up dominates the cost, so
each spawned job runs several checks; the rank functions are module-level so spawned processes can
import them.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist

import moe_fx
from moe_fx import examples as ex
from moe_fx.lowering.distributed import exchanges, plan_shard
from moe_fx.lowering.quant import activation_dtype, quantize_weight
from moe_fx.ops import combine_args, dispatch_args, experts_args, route_args
from moe_fx.spec import ExpertsSpec, MoESpec, QuantSpec, RouterSpec
from tests.conftest import rel_err
from tests.lowering.ranks import run_ranks

TOL = 1e-5
QUANT_TOL = 1e-6
QUANT_MODES = ("fp8", "fp8_block", "int8", "int4_weight")


def _tokens(rank: int, T: int, D: int, batch: bool = False) -> torch.Tensor:
    torch.manual_seed(100 + rank)
    return torch.randn(1, T, D) if batch else torch.randn(T, D)


def _check(model, ref_model, x, what: str) -> None:
    with torch.no_grad():
        out, ref = model(x), ref_model(x)
    err = rel_err(out, ref)
    assert err < TOL, f"rank {dist.get_rank()} {what}: rel err {err:.2e}"


def _model(cls, **kw):
    torch.manual_seed(0)  # the same weights on every rank
    model = cls(**kw).eval()
    return model, copy.deepcopy(model)


def _param_numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _quantised_layer(layout: str, mode: str, T: int, rank: int, placement=None, E=6, D=160, F=32, K=2, bound=0):
    """(this rank's output under `layout`, the single-process quantised output and the unquantised one on
    the same tokens), through the ops; expert E-1 never gets a token. `bound`: max_tokens_per_rank."""
    spec = MoESpec(ExpertsSpec(E, D, F), K, RouterSpec(K, renormalize=True), QuantSpec(mode), layout=layout,
                   max_tokens_per_rank=bound)  # fmt: skip
    shard = plan_shard(spec, None, placement, "cpu")
    torch.manual_seed(0)  # the same weights on every rank
    w13, w2 = torch.randn(E, 2 * F, D) / D**0.5, torch.randn(E, D, F) / F**0.5
    full = (*quantize_weight(w13, mode), *quantize_weight(w2, mode))
    x_TD, logits_TE = _tokens(rank + 20, T, D), _tokens(rank + 30, T, E)
    logits_TE[:, E - 1] = -1e4
    ops = torch.ops.moe_fx

    def run(spec, weights, impl, group="", expert_map=None, L=E):
        w_TK, ids_TK = ops.route(*route_args(spec.router, logits_TE, None, "reference"))
        d = ops.quantize_dispatch(*dispatch_args(spec, x_TD, ids_TK, w_TK, impl, group, expert_map, L))
        assert d[0].dtype == activation_dtype(spec.quant.mode, x_TD.dtype)  # the rows that travelled
        w13_, w13_scale, w2_, w2_scale = weights
        y = ops.experts(
            *experts_args(spec, x_TD, d, w13_, None, w2_, None, None, x_TD.dtype, "reference", w13_scale, w2_scale)
        )
        return ops.combine(*combine_args(spec, y, w_TK, d, impl, group))

    impl = {"ep_alltoall": "ep_all_to_all", "ep_allgather": "ep_all_gather"}[layout]
    impl = "ep_all_to_all_padded" if bound else impl
    local = tuple(shard.experts_of(t) for t in full)
    out = run(spec, local, impl, shard.group_name, shard.expert_map(x_TD.device), shard.num_local_experts(E))
    one_device = spec.replace(layout="single", max_tokens_per_rank=0)
    single = run(one_device, full, "reference")
    plain = run(one_device.replace(quant=QuantSpec()), (w13, None, w2, None), "reference")
    return out, single, plain


def _check_quantised(layout: str, mode: str, T: int, rank: int, placement=None, bound=0) -> None:
    out, single, plain = _quantised_layer(layout, mode, T, rank, placement, bound=bound)
    what = f"rank {rank} {layout} {mode} T={T} max_tokens_per_rank={bound}"
    assert rel_err(out, single) < QUANT_TOL, f"{what}: rel err {rel_err(out, single):.2e} to the single-process block"
    if T:
        assert rel_err(out, plain) > 1e-3, f"{what}: indistinguishable from unquantised"


def _quantised_two_ranks(rank: int, world: int) -> None:
    # every mode on both expert-parallel layouts through the ops; uneven T (one rank with none), E-1 idle
    for layout in ("ep_alltoall", "ep_allgather"):
        for mode in QUANT_MODES:
            for T in ((3, 8)[rank], (0, 5)[rank]):
                _check_quantised(layout, mode, T, rank)

    # a checkpoint holding fp8_block experts, ep_alltoall through apply: each rank reads its experts of the
    # model's own e4m3 parameters (views: the same storage), and equals single-process apply on its tokens
    model, single = _model(ex.QuantisedCheckpointMoE)
    x = _tokens(rank + 40, (4, 9)[rank], 160)
    report = moe_fx.apply(model, x, options={"layout": "ep_alltoall"})
    moe_fx.apply(single, x)
    assert report.matches[0].spec.quant.mode == "fp8_block" and "taken as they are" in str(report), str(report)
    assert report.matches[0].errors["verified (one device)"] < 8e-2  # the math, on one device (passes/verify.py)
    gm = model.forward.gm
    assert gm.moe_fx_block0_w13_q.untyped_storage().data_ptr() == model.w13_q.untyped_storage().data_ptr()
    assert gm.moe_fx_block0_w13_q.shape[0] == 2  # this rank's 2 of 4 experts
    for T in ((4, 9)[rank], (1, 6)[rank]):
        _check(model, single, _tokens(rank + 50, T, 160), f"pre-quantised ep_alltoall T={T}")

    # a quantised format moe_fx does not read is not sharded as a dequantised copy
    model, _ = _model(ex.QuantisedCheckpointMoE, block=64)
    report = moe_fx.explain(model, x, options={"layout": "ep_alltoall"})
    assert not report.matches and "cannot be sharded for layout 'ep_alltoall'" in report.rejections[-1].reason

    # int8 through torch.compile, ep_allgather, against single-process compile with int8
    model, ref_model = _model(ex.LoopMoE)
    compiled = torch.compile(model, backend="moe_fx", options={"inner": "eager", "layout": "ep_allgather",
                                                                "quant": "int8"})  # fmt: skip
    single = torch.compile(ref_model, backend="moe_fx", options={"inner": "eager", "quant": "int8"})
    _check(compiled, single, _tokens(rank + 60, (5, 2)[rank], 32), "int8 ep_allgather compile")

    # tp refuses quant with the reason
    model, _ = _model(ex.LoopMoE)
    report = moe_fx.explain(model, _tokens(0, 4, 32), options={"layout": "tp", "quant": "fp8"})
    assert not report.matches and "not implemented for layout 'tp'" in report.rejections[-1].reason, str(report)


_PROBED: list[int] = []  # exchanges in flight each time the shared expert's probe ran


@torch.library.custom_op("moe_fx_test::probe", mutates_args=())
def _probe(x: torch.Tensor) -> torch.Tensor:
    """The identity, noting how many dispatch exchanges are in flight when the shared expert starts."""
    _PROBED.append(exchanges.in_flight())
    return x.clone()


@_probe.register_fake
def _(x):
    return torch.empty_like(x)


class _Probe(torch.nn.Module):
    def forward(self, x):
        return torch.ops.moe_fx_test.probe(x)


def _shared_expert_overlaps(rank: int) -> None:
    """ep_alltoall moves a block's shared expert between its dispatch and experts: it runs while the rows
    travel (one exchange in flight at its first op), through apply and torch.compile, with Inductor (which
    orders the graph itself: data edges pin it) and without; overlap_shared=False keeps it after the block.
    The outputs equal single-process eager either way."""
    for via, overlap in (("apply", True), ("eager", True), ("inductor", True), ("apply", False)):
        model, ref_model = _model(ex.DeepSeekStyleMoE)
        model.shared_expert = torch.nn.Sequential(_Probe(), model.shared_expert)
        ref_model.shared_expert = copy.deepcopy(model.shared_expert)
        options = {"layout": "ep_alltoall", "overlap_shared": overlap}
        x = _tokens(rank, (5, 12)[rank], 32)
        if via == "apply":
            report = moe_fx.apply(model, x, options=options)
        else:
            model = torch.compile(model, backend="moe_fx", options={**options, "inner": via})
            with torch.no_grad():
                model(x)
            from moe_fx.backend import last_reports

            report = last_reports()[-1]
        reason = report.matches[0].lowerings["quantize_dispatch"].reason
        assert ("its exchange overlaps" in reason) == overlap, reason
        # apply: a rank with no tokens still exchanges (it receives rows); compile would capture T=0 apart
        for T in ((5, 12)[rank], ((0, 3) if via == "apply" else (2, 3))[rank]):
            x = _tokens(rank + 40, T, 32)
            _PROBED.clear()
            with torch.no_grad():
                out = model(x)
            probed = list(_PROBED)
            with torch.no_grad():
                ref = ref_model(x)
            assert rel_err(out, ref) < TOL, f"rank {rank} shared overlap {via} {overlap} T={T}"
            assert probed == [1 if overlap else 0], (via, overlap, T, probed)
            assert exchanges.in_flight() == 0
    # transformers 5's Qwen2-MoE writes its shared expert before the router: it moves after the dispatch
    from moe_fx import hf_models

    pytest.importorskip("transformers")
    model, ref_model = _model(lambda: hf_models.build("qwen2_moe"))
    report = moe_fx.apply(model, options={"layout": "ep_alltoall"})
    assert all("its exchange overlaps" in m.lowerings["quantize_dispatch"].reason for m in report.matches), report
    torch.manual_seed(7 + rank)
    ids = torch.randint(0, 128, (1, (4, 9)[rank]))
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref_model(ids).logits) < TOL, f"rank {rank} qwen2_moe overlapped"

    from bench.overlap import measure  # bench/overlap.py's row on a tiny layer: every part timed, both ways

    row = measure((3, 6)[rank], torch.device("cpu"), torch.float32, reps=2, shape=(4, 2, 32, 16))
    assert all(row[k] > 0 for k in ("off_us", "on_us", "shared_us", "exchange_us")), row
    assert row["ideal_us"] == min(row["shared_us"], row["exchange_us"])


def _two_ranks(rank: int, world: int) -> None:
    group = dist.group.WORLD
    # ep_alltoall through apply, two forms in one model; uneven T (2 and 9 tokens): most experts idle on rank 0
    T = (2, 9)[rank]
    model, ref_model = _model(ex.TwoFormModel)
    full = _param_numel(model)
    report = moe_fx.apply(model, _tokens(rank, T, 64, batch=True), options={"layout": "ep_alltoall"})
    assert [m.form for m in report.matches] == ["expert_loop", "gather_einsum"], str(report)
    assert {m.lowerings["quantize_dispatch"].name for m in report.matches} == {"ep_all_to_all"}
    assert {m.lowerings["experts"].name for m in report.matches} == {"reference"}
    held = [[0, 1, 2, 3], [4, 5, 6, 7]][rank]
    assert f"rank {rank}/2 of group '0' holds experts {held}" in report.matches[0].lowerings["quantize_dispatch"].reason
    # each rank keeps its 4 of 8 experts: the expert weights halve, other parameters stay
    experts = sum(p.numel() for n, p in ref_model.named_parameters() if "gate" not in n and "norm" not in n)
    assert _param_numel(model) == full - experts // 2, (_param_numel(model), full, experts)
    for T2 in (T, 5 - 4 * rank, 0 if rank else 3):  # the same graph on new token counts (5/1, 3/0: a rank with none)
        _check(model, ref_model, _tokens(rank + 7, T2, 64, batch=True), f"ep_alltoall apply T={T2}")

    # per-rank load: every routed (token, slot) row is counted once, on every rank
    load = {entry.counts_WE.shape[1]: entry for entry in moe_fx.expert_load()}[8]
    assert load.group_name == group.group_name and load.calls == 2 * 3  # 2 blocks x 3 calls
    totals = torch.tensor([(2, 9)[r] + (5 - 4 * r) + (0 if r else 3) for r in range(world)])  # tokens per rank
    assert torch.equal(load.counts_WE.sum(1), totals * 2 * 2), load  # x K=2 x 2 blocks
    assert load.imbalance >= 1.0 and "imbalance" in str(load)
    moe_fx.reset_expert_load()

    # ep_allgather through torch.compile (Inductor), an explicit non-contiguous placement, group given
    model, ref_model = _model(ex.LoopMoE, num_experts=6)
    placement = [1, 0, 0, 1, 1, 0]
    options = {"layout": "ep_allgather", "group": group, "expert_placement": placement}
    compiled = torch.compile(model, backend="moe_fx", options=options)
    for T2 in ((3, 11)[rank], (6, 2)[rank]):
        _check(compiled, ref_model, _tokens(rank + 3, T2, 32), f"ep_allgather compile T={T2}")
    from moe_fx.backend import last_reports

    assert last_reports()[-1].matches[0].lowerings["combine"].name == "ep_all_gather"

    # tp through apply: non-gated experts with biases (the down bias is added once), the same tokens on both ranks
    model, ref_model = _model(ex.LoopMoE, expert=ex.GeluMLP, ffn=48)
    moe_fx.apply(model, _tokens(0, 4, 32), options={"layout": "tp"})
    fc1 = model.experts[0].fc1.weight  # now a view of this rank's F slice of the stacked weights
    assert fc1.shape == (24, 32) and fc1.untyped_storage().nbytes() == 4 * 24 * 32 * 4  # E x F/2 x D fp32
    _check(model, ref_model, _tokens(0, 7, 32), "tp apply")

    # tp through torch.compile on a gated model with a group-limited router and a shared expert
    model, ref_model = _model(ex.DeepSeekStyleMoE)
    compiled = torch.compile(model, backend="moe_fx", options={"layout": "tp", "inner": "eager"})
    _check(compiled, ref_model, _tokens(0, 6, 32), "tp compile")

    # tp on clamped SiLU-gated experts (limit 1, which the tokens pass): the clamps act per F index, as tp slices F
    model, ref_model = _model(ex.NaiveMoE, activation="clamped_silu_gated")
    compiled = torch.compile(model, backend="moe_fx", options={"layout": "tp", "inner": "eager"})
    _check(compiled, ref_model, _tokens(0, 6, 32) * 2, "tp compile clamped_silu_gated")
    assert last_reports()[-1].matches[0].spec.experts.activation == "clamped_silu_gated"

    # stacked separate gate/up parameters with biases (w1/b1, w3/b3, w2/b2): the graph concatenates b1 and b3 per
    # call, which no parallel layout shards yet: left on one device, with the reason
    model, ref_model = _model(ex.NaiveMoE, stacked=True, bias=True)
    compiled = torch.compile(model, backend="moe_fx", options={"layout": "tp", "inner": "eager"})
    _check(compiled, ref_model, _tokens(0, 6, 32), "tp compile separate gate/up with biases")
    report = last_reports()[-1]
    assert (
        not report.matches
        and "separate stacked gate/up biases (b1, b3) are concatenated per call and not sharded for layout='tp' yet"
        in report.rejections[0].reason
    ), str(report)

    # a tiny HF Mixtral, ep_alltoall through apply; each rank its own prompt length
    from moe_fx import hf_models

    pytest.importorskip("transformers")
    model, ref_model = _model(lambda: hf_models.build("mixtral"))
    report = moe_fx.apply(model, options={"layout": "ep_alltoall"})
    assert len(report.matches) == 2, str(report)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4  # the stacked parameter is the shard
    torch.manual_seed(5 + rank)
    ids = torch.randint(0, 128, (1, (3, 8)[rank]))
    with torch.no_grad():
        out, ref = model(ids).logits, ref_model(ids).logits
    assert rel_err(out, ref) < TOL, f"rank {rank} mixtral: {rel_err(out, ref):.2e}"

    # bad configurations name the values: once through apply, then the same checks directly
    model, _ = _model(ex.LoopMoE, num_experts=3)
    with pytest.raises(ValueError, match=r"num_experts E \(3\) must be divisible by the world size \(2\)"):
        moe_fx.apply(model, _tokens(0, 4, 32), options={"layout": "ep_alltoall"})
    spec = MoESpec(ExpertsSpec(3, 32, 47), 2, layout="ep_allgather")
    with pytest.raises(ValueError, match=r"expert_placement names rank\(s\) \[2\] but group '0' has world size 2"):
        plan_shard(spec, None, (0, 1, 2), "cpu")
    with pytest.raises(ValueError, match=r"expert_placement has 2 entries but the block has E=3 experts"):
        plan_shard(spec, None, (0, 1), "cpu")
    with pytest.raises(ValueError, match=r"ffn dim F \(47\) must be divisible by the world size \(2\)"):
        plan_shard(spec.replace(layout="tp"), group, None, "cpu")
    with pytest.raises(ValueError, match=r"block <root> was captured for an empty batch \(0 tokens\) under layout="):
        moe_fx.apply(model.__class__(num_experts=4), torch.randn(0, 32), options={"layout": "ep_alltoall"})
    cpu_only = dist.new_group(backend="cpu:gloo")
    with pytest.raises(ValueError, match=r"layout='ep_allgather' on cuda tensors needs .* backend"):
        plan_shard(spec, cpu_only, (0, 1, 1), "cuda")

    _quantised_two_ranks(rank, world)
    _shared_expert_overlaps(rank)


def _four_ranks(rank: int, world: int) -> None:
    # ep_alltoall, 8 experts placed unevenly (rank 3 holds one, rank 0 three), uneven T including a rank with none
    T = (5, 0, 13, 2)[rank]
    placement = [2, 0, 1, 0, 3, 2, 0, 1]
    for layout in ("ep_alltoall", "ep_allgather"):
        model, ref_model = _model(ex.LoopMoE, num_experts=8, k=3)
        options = {"layout": layout, "expert_placement": placement}
        moe_fx.apply(model, _tokens(rank, 4, 32), options=options)
        _check(model, ref_model, _tokens(rank + 11, T, 32), f"{layout} 4 ranks T={T}")
        _check_quantised(layout, "fp8_block", T, rank, placement[:6])  # rank 3 holds no expert of E=6


def _hung_rank(rank: int, world: int) -> None:
    spec = MoESpec(ExpertsSpec(4, 32, 48), 2, layout="ep_alltoall")
    shard = plan_shard(spec, None, None, "cpu")
    x_TD, ids_TK = _tokens(rank, 5, 32), torch.randint(0, 4, (5, 2), dtype=torch.int32)
    args = dispatch_args(spec, x_TD, ids_TK, torch.rand(5, 2), "ep_all_to_all", shard.group_name,
                         shard.expert_map(x_TD.device), shard.num_local_experts(4))  # fmt: skip
    if rank == 1:
        time.sleep(8)  # never joins the exchange; rank 0 must fail within the group's timeout (3 s)
        return
    with pytest.raises(RuntimeError, match="(?i)timed? ?out"):
        torch.ops.moe_fx.quantize_dispatch(*args)


def _rank_hung_in_the_row_exchange(rank: int, world: int) -> None:
    """Rank 1 joins the count exchange and never the rows': rank 0's dispatch has returned (its all-to-all
    runs on), and the experts' wait for the rows fails within the group's timeout (3 s)."""
    spec = MoESpec(ExpertsSpec(4, 32, 48), 2, layout="ep_alltoall")
    shard = plan_shard(spec, None, None, "cpu")
    x_TD, ids_TK = _tokens(rank, 5, 32), torch.randint(0, 4, (5, 2), dtype=torch.int32)
    args = dispatch_args(spec, x_TD, ids_TK, torch.rand(5, 2), "ep_all_to_all", shard.group_name,
                         shard.expert_map(x_TD.device), shard.num_local_experts(4))  # fmt: skip
    if rank == 1:
        counts = torch.empty(2 * 4, dtype=torch.int64)
        dist.all_gather_into_tensor(counts, torch.bincount(ids_TK.reshape(-1).long(), minlength=4))
        time.sleep(8)
        return
    torch.ops.moe_fx.quantize_dispatch(*args)
    assert exchanges.in_flight() == 1
    with pytest.raises(RuntimeError, match="(?i)timed? ?out"):
        exchanges.finish_exchanges()


def test_two_ranks_every_layout_examples_hf_and_errors():
    run_ranks(_two_ranks, 2)


def test_four_ranks_uneven_placement_and_tokens():
    run_ranks(_four_ranks, 4)


def test_hung_rank_surfaces_as_a_timeout_error():
    run_ranks(_hung_rank, 2, timeout_s=3.0)
    run_ranks(_rank_hung_in_the_row_exchange, 2, timeout_s=3.0)


def test_options_validate_group_and_placement():
    from moe_fx.options import parse_options

    with pytest.raises(ValueError, match=r"option group is only used by layouts .* but layout='single'"):
        parse_options({"group": object()})
    with pytest.raises(ValueError, match=r"option expert_placement is only used by layouts .* but layout='tp'"):
        parse_options({"layout": "tp", "expert_placement": [0, 1]})
    with pytest.raises(ValueError, match=r"expert_placement=\[0, -1\] must be a sequence of ranks"):
        parse_options({"layout": "ep_alltoall", "expert_placement": [0, -1]})
    opts = parse_options({"layout": "ep_allgather", "expert_placement": torch.tensor([1, 0])})
    assert opts.expert_placement == (1, 0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="needs torch.distributed initialised"):
            plan_shard(MoESpec(ExpertsSpec(4, 32, 48), 2, layout="ep_alltoall"), None, None, "cpu")


def test_bench_ep_bytes_and_table():
    """bench/ep.py runs on 2 GPUs only; its CPU-side accounting is checked here (see `--cpu-smoke`)."""
    from bench.ep import Shape, table, wire_bytes

    s = Shape(E=8, K=2, D=4, F=6)
    # rank 0 of 2 sends 3 rows to rank 1 (5 to itself) and gets 2 back from rank 1: fp32 rows + fp32 weights
    assert wire_bytes("ep_alltoall", [5, 3, 5, 2], 2, 0, 4, s, 4) == 8 * 8 + 3 * (4 * 4 + 4) + 2 * 4 * 4
    assert wire_bytes("ep_allgather", [4, 7], 2, 0, 4, s, 4) == 9 * 8 + 7 * (4 * 4 + 2 * 2 * 4) + 7 * 4 * 4
    assert wire_bytes("tp", [], 2, 0, 4, s, 4) == 4 * 4 * 4
    # quantised rows: D one-byte values + one fp32 scale per token (fp8, int8) or per 128-group (fp8_block)
    q = Shape(E=8, K=2, D=300, F=6)  # 3 groups of 128
    assert wire_bytes("ep_alltoall", [5, 3, 5, 2], 2, 0, 4, q, 2, "fp8") == 8 * 8 + 3 * (300 + 4 + 4) + 2 * 300 * 2
    assert wire_bytes("ep_alltoall", [5, 3, 5, 2], 2, 0, 4, q, 2, "fp8_block") == 8 * 8 + 3 * (300 + 12 + 4) + 1200
    assert wire_bytes("ep_allgather", [4, 7], 2, 0, 4, q, 2, "int8") == 9 * 8 + 7 * (300 + 4 + 16) + 7 * 300 * 4
    assert wire_bytes("ep_alltoall", [5, 3, 5, 2], 2, 0, 4, q, 2, "int4_weight") == wire_bytes(
        "ep_alltoall", [5, 3, 5, 2], 2, 0, 4, q, 2
    )  # activations travel unquantised
    row = dict(shape="tiny", layout="tp", quant="none", T=4, dispatch_combine_us=10.0, bytes=64, GBps=0.1,
               plain_a2a_us=5.0, plain_a2a_GBps=0.2, vs_a2a=2.0, layer_us=30.0)  # fmt: skip
    assert "| tiny | tp | none | 4 | 10 | 64 | 0.10 | 5 | 0.20 | 2.00 | 30 |" in table([row])
