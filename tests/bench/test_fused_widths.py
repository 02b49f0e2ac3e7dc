"""bench/fused_widths.py on the CPU (Triton under the interpreter): every width and warp count it would time is a
fused config whose routed step agrees with the reference lowering, bf16-shaped and fp8; the timing needs a GPU."""

import pytest
import torch

from moe_fx.lowering.triton import tuner, tuning
from tests.bench.scripts import load
from tests.lowering.triton.conftest import DEVICE


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_every_width_it_times_agrees_with_the_reference(quant):
    bench = load("fused_widths")
    E, K, D, F, T = 8, 2, 64, 96, 1
    run = bench.experts_op((E, K, D, F), T, quant, DEVICE, torch.float16, reduce=True, routed=True)
    up = bench.up_tile(E, D, F, K, T, quant, DEVICE)
    narrow = bench.swapped_tile("16x32x64s1")
    configs = bench.fused_configs([up, narrow], [32, 64], [4, 8])
    assert len(configs) == 8 and all(c.fused and c.up.block_n in (up.block_n, 32) for c in configs.values())
    assert narrow == tuning.GemmConfig(16, 32, 64, 8, 4, 1, swap_ab=True)
    with pytest.raises(ValueError, match="16x64x256s3"):
        bench.swapped_tile("16x64")
    ok, failed = bench.agreeing(run, configs, quant, torch.float16)
    assert not failed and ok == configs
    wrong = {"wrong": tuning.ExpertsConfig(up, tuning.GemmConfig(16, 32, 128), fused=True)}
    run_bad = bench.experts_op((E, K, D, F), T, quant, DEVICE, torch.float16, reduce=True, routed=True)
    ref = run_bad.reference
    run_bad.reference = lambda: ref() * 1.5  # a reference 50 % off: nothing agrees with it
    ok, failed = bench.agreeing(run_bad, wrong, quant, torch.float16)
    assert not ok and failed["wrong"].startswith(tuner.WRONG_OUTPUT)
