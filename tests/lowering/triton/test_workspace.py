"""`workspace.zeroed`: zeros handed out again and again, one buffer per stream (per thread off CUDA), outgrown
buffers kept for the graphs that point at them."""

import threading

import pytest
import torch

from moe_fx.lowering.triton import workspace
from tests.lowering.triton.conftest import DEVICE


def test_zeroed_hands_out_one_buffers_prefix_and_keeps_an_outgrown_one():
    device = torch.device(DEVICE)
    first = workspace.zeroed(10, device)
    assert first.shape == (10,) and first.dtype == torch.int32 and not first.any()
    again = workspace.zeroed(7, device)
    assert again.data_ptr() == first.data_ptr()  # the same buffer, no allocation
    words = workspace._BUFFERS[workspace._key(device)].numel()
    grown = workspace.zeroed(words + 1, device)
    assert grown.numel() == words + 1 and not grown.any() and grown.data_ptr() != first.data_ptr()
    assert any(b.data_ptr() == first.data_ptr() for b in workspace._OUTGROWN)  # still alive


@pytest.mark.skipif(DEVICE == "cuda", reason="threads share a stream on CUDA: one buffer, used in stream order")
def test_each_thread_has_its_own_buffer_off_cuda():
    ptrs = []
    thread = threading.Thread(target=lambda: ptrs.append(workspace.zeroed(4, torch.device("cpu")).data_ptr()))
    thread.start()
    thread.join()
    assert ptrs[0] != workspace.zeroed(4, torch.device("cpu")).data_ptr()
