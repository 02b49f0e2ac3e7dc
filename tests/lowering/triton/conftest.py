"""Triton lowering tests run on CUDA when there is one, else on CPU tensors under the interpreter."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's tl.dot is wrong on bf16 (it is tested on the GPU); fp32 on the GPU runs IEEE dots.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def poison():
    """torch.empty returns NaN-filled memory, so a row a kernel forgets to write shows."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
