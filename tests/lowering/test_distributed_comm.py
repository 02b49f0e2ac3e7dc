"""The parallel layouts' host-side helpers (`moe_fx/lowering/distributed/comm.py`), in one process."""

from __future__ import annotations

import pytest
import torch

from moe_fx.lowering.distributed.comm import host_head, host_list, keep_host_head, pack_rows, unpack_rows


def test_host_list_is_cached_until_the_tensor_changes():
    expert_map = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])
    first = host_list(expert_map)
    assert first == expert_map.tolist()
    assert host_list(expert_map) is first  # no second device read
    expert_map[0, 1] = 1  # an in-place update (a re-placement) bumps the version: read again
    assert host_list(expert_map) == [[0, 1, 1, 1], [0, 1, 0, 1]]


def test_host_list_of_an_inference_tensor_is_read_every_time():
    with torch.inference_mode():
        t = torch.tensor([3, 4])
    assert host_list(t) == [3, 4]


def test_host_head_reads_the_attached_copy_else_the_tensor():
    handle = keep_host_head(torch.tensor([5, 6, 7, 8]), [5, 6])
    handle[0] = 99  # what combine reads is dispatch's copy, taken when it synced
    assert host_head(handle, 2) == [5, 6]
    assert host_head(handle.clone(), 2) == [99, 6]  # another tensor: read from it
    assert host_head(handle, 3) == [99, 6, 7]  # longer than the copy: read from the tensor


@pytest.mark.parametrize("T", [0, 1, 5])
def test_pack_rows_round_trips_every_dtype(T):
    torch.manual_seed(T)
    parts = [
        torch.randn(T, 6).to(torch.float8_e4m3fn),
        torch.randn(T, 3, dtype=torch.bfloat16),
        torch.randint(-9, 9, (T, 2), dtype=torch.int32),
        torch.randn(T, 1),
    ]
    packed = pack_rows(parts)
    assert packed.dtype == torch.uint8 and packed.shape == (T, 6 + 6 + 8 + 4)
    back = unpack_rows(packed, [(p.dtype, p.shape[1]) for p in parts])
    for p, b in zip(parts, back):
        assert b.dtype == p.dtype and b.is_contiguous()
        assert torch.equal(b.view(torch.uint8), p.view(torch.uint8))
