"""bench/timeline.py: the stamped up kernel compiles for sm90 (no GPU needed), and the stamps read back as
µs from the first program's start (the GPU run is not done here)."""

import textwrap

import pytest
import torch

from tests.bench.scripts import load, run_compiled


@pytest.mark.parametrize("quant, routed", [("none", False), ("fp8", True)])
def test_the_stamped_fused_kernel_compiles_for_sm90_with_its_five_stamps(quant, routed):
    # in a subprocess, as tests/bench/test_ptx_stats.py: the tests' kernels are interpreted, not compiled;
    # routed: the pick's stamp in the place of the expert bounds'
    code = textwrap.dedent(f"""
        from moe_fx.lowering.triton import tuning
        from tests.bench.scripts import load
        timeline, ptx_stats = load("timeline"), load("ptx_stats")
        ptx_stats.grouped_gemm = timeline.instrumented_module()
        up = tuning.GemmConfig(16, 64, 128, 8, 4, 4, tma={not routed}, swap_ab={routed})
        config = tuning.ExpertsConfig(up, tuning.GemmConfig(16, tuning.FUSED_BLOCK_D["{quant}"], 64), fused=True)
        launches = ptx_stats.launches("{quant}", config, routed={routed})
        ptx = ptx_stats.compile_for(*launches[0], 90).asm["ptx"]
        print(len(launches), ptx.count("%globaltimer"), ptx.count("%smid"))
    """)
    kernels, timer_reads, smid_reads = map(int, run_compiled("-c", code, timeout=600).split()[-3:])
    assert (kernels, timer_reads, smid_reads) == (1, 5, 1)  # one kernel (fused); the five stamps; the SM


def test_stamps_read_as_microseconds_from_the_first_start():
    timeline = load("timeline")
    h = torch.full((64, 1024), -1, dtype=torch.bfloat16)  # as the stamped experts allocates it
    raw = h.view(torch.int64).view(-1, 8)
    raw[0, :5] = torch.tensor([5_000, 5_600, 25_000, 34_000, 35_000])
    raw[1, :5] = torch.tensor([4_000, 4_700, -1, -1, 6_000])  # a program with no tile: no up or down stamps
    raw[:2, 7] = torch.tensor([3, 9])
    rel, sms = timeline.stamps(h)
    assert sms.tolist() == [3, 9]
    assert rel[0].tolist() == [1.0, 1.6, 21.0, 30.0, 31.0]
    assert rel[1, :2].tolist() == [0.0, 0.7] and rel[1, 2:4].isnan().all() and rel[1, 4] == 2.0


def test_a_mode_that_runs_no_fused_kernel_is_refused_by_name():
    timeline = load("timeline")
    with pytest.raises(ValueError, match="moe_fx: timeline stamps the fused kernel.*got 'fp8_block'"):
        timeline.timeline("qwen3", 1, "fp8_block", None)
