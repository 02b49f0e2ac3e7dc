"""The short launch path: its key refines Triton's specialisation, and on the GPU a kernel launched through it
computes what Triton's own path does, for fresh inputs and for a view Triton would specialise apart."""

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from moe_fx.lowering.triton import launch
from moe_fx.lowering.triton.dispatch import dispatch
from moe_fx.lowering.triton.grouped_gemm import experts
from tests.conftest import TOLERANCE, rel_err
from tests.lowering.test_reference import oracle
from tests.lowering.triton.conftest import DEVICE


def test_arg_key_separates_what_triton_specialises():
    t = torch.randn(64)
    assert launch._arg_key(t) != launch._arg_key(t.half())  # dtype
    assert launch._arg_key(t) != launch._arg_key(t[1:])  # 16-byte alignment
    ints = [1, 2, 16, 17, 32, 2**31, -(2**31) - 1, 2**63]
    assert len({launch._arg_key(i) for i in ints}) == 6  # == 1, % 16, i32 range, u64; 2 ~ 17, 16 ~ 32
    assert launch._arg_key(True) != launch._arg_key(1)
    assert launch._arg_key("x") is None  # a type the short path does not know: Triton's path
    w = torch.randn(4, 32, 32)
    desc = [TensorDescriptor.from_tensor(v, [16, 16]) for v in (w[0], w[1], w[0].half())]
    assert launch._arg_key(desc[0]) == launch._arg_key(desc[1])  # a descriptor: its dtype and block, not its base
    assert launch._arg_key(desc[0]) != launch._arg_key(desc[2])
    assert launch._arg_key(desc[0]) != launch._arg_key(TensorDescriptor.from_tensor(w[0], [16, 32]))


@pytest.mark.skipif(DEVICE != "cuda", reason="the short path launches compiled kernels: needs CUDA")
def test_short_path_runs_and_matches_on_fresh_inputs(gemm_path):
    E, D, F, K, T = 8, 128, 96, 2, 37
    w13 = torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) / 8
    w2 = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) / 8

    def run(x):
        ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :K].int()
        weights = torch.rand(T, K, device="cuda")
        _, _, offsets, gather, row_w, row_index, _ = dispatch(x, ids, weights, E, "none")
        y = experts(x, offsets, gather, row_w, w13, None, w2, None, None, "none", "silu_gated", "concat", False, False,
                    1.7, 7.0, torch.bfloat16)  # fmt: skip
        out = torch.zeros(T, D, device="cuda").index_add_(0, gather, y.float())  # unweighted
        ref = oracle(x.cpu(), torch.ones(T, K), ids.cpu(), "silu_gated", w13[:, :F].cpu(), w13[:, F:].cpu(), w2.cpu())
        return rel_err(out.cpu(), ref)

    x = torch.randn(T + 1, D, device="cuda", dtype=torch.bfloat16)
    run(x[:T])  # compiles: Triton's path
    before = launch.stats["short"]
    for _ in range(3):
        assert run(torch.randn(T, D, device="cuda", dtype=torch.bfloat16)) < TOLERANCE[torch.bfloat16]
    assert launch.stats["short"] > before
    misaligned = x.view(-1)[1 : 1 + T * D].view(T, D)  # another specialisation: compiled apart, still right
    assert run(misaligned) < TOLERANCE[torch.bfloat16]


def test_hooks_are_seen_whatever_their_form():
    class Chain:  # Triton >= 3.5 keeps the hooks in a HookChain, empty by default
        def __init__(self, calls):
            self.calls = calls

    assert not launch._hooked(None) and not launch._hooked(Chain([]))
    assert launch._hooked(Chain([print])) and launch._hooked(print)
