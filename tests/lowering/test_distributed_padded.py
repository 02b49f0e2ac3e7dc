"""ep_alltoall with max_tokens_per_rank: fixed-size exchanges on real gloo groups (2 and 4 ranks).

Every rank's output equals single-process eager on its own tokens (uneven T, a rank with none, idle
experts), quantised rows equal the single-process quantised block, the op's shapes are all known at trace
time (no data-dependent sizes: what CUDA-graph capture needs), and a call past the bound is a moe_fx error.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_fx
from moe_fx import examples as ex
from moe_fx.lowering.distributed import plan_shard
from moe_fx.ops import dispatch_args
from moe_fx.options import parse_options
from moe_fx.spec import ExpertsSpec, MoESpec
from tests.lowering.ranks import run_ranks
from tests.lowering.test_distributed import _check, _check_quantised, _model, _tokens

BOUND = 16
PADDED = "ep_all_to_all_padded"


def _static_shapes(world: int) -> None:
    spec = MoESpec(ExpertsSpec(4, 32, 48), 3, layout="ep_alltoall", max_tokens_per_rank=BOUND)
    shard = plan_shard(spec, None, None, "cpu")
    expert_map = shard.expert_map(torch.device("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, ids, w = torch.empty(5, 32), torch.zeros(5, 3, dtype=torch.int32), torch.empty(5, 3)
        out = torch.ops.moe_fx.quantize_dispatch(
            *dispatch_args(spec, x, ids, w, PADDED, shard.group_name, expert_map, shard.num_local_experts(4))
        )
    assert all(isinstance(s, int) for t in out for s in t.shape), [t.shape for t in out]
    assert out[0].shape == (world * BOUND * 3, 32) and out[-1].shape == (15,)  # W*C rows; one handle entry per pick


def _padded_ranks(rank: int, world: int, placement) -> None:
    _static_shapes(world)
    options = {"layout": "ep_alltoall", "max_tokens_per_rank": BOUND, "expert_placement": placement}
    model, ref_model = _model(ex.LoopMoE, num_experts=8, k=3)
    report = moe_fx.apply(model, _tokens(rank, 4, 32), options=options)
    chosen = {op: sel.name for op, sel in report.matches[0].lowerings.items()}
    assert chosen["quantize_dispatch"] == chosen["combine"] == PADDED, str(report)
    assert chosen["experts"] == "reference", str(report)
    moe_fx.reset_expert_load()
    Ts = [((3, 16), (11, 0), (0, 5), (16, 1))[rank % 4][i] for i in range(2)]
    for T in Ts:
        _check(model, ref_model, _tokens(rank + 7, T, 32), f"padded ep_alltoall T={T}")
    load = {entry.counts_WE.shape[1]: entry for entry in moe_fx.expert_load()}[8]
    assert load.calls == 2 and int(load.counts_WE[rank].sum()) == sum(Ts) * 3, load  # every pick counted
    with pytest.raises(ValueError, match=rf"rank {rank} dispatches {BOUND + 1} tokens, more than max_tokens_per_rank"):
        with torch.no_grad():
            model(_tokens(rank, BOUND + 1, 32))
    dist.barrier()  # every rank raised before its exchange: none is left waiting
    for T in ((5, 0, 13, 2)[rank % 4], 1):
        _check_quantised("ep_alltoall", "fp8", T, rank, placement[:6] if placement else None, bound=BOUND)


def _two_ranks(rank: int, world: int) -> None:
    _padded_ranks(rank, world, None)
    # torch.compile (Inductor) takes the same lowerings and bound
    model, ref_model = _model(ex.LoopMoE, num_experts=4)
    compiled = torch.compile(model, backend="moe_fx", options={"layout": "ep_alltoall", "max_tokens_per_rank": 8})
    for T in ((3, 8)[rank], (8, 2)[rank]):
        _check(compiled, ref_model, _tokens(rank + 3, T, 32), f"padded ep_alltoall compile T={T}")


def test_two_ranks_padded_apply_compile_quant_and_bound():
    run_ranks(_two_ranks, 2)


def test_four_ranks_padded_uneven_placement():
    run_ranks(_padded_ranks, 4, [2, 0, 1, 0, 3, 2, 0, 1])


def test_options_validate_max_tokens_per_rank():
    assert parse_options({"layout": "ep_alltoall", "max_tokens_per_rank": 4}).max_tokens_per_rank == 4
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"max_tokens_per_rank={bad!r} must be an int > 0"):
            parse_options({"layout": "ep_alltoall", "max_tokens_per_rank": bad})
    with pytest.raises(ValueError, match=r"max_tokens_per_rank bounds layout 'ep_alltoall', but layout='ep_allgather'"):
        parse_options({"layout": "ep_allgather", "max_tokens_per_rank": 4})
    with pytest.raises(ValueError, match=r"max_tokens_per_rank=4 bounds the ep_alltoall exchange, but layout='tp'"):
        MoESpec(ExpertsSpec(4, 8, 8), 2, layout="tp", max_tokens_per_rank=4)
