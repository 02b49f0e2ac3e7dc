"""bench/experts_op.py (what bench/gemm_paths.py and bench/defaults.py time) on the CPU, under the Triton interpreter:
its op is the experts op on the rows it dispatched (checked against the float64 oracle)."""

import torch

from tests.bench.scripts import load
from tests.conftest import TOLERANCE, rel_err
from tests.lowering.test_reference import oracle


def test_the_bench_op_is_the_experts_op_on_its_rows(poison_outputs):
    E, K, D, F, T = 6, 2, 32, 24, 5
    run = load("experts_op").experts_op((E, K, D, F), T, device="cpu", dtype=torch.float32)
    x, ids, weights, w13, w2 = run.inputs
    y_RD = run()  # rows grouped by expert; each token's rows weighted and summed give the layer's output
    assert y_RD.shape == (T * K, D) and torch.isfinite(y_RD).all()
    from moe_fx.lowering.triton.combine import combine

    out = combine(y_RD, weights, run.row_index, True)
    ref = oracle(x, weights, ids, "silu_gated", w13[:, :F], w13[:, F:], w2)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]
