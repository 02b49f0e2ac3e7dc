"""Triton dispatch (counting sort) and combine against the reference lowering and float64 sums."""

import pytest
import torch

from moe_fx.lowering import reference
from moe_fx.lowering.triton import dispatch as dispatch_module
from moe_fx.lowering.triton.combine import combine
from moe_fx.lowering.triton.dispatch import dispatch
from tests.conftest import TOLERANCE, rel_err
from tests.lowering.triton.conftest import DEVICE, DTYPES


def routing(T, K, E, pattern):
    if pattern == "random":
        ids = torch.rand(T, E).argsort(dim=-1)[:, :K]
    elif pattern == "one_expert":  # every token's first choice is expert 1
        ids = (torch.arange(K).view(1, K) + 1).expand(T, K) % E
    elif pattern == "dropped":  # about a third of the picks dropped (id -1: capacity, zero-computation experts)
        ids = torch.rand(T, E).argsort(dim=-1)[:, :K]
        ids = ids.masked_fill(torch.rand(T, K) < 0.35, -1)
    else:  # "empty": expert 0 and the last expert never get a token
        ids = (torch.arange(K).view(1, K) % (E - 2) + 1).expand(T, K)
    return (torch.rand(T, K) + 0.1).to(DEVICE), ids.to(torch.int32).contiguous().to(DEVICE)


@pytest.mark.parametrize("T", [0, 1, 7, 300])
@pytest.mark.parametrize("K,E", [(1, 4), (2, 6), (4, 4), (8, 128)])
@pytest.mark.parametrize("pattern", ["random", "one_expert", "empty", "dropped"])
def test_dispatch_groups_rows_like_reference(T, K, E, pattern):
    if pattern == "empty" and K > E - 2:
        pytest.skip("needs K <= E - 2")
    check_dispatch(T, K, E, pattern, stable=T * K <= 64)  # one program sorts a decode step: stable


@pytest.mark.parametrize("K,E", [(2, 6), (4, 4), (8, 128)])  # 5, 10 and 38 blocks of rows at T=300
@pytest.mark.parametrize("pattern", ["random", "dropped"])
@pytest.mark.parametrize("sort_programs", [3, 1])
def test_the_two_launch_sort_in_runs_of_blocks(K, E, pattern, sort_programs, monkeypatch):
    """At most 3 programs: each sorts a run of blocks (ragged: 2+2+1, 4+4+2, 13+13+12); 1: one run, stable."""
    monkeypatch.setattr(dispatch_module, "SORT_PROGRAMS", sort_programs)
    check_dispatch(300, K, E, pattern, stable=sort_programs == 1)


def check_dispatch(T, K, E, pattern, stable):
    """Triton dispatch against the reference's: the same offsets, the same rows per expert (in the
    reference's order exactly where `stable`), their tokens and weights."""
    x = torch.randn(T, 8, device=DEVICE)
    weights, ids = routing(T, K, E, pattern)
    xq, xscale, offsets, gather, row_w, row_index, splits = dispatch(x, ids, weights, E)
    ref = reference.quantize_dispatch(x, ids, weights, E, "none", "single", "", None)
    assert xq.shape == (0, 8)  # the rows are x itself: experts reads x (`ops.rows_are_tokens`), nothing copied
    assert xscale.numel() == 0 and splits.numel() == 0
    assert torch.equal(offsets, ref[2])
    bounds = offsets.tolist()
    for lo, hi in zip(bounds, [*bounds[1:], T * K]):  # order inside an expert may differ; the set of slots
        assert torch.equal(row_index[lo:hi].sort().values, ref[5][lo:hi].sort().values)  # may not (dropped last)
    if stable:
        assert torch.equal(row_index, ref[5])
    assert torch.equal(gather, row_index // K)
    assert torch.equal(row_w, weights.reshape(-1)[row_index])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K", [(0, 2), (1, 1), (9, 3), (5, 8), (300, 4)])  # R > SEARCH_MAX: inverted
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_against_float64(dtype, T, K, weighted):
    D = 40
    y = torch.randn(T * K, D, device=DEVICE).to(dtype)
    weights = torch.rand(T, K, device=DEVICE)
    row_index = torch.randperm(T * K, device=DEVICE)
    out = combine(y, weights, row_index, weighted)
    assert out.shape == (T, D) and out.dtype == dtype
    if T:
        slots = torch.empty_like(y, dtype=torch.float64)
        slots[row_index] = y.double()
        ref = (slots.view(T, K, D) * (weights.double()[..., None] if weighted else 1)).sum(1)
        assert rel_err(out, ref) < TOLERANCE[dtype]
        assert rel_err(out, reference.combine(y, weights, row_index, None, weighted, "single", "")) < TOLERANCE[dtype]
