"""Triton lowering tests run on CUDA when there is one, else on CPU tensors under the interpreter."""

from dataclasses import replace

import pytest
import torch

from moe_fx.lowering.triton import grouped_gemm, tuning

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's tl.dot is wrong on bf16 (it is tested on the GPU); fp32 on the GPU runs IEEE dots.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def _poisoned(poison_outputs):
    """Every Triton test runs with NaN-poisoned outputs (tests/conftest.py)."""


@pytest.fixture(params=[False, True], ids=["pointers", "tma"])
def tma(request, monkeypatch):
    """Runs a test twice: the GEMMs' operands loaded through pointers, then through TMA descriptors (every
    chosen config with tma=True); the second run fails unless at least one GEMM it launched took the TMA path."""
    if request.param:
        choose = tuning._choose.__wrapped__

        def with_tma(*args):
            c = choose(*args)
            return tuning.ExpertsConfig(replace(c.up, tma=True), replace(c.down, tma=True))

        monkeypatch.setattr(tuning, "_choose", with_tma)
    before = grouped_gemm.loads.copy()
    yield request.param
    launched = grouped_gemm.loads - before
    through_tma = sum(n for path, n in launched.items() if path.endswith("/tma"))
    if launched:  # a test skipped before its first GEMM launched nothing
        assert (through_tma > 0) == request.param, f"tma={request.param}: launches {dict(launched)}"
