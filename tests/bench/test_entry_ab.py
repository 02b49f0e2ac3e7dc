"""bench/entry_ab.py: the `--set` assignments it applies to the chosen config (the GPU timing is not run here)."""

import pytest
import torch

from moe_fx.lowering.triton import tuning
from tests.bench.scripts import load


def test_set_changes_the_named_fields_of_either_gemm_or_the_pair():
    bench = load("entry_ab")
    up, down = tuning.GemmConfig(128, 128, 64, tma=True), tuning.GemmConfig(128, 256, 64, tma=True, persistent=True)
    config = tuning.ExpertsConfig(up, down)
    new = bench.changed(config, ["up.persistent=true", "down.persistent=false", "down.num_stages=4", "fused=false"])
    assert new == tuning.ExpertsConfig(
        tuning.GemmConfig(128, 128, 64, tma=True, persistent=True),
        tuning.GemmConfig(128, 256, 64, num_stages=4, tma=True),
    )
    assert bench.changed(config, []) == config


@pytest.mark.parametrize("assignment", ["up.persist=true", "mid.tma=true", "persistent=true", "up.tma", "up.tma=yes"])
def test_a_bad_assignment_names_itself(assignment):
    bench = load("entry_ab")
    config = tuning.default_config(1024, torch.bfloat16)
    with pytest.raises(ValueError, match=r"moe_fx: --set .*" + assignment.split("=")[0].replace(".", r"\.")):
        bench.changed(config, [assignment])
