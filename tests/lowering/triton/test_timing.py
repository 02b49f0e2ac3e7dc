"""GPU timing: the L2 emptied by a read (the default), a write (as triton's do_bench) or not at all; a bad
choice is named. The timings themselves run where a GPU is (no timed assertions: only that each mode times)."""

import pytest
import torch

from moe_fx.lowering.triton import timing
from tests.lowering.triton.conftest import DEVICE


def test_an_unknown_flush_is_named():
    with pytest.raises(ValueError, match="moe_fx: flush must be one of .*'read'.*got 'zero'"):
        timing.empty_l2("zero")
    timing.empty_l2("none")  # touches no device


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA events and graphs")
@pytest.mark.parametrize("flush", timing.FLUSHES)
def test_each_flush_times_a_graph_replay(flush):
    a = torch.randn(1 << 20, device="cuda")
    b = torch.empty_like(a)
    replay = timing.graph_replay(lambda: b.copy_(a * 2))
    us = timing.median_us(replay, flush, warmup_ms=1, rep_ms=5)
    assert 0 < us < 1e5
    torch.testing.assert_close(b, a * 2)
