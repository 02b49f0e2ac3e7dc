"""bench/w2_layout.py on the CPU (Triton under the interpreter): every layout it times computes the reference's
step from the same quantised weights, routed (a fused config) and through the down GEMM; the timing needs a GPU."""

import pytest
import torch

from moe_fx.lowering import quant
from moe_fx.lowering.triton import grouped_gemm, tuner, tuning
from tests.bench.scripts import load
from tests.lowering.triton.conftest import DEVICE


@pytest.mark.parametrize("fused", [True, False])
def test_every_layout_it_times_agrees_with_the_reference(fused, monkeypatch):
    bench = load("w2_layout")
    up = tuning.GemmConfig(16, 32, 32, 1, 4, 1)
    config = tuning.ExpertsConfig(up, tuning.GemmConfig(16, 32, 32, 1, 4, 1, tma=not fused), fused=fused)
    monkeypatch.setattr(tuning, "choose", lambda *args: config)
    grouped_gemm.loads.clear()
    runs, chosen = bench.layouts((4, 2, 64, 80), ["int8", "fp8"][fused], 1, [16, 32], DEVICE, torch.float16)
    assert chosen == config and sorted(runs) == [0, 16, 32]
    for width, run in runs.items():
        assert tuner.agreement(run, config, run.reference()) < tuner.agreement_bound(torch.float16, "fp8"), width
    # the routed kernel (fused), or the down GEMM through TMA (32-wide blocks) and pointers (16-wide)
    assert set(grouped_gemm.loads) >= ({"routed/pointers"} if fused else {"down/tma", "down/pointers"})


def test_a_cell_names_a_shape_a_per_token_mode_and_t():
    bench = load("w2_layout")
    assert bench.cell("qwen3:int8:16") == ("qwen3", "int8", 16)
    for bad in ("qwen3:fp8_block:1", "qwen3:fp8", "llama:fp8:1"):
        with pytest.raises(ValueError, match="moe_fx: a cell is shape:quant:T"):
            bench.cell(bad)
    assert quant.W2_BLOCK == 128
