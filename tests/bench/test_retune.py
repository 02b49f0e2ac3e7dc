"""bench/retune.py: which packaged entries it times beside the shipped one (every device's entry of the key,
no other quant mode's or dtype's)."""

import torch

from moe_fx.lowering.triton import tuner, tuning
from tests.bench.scripts import load


def test_packaged_entries_of_every_device_and_only_this_key():
    bench = load("retune")
    E, K, D, F = bench.SHAPES["qwen3"]
    for quant in ("none", "fp8"):
        found = bench.shipped_entries(E, D, F, K, 1, quant)
        assert set(found) == {"entry NVIDIA_H100_80GB_HBM3", "entry NVIDIA_H200"}, (quant, set(found))
        head, tail = tuning._key_ends(E, D, F, K, True, torch.bfloat16, 1, quant)
        for name, config in found.items():
            entry = tuning._read(tuning.PACKAGED)[head + name.removeprefix("entry ") + tail]
            assert config == tuning.entry_config(entry)
    assert bench.shipped_entries(E, D, F, K, 1, "int8") == {}  # none shipped; fp8's and bf16's not taken for it


def test_tile_families_split_the_candidates():
    bench = load("retune")
    for candidates in (tuner.CANDIDATES, tuner.QUANT_CANDIDATES):
        decode = [c for c in candidates if bench.TILES["decode"](c)]
        prefill = [c for c in candidates if bench.TILES["prefill"](c)]
        assert decode and prefill and not set(decode) & set(prefill)
        assert all(c[0] >= 64 and c[5] for c in prefill)  # TMA descriptors, as the H200's prefill entries
        assert any(c[7] for c in prefill) and not any(c[7] for c in decode)  # persistent programs: prefill only
