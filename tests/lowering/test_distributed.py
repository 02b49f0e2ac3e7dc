"""Parallel layouts on real multi-process gloo groups (2 and 4 ranks, spawned on localhost).

Every rank's output must equal single-process eager on its own tokens (rel err < 1e-5 in fp32), with
uneven token counts per rank and experts that get no tokens. Process start-up dominates the cost, so
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
from moe_fx.lowering.distributed import expert_load, plan_shard, reset_expert_load
from moe_fx.ops import dispatch_args
from moe_fx.spec import ExpertsSpec, MoESpec
from tests.conftest import rel_err
from tests.lowering.ranks import run_ranks

TOL = 1e-5


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
    # each rank keeps its 4 of 8 experts: the expert weights halve, other parameters stay
    experts = sum(p.numel() for n, p in ref_model.named_parameters() if "gate" not in n and "norm" not in n)
    assert _param_numel(model) == full - experts // 2, (_param_numel(model), full, experts)
    for T2 in (T, 5 - 4 * rank, 0 if rank else 3):  # the same graph on new token counts (5/1, 3/0: a rank with none)
        _check(model, ref_model, _tokens(rank + 7, T2, 64, batch=True), f"ep_alltoall apply T={T2}")

    # per-rank load: every routed (token, slot) row is counted once, on every rank
    load = {entry.counts_WE.shape[1]: entry for entry in expert_load()}[8]
    assert load.group_name == group.group_name and load.calls == 2 * 3  # 2 blocks x 3 calls
    totals = torch.tensor([(2, 9)[r] + (5 - 4 * r) + (0 if r else 3) for r in range(world)])  # tokens per rank
    assert torch.equal(load.counts_WE.sum(1), totals * 2 * 2), load  # x K=2 x 2 blocks
    assert load.imbalance >= 1.0 and "imbalance" in str(load)
    reset_expert_load()

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

    # bad configurations name the values
    model, _ = _model(ex.LoopMoE, num_experts=3)
    with pytest.raises(ValueError, match=r"num_experts E \(3\) must be divisible by the world size \(2\)"):
        moe_fx.apply(model, _tokens(0, 4, 32), options={"layout": "ep_alltoall"})
    with pytest.raises(ValueError, match=r"expert_placement names rank\(s\) \[2\] but group '0' has world size 2"):
        moe_fx.apply(model, _tokens(0, 4, 32), options={"layout": "ep_allgather", "expert_placement": [0, 1, 2]})
    model, _ = _model(ex.LoopMoE, ffn=47)
    with pytest.raises(ValueError, match=r"ffn dim F \(47\) must be divisible by the world size \(2\)"):
        moe_fx.apply(model, _tokens(0, 4, 32), options={"layout": "tp"})
    spec = MoESpec(ExpertsSpec(4, 32, 48), 2, layout="ep_alltoall")
    cpu_only = dist.new_group(backend="cpu:gloo")
    with pytest.raises(ValueError, match=r"layout='ep_alltoall' on cuda tensors needs .* backend"):
        plan_shard(spec, cpu_only, None, "cuda")


def _four_ranks(rank: int, world: int) -> None:
    # ep_alltoall, 8 experts placed unevenly (rank 3 holds one, rank 0 three), uneven T including a rank with none
    T = (5, 0, 13, 2)[rank]
    placement = [2, 0, 1, 0, 3, 2, 0, 1]
    for layout in ("ep_alltoall", "ep_allgather"):
        model, ref_model = _model(ex.LoopMoE, num_experts=8, k=3)
        options = {"layout": layout, "expert_placement": placement}
        moe_fx.apply(model, _tokens(rank, 4, 32), options=options)
        _check(model, ref_model, _tokens(rank + 11, T, 32), f"{layout} 4 ranks T={T}")


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


def test_two_ranks_every_layout_examples_hf_and_errors():
    run_ranks(_two_ranks, 2)


def test_four_ranks_uneven_placement_and_tokens():
    run_ranks(_four_ranks, 4)


def test_hung_rank_surfaces_as_a_timeout_error():
    run_ranks(_hung_rank, 2, timeout_s=3.0)
