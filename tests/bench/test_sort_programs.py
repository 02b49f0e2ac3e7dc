"""bench/sort_programs.py: every SORT_PROGRAMS setting it times sorts the same rows into the same expert ranges
(on the CPU, Triton under the interpreter); the timing needs a GPU and is not run here."""

import torch

from moe_fx.lowering.triton import dispatch
from tests.bench.scripts import load
from tests.lowering.triton.conftest import DEVICE


def test_every_setting_sorts_the_same_rows_into_the_same_ranges():
    bench = load("sort_programs")
    E, K, T = 8, 2, 300  # 600 rows: 38 blocks of 16, past the one-program sort
    x, weights, ids = bench.routed_rows(E, K, T, DEVICE)
    assert ids.shape == (T, K) and ids.dtype == torch.int32 and (weights > 0).all()
    shipped = dispatch.SORT_PROGRAMS
    outs = {n: bench.at_programs(n, E, x, weights, ids) for n in (1, 3, 64)}
    assert dispatch.SORT_PROGRAMS == shipped
    expected = torch.bincount(ids.reshape(-1).long().cpu(), minlength=E).cumsum(0)
    for n, (_, _, offsets, gather, row_weights, row_index, _) in outs.items():
        assert torch.equal(offsets[1:].cpu(), expected), n
        # each range holds its expert's rows (order within an expert may vary between runs)
        sorted_ids = ids.reshape(-1)[row_index].long().cpu()
        assert torch.equal(sorted_ids, torch.repeat_interleave(torch.arange(E), offsets.diff().cpu())), n
        assert torch.equal(gather.cpu(), row_index.cpu() // K), n
        assert torch.equal(row_weights.cpu(), weights.reshape(-1)[row_index].cpu()), n
