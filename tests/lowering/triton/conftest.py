"""Triton lowering tests run on CUDA when there is one, else on CPU tensors under the interpreter."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's tl.dot is wrong on bf16 (it is tested on the GPU); fp32 on the GPU runs IEEE dots.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def _poisoned(poison_outputs):
    """Every Triton test runs with NaN-poisoned outputs (tests/conftest.py)."""
