import contextlib
import os
import warnings

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter. It must be set before any
# kernel is defined (kernels read it when decorated); on a GPU, Inductor's own kernels need it unset.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


FALLBACK = "moe_fx: running the original block"  # the warning of a call that does not run the rewritten graph


@contextlib.contextmanager
def no_fallback():
    """Inside, a call that runs a block's original forward instead of its rewritten graph fails (its warning is
    an error)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", FALLBACK)
        yield


def fuse_every_config(monkeypatch) -> None:
    """From here on every config the Triton experts op chooses is fused (the down GEMM in the up tile's epilogue):
    what the kernel that routes its own picks needs, and the interpreter's defaults are not. Wraps whatever chooses
    now (a test's own load-path choice too)."""
    from dataclasses import replace

    from moe_fx.lowering.triton import tuning

    choose = tuning._choose
    monkeypatch.setattr(tuning, "_choose", lambda *args: replace(choose(*args), fused=True))


@pytest.fixture
def poison_outputs():
    """torch.empty returns NaN-filled memory, so an output row a lowering forgets to write shows."""
    from moe_fx.lowering.triton.tuner import poisoned

    with poisoned(quiet=False):
        yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
