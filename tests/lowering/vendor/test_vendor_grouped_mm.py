"""The torch._grouped_mm experts lowering against the float64 oracle, outputs poisoned: in bf16 on an sm90 GPU, where
it is registered, and on the CPU (torch's own _grouped_mm there, fp32 and bf16), so that CI runs the lowering."""

import pytest
import torch

from tests.conftest import TOLERANCE, rel_err
from tests.lowering.test_reference import ACT, PLAIN, UNCLAMPED, oracle, unclamped_oracle
from tests.lowering.triton.test_triton_dispatch import routing
from tests.lowering.triton.test_triton_experts import E, run, weights_for

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
DEVICE = "cuda" if SM90 else "cpu"
DTYPES = [torch.bfloat16] if SM90 else [torch.float32, torch.bfloat16]
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available() and not SM90, reason="the lowering serves sm90 GPUs"),
    pytest.mark.usefixtures("poison_outputs"),
]


@pytest.mark.parametrize("T,K,pattern", [(0, 2, "random"), (1, 1, "random"), (37, 2, "random"), (9, 2, "empty"),
                                         (33, 2, "one_expert")])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["concat", "separate", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_against_oracle(T, K, pattern, bias, layout, dtype):
    D, FF = 64, 96
    x = torch.randn(T, D).to(dtype)
    w1, w3, w2, b1, b3, b2 = weights_for(dtype, D, FF, bias=bias)
    weights, ids = routing(T, K, E, pattern)
    w13, w3_arg = (w1, w3) if layout == "separate" else (torch.cat([w1, w3], 1), None)
    b13 = torch.cat([b1, b3], 1) if bias else None
    w2_arg, t = w2, layout == "transposed"
    if t:
        w13, w2_arg = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    args = [a if a is None else a.to(DEVICE) for a in (x, weights, ids, w13, w3_arg, w2_arg, b13, b2)]
    out = run(*args, "silu_gated", "separate" if layout == "separate" else "concat", t, t, impl="grouped_mm")
    assert out.shape == (T, D)
    if T:
        ref = oracle(x, weights.cpu(), ids.cpu(), "silu_gated", w1, w3, w2, b1, b3, b2)
        assert rel_err(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("act", [*ACT, *PLAIN])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_activations(act, dtype):
    T, K, D, FF = 37, 2, 64, 96
    x = (torch.randn(T, D) * 2).to(dtype)  # gate and up values of std ~4: the clamped activations' limit (7) acts
    w1, w3, w2, b1, b3, b2 = weights_for(dtype, D, FF, bias=True)
    weights, ids = routing(T, K, E, "random")
    w13, b13 = (w1, b1) if act in PLAIN else (torch.cat([w1, w3], 1), torch.cat([b1, b3], 1))
    args = [a.to(DEVICE) for a in (x, weights, ids, w13)] + [None] + [a.to(DEVICE) for a in (w2, b13, b2)]
    out = run(*args, act, impl="grouped_mm")
    ref = oracle(x, weights.cpu(), ids.cpu(), act, w1, w3, w2, b1, b3, b2)
    assert rel_err(out.cpu(), ref) < TOLERANCE[dtype]
    if act in UNCLAMPED:
        assert rel_err(unclamped_oracle(x, weights.cpu(), ids.cpu(), act, w1, w3, w2, b1, b3, b2), ref) > 1e-2
