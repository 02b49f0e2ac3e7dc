"""Parallel layouts on real NCCL process groups, 2 ranks on 2 GPUs (rank r on cuda:r); skipped with fewer GPUs.

The GPU twin of test_distributed.py: every rank's output equals single-process eager on its own tokens, with
uneven token counts (a rank with none), through `apply` and `torch.compile`, with the Triton lowerings for
route / experts on each rank and NCCL moving the rows; fp8 rows travel as e4m3 bytes and equal the
single-process fp8 block on the rank's tokens; the padded ep_alltoall (max_tokens_per_rank) runs inside a
CUDA graph; a shared expert overlaps the ep_alltoall exchange. Run through the device tool on nvidia-h200-x2.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moe_fx
from moe_fx import examples as ex
from moe_fx.backend import last_reports
from tests.conftest import TOLERANCE, rel_err
from tests.lowering.ranks import run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
QUANT_TOL = 2e-2  # the fp8 Triton kernel on differently grouped rows: far inside fp8's own error (~6e-2)


def _pair(cls, dtype, **kw):
    torch.manual_seed(0)  # the same weights on every rank
    model = cls(**kw).eval().to(torch.cuda.current_device(), dtype)
    return model, copy.deepcopy(model)


def _tokens(seed: int, T: int, D: int, dtype) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(T, D, device=torch.cuda.current_device(), dtype=dtype)


def _check(model, ref_model, x, tol: float, what: str) -> None:
    with torch.no_grad():
        out, ref = model(x), ref_model(x)
    assert torch.isfinite(out).all(), what
    if x.shape[0]:
        assert rel_err(out, ref) < tol, f"{what}: rel err {rel_err(out, ref):.2e}"


def _nccl_two_ranks(rank: int, world: int) -> None:
    # expert parallelism through apply, fp32 and bf16: 8 experts, 4 per rank; uneven T, a rank with no tokens
    for layout, name in (("ep_alltoall", "ep_all_to_all"), ("ep_allgather", "ep_all_gather")):
        for dtype in (torch.float32, torch.bfloat16):
            model, ref_model = _pair(ex.LoopMoE, dtype, num_experts=8)
            report = moe_fx.apply(model, _tokens(rank, 4, 32, dtype), options={"layout": layout})
            lowerings = report.matches[0].lowerings
            assert lowerings["quantize_dispatch"].name == name and lowerings["experts"].name == "triton", str(report)
            for T in ((5, 37)[rank], (0, 3)[rank]):
                what = f"rank {rank} {layout} {dtype} T={T}"
                _check(model, ref_model, _tokens(rank + 10, T, 32, dtype), TOLERANCE[dtype], what)

    # ep_alltoall with max_tokens_per_rank: a decode step captured whole in a CUDA graph, NCCL inside it,
    # replayed on new tokens (each rank its own count, up to the bound) without re-capture
    model, ref_model = _pair(ex.LoopMoE, torch.bfloat16, num_experts=8)
    options = {"layout": "ep_alltoall", "max_tokens_per_rank": 8}
    report = moe_fx.apply(model, _tokens(rank, 4, 32, torch.bfloat16), options=options)
    assert report.matches[0].lowerings["combine"].name == "ep_all_to_all_padded", str(report)
    x = _tokens(rank + 30, (3, 8)[rank], 32, torch.bfloat16)
    with torch.no_grad():
        model(x)  # warm-up: compile the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(x)
        for seed in (40, 50):
            x.copy_(_tokens(rank + seed, x.shape[0], 32, torch.bfloat16))
            graph.replay()
            torch.cuda.synchronize()
            what = f"rank {rank} padded ep_alltoall graph replay"
            assert rel_err(static_out, ref_model(x)) < TOLERANCE[torch.bfloat16], what

    # tp through torch.compile with Inductor: the group-limited router and a shared expert, bf16
    model, ref_model = _pair(ex.DeepSeekStyleMoE, torch.bfloat16)
    compiled = torch.compile(model, backend="moe_fx", options={"layout": "tp"})
    _check(compiled, ref_model, _tokens(0, 17, 32, torch.bfloat16), TOLERANCE[torch.bfloat16], "tp compile")
    assert last_reports()[-1].matches[0].lowerings["combine"].name == "tp_all_reduce"

    # a shared expert moved between dispatch and experts runs beside the NCCL exchange (bf16, apply)
    model, ref_model = _pair(ex.DeepSeekStyleMoE, torch.bfloat16)
    report = moe_fx.apply(model, _tokens(rank, 6, 32, torch.bfloat16), options={"layout": "ep_alltoall"})
    assert "its exchange overlaps" in report.matches[0].lowerings["quantize_dispatch"].reason, str(report)
    for T in ((7, 19)[rank], (0, 4)[rank]):
        what = f"rank {rank} shared expert overlapped T={T}"
        _check(model, ref_model, _tokens(rank + 60, T, 32, torch.bfloat16), TOLERANCE[torch.bfloat16], what)

    # fp8 rows over NCCL: each rank equals the single-process fp8 block (Triton fp8 kernels) on its tokens
    model, single = _pair(ex.LoopMoE, torch.bfloat16, dim=256, ffn=128, num_experts=4)
    x = _tokens(rank + 20, (9, 24)[rank], 256, torch.bfloat16)
    report = moe_fx.apply(model, x, options={"layout": "ep_alltoall", "quant": "fp8"})
    moe_fx.apply(single, x, options={"quant": "fp8"})
    assert report.matches[0].lowerings["experts"].name == "triton", str(report)
    _check(model, single, x, QUANT_TOL, f"rank {rank} fp8 ep_alltoall")

    # a tiny HF Mixtral in bf16, ep_alltoall through apply; each rank its own prompt length
    transformers = pytest.importorskip("transformers")
    from moe_fx import hf_models

    torch.manual_seed(0)
    hf = hf_models.build("mixtral").to(torch.cuda.current_device(), torch.bfloat16)
    ref_hf = copy.deepcopy(hf)
    report = moe_fx.apply(hf, options={"layout": "ep_alltoall"})
    assert len(report.matches) == 2, str(report)
    torch.manual_seed(5 + rank)
    ids = torch.randint(0, 128, (1, (3, 40)[rank]), device=torch.cuda.current_device())
    with torch.no_grad():
        out, ref = hf(ids).logits, ref_hf(ids).logits
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16], f"rank {rank} mixtral ({transformers.__version__})"


def test_two_gpus_nccl_every_layout():
    run_ranks(_nccl_two_ranks, 2, backend="nccl")
