"""Triton activation quantisation (`quantize.quantize_rows`, and quantize_dispatch under fp8 / fp8_block / int8)
against the torch formats of `moe_fx/lowering/quant.py`: the same scales and quantised values, bit for bit."""

import pytest
import torch

from moe_fx.lowering import quant, reference
from moe_fx.lowering.triton import dispatch as dispatch_module
from moe_fx.lowering.triton import quantize as triton_quantize
from moe_fx.lowering.triton.dispatch import dispatch
from moe_fx.lowering.triton.launch import launch
from moe_fx.lowering.triton.quantize import MODES, quantize_rows
from tests.lowering.triton.conftest import DEVICE, DTYPES
from tests.lowering.triton.test_triton_dispatch import routing


def assert_same_rows(got, want, rows):
    """Quantised values (compared as float: fp8 has no torch.equal on CUDA) and scales of `rows` are identical."""
    (q, s), (rq, rs) = got, want
    assert q.dtype == rq.dtype and q.shape == rq.shape and s.shape == rs.shape and s.dtype == torch.float32
    assert torch.equal(q[rows].float(), rq[rows].float()) and torch.equal(s[rows], rs[rows])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", [(0, 5), (1, 7), (5, 300)])  # empty, one short row, ragged 128-groups
@pytest.mark.parametrize("one_tile_max", [triton_quantize.ONE_TILE_MAX, 64])  # 64: rows of 300 take two passes
def test_quantize_rows_matches_the_format_exactly(mode, dtype, N, D, one_tile_max, monkeypatch):
    monkeypatch.setattr(triton_quantize, "ONE_TILE_MAX", one_tile_max)
    x = (torch.randn(N, D) * torch.logspace(-3, 2, N)[:, None]).to(dtype).to(DEVICE)
    if N > 2:
        x[1] = 0.0  # the amax floor: an all-zero row gets a finite scale and zeros
    got, want = quantize_rows(x, mode), quant.quantize_rows(x, mode)
    assert_same_rows(got, want, slice(None))
    if N > 2:
        assert torch.isfinite(got[1]).all() and (got[0][1].float() == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_stay_in_their_token(mode):
    x = torch.randn(6, 300, device=DEVICE)
    x[2, 7], x[3, 200] = float("nan"), float("inf")
    got, want = quantize_rows(x, mode), quant.quantize_rows(x, mode)
    assert_same_rows(got, want, [0, 1, 4, 5])
    scale = got[1] if mode == "fp8_block" else got[1][:, None]
    assert scale[2, 0].isnan() and scale[3, 1 if mode == "fp8_block" else 0].isinf()  # column 200: group 1
    assert torch.isfinite(scale[[0, 1, 4, 5]]).all()


@pytest.mark.parametrize("mode", [*MODES, "int4_weight"])  # int4_weight: activations stay as they are
@pytest.mark.parametrize(
    "T,K,pattern", [(0, 2, "random"), (1, 1, "random"), (9, 2, "empty"), (33, 2, "one_expert"), (300, 4, "random")]
)  # 300 x 4 rows: the two-launch sort
@pytest.mark.parametrize("one_tile_max", [triton_quantize.ONE_TILE_MAX, 64])  # 64: rows of 136 in two passes
def test_quantize_dispatch_matches_reference(mode, T, K, pattern, one_tile_max, monkeypatch):
    monkeypatch.setattr(triton_quantize, "ONE_TILE_MAX", one_tile_max)
    E, D = 6, 136
    x = torch.randn(T, D, device=DEVICE)
    weights, ids = routing(T, K, E, pattern)
    got = dispatch(x, ids, weights, E, mode)
    want = reference.quantize_dispatch(x, ids, weights, E, mode, "single", "", None)
    assert_same_rows(got[:2], want[:2], slice(None))
    assert torch.equal(got[2], want[2]) and got[6].numel() == 0
    assert torch.equal(got[3], got[5] // K) and torch.equal(got[4], weights.reshape(-1)[got[5]])


@pytest.mark.parametrize("mode", [*MODES, "none"])
@pytest.mark.parametrize("T,launches", [(4, 1), (300, 2)])
def test_dispatch_quantises_in_the_sorts_launches(mode, T, launches, monkeypatch):
    """The activations are quantised (or copied) by programs of the sort's first launch: one launch in all at
    decode, two above SMALL_CHUNKS blocks of rows."""
    calls = []
    monkeypatch.setattr(
        dispatch_module, "launch", lambda kernel, *a, **k: calls.append(kernel) or launch(kernel, *a, **k)
    )
    weights, ids = routing(T, 4, 6, "random")
    dispatch(torch.randn(T, 136, device=DEVICE), ids, weights, 6, mode)
    assert len(calls) == launches, calls
