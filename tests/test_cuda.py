"""The same pipeline on a GPU (bf16, Inductor), run through the device tool; skipped without CUDA."""

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import moe_fx
from moe_fx import examples as ex
from moe_fx.backend import last_reports
from tests.conftest import fuse_every_config, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("cls", [ex.LoopMoE, ex.GatherEinsumMoE, ex.DenseMoE, ex.DeepSeekStyleMoE])
def test_naive_forms_bf16_inductor(cls):
    model = cls().eval().cuda().to(torch.bfloat16)
    x = torch.randn(33, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="moe_fx")(x)
    assert counters["moe_fx"]["rewritten"] == 1, str(last_reports()[-1])
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_hf_mixtral_bf16(impl):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    config._experts_implementation = impl
    model = transformers.MixtralForCausalLM(config).eval().cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="moe_fx")(ids).logits
        assert counters["moe_fx"]["rewritten"] == 2, str(last_reports()[-1])
        assert rel_err(out, ref) < 2e-2
        torch._dynamo.reset()
        report = moe_fx.apply(model)
        assert len(report.matches) == 2
        assert rel_err(model(ids).logits, ref) < 2e-2


@pytest.mark.parametrize("tanh_experts", [False, True], ids=["rewritten", "left_untouched"])
def test_opaque_loop_experts_under_cuda_graphs(tanh_experts):
    """A loop experts module (tests/capture/test_opaque_experts.py) under reduce-overhead: rewritten (the opaque op is
    gone), or left untouched, where the op that runs the loop keeps its graph out of CUDA graphs."""
    from tests.capture.test_opaque_experts import Block, D

    model = Block(tanh_experts).eval().cuda().to(torch.bfloat16)
    x = torch.randn(2, 9, D, device="cuda", dtype=torch.bfloat16)
    counters.clear()
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend="moe_fx", mode="reduce-overhead")
        outs = [compiled(x).clone() for _ in range(3)]
    assert counters["moe_fx"]["rewritten"] == (0 if tanh_experts else 1), str(last_reports()[-1])
    assert all(rel_err(out, ref) < 2e-2 for out in outs)


def test_tune_writes_entries_that_choose_then_reads(tmp_path, monkeypatch):
    """moe_fx.tune on a bf16 model: its block shape, timed at two T-buckets over two candidates, lands in the
    cache, and the Triton experts then run the tuned config at those T."""
    from moe_fx.lowering.triton import tuning

    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "tuning.json"))
    model = ex.LoopMoE().eval().cuda().to(torch.bfloat16)
    x = torch.randn(4, 32, device="cuda", dtype=torch.bfloat16)
    candidates = ((16, 32, 32, 4, 2, False), (16, 64, 32, 4, 3, False))
    results = moe_fx.tune(model, x, tokens=(4, 64), candidates=candidates)
    assert len(results) == 2 and all(r["best"] > 0 and not r["failed"] for r in results.values()), results
    E, D, F = 4, 32, 48  # LoopMoE's defaults
    for key, r in results.items():
        T = int(key.rsplit("-T", 1)[1])
        picked = tuning.choose(E, D, F, model.k, True, torch.bfloat16, x.device, T * model.k)
        assert dataclasses.asdict(picked) == r["config"], key
    note = moe_fx.explain(model, x).matches[0].tiles_note  # the report names the buckets just tuned
    assert note.startswith("Triton tiles tuned for T-buckets 4, 64 (this GPU)"), note


def test_route_takes_the_router_linear_on_cuda():
    """Triton's route projects the tokens itself (a GEMV up to PROJECT_MAX_T tokens, torch's linear above): the
    router's linear leaves the graph, outputs stay within bf16 tolerance, and a CUDA graph holds the decode call."""
    model = ex.DeepSeekStyleMoE().eval().cuda().to(torch.bfloat16)
    xs = [torch.randn(T, 32, device="cuda", dtype=torch.bfloat16) for T in (1, 16, 40)]
    with torch.no_grad():
        refs = [model(x) for x in xs]
        report = moe_fx.apply(model, xs[1])
        assert "takes the router's linear" in report.matches[0].lowerings["route"].reason, str(report)
        for x, ref in zip(xs, refs):
            assert rel_err(model(x), ref) < 2e-2
        graph, static_x = torch.cuda.CUDAGraph(), xs[0].clone()
        model(static_x)  # warm-up: compile the kernels outside the capture
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        assert rel_err(static_out, model(static_x)) < 1e-6


def replayed_logits(model, inputs: dict) -> torch.Tensor:
    """The model's logits on `inputs` from a CUDA graph's replay (the kernels compiled by a call before)."""
    graph, static = torch.cuda.CUDAGraph(), {k: v.clone() for k, v in inputs.items()}
    model(**static)
    with torch.cuda.graph(graph):
        static_out = model(**static).logits
    graph.replay()
    return static_out


@pytest.mark.parametrize("fuse", [True, False])
def test_combine_in_experts_on_cuda(fuse):
    """Triton's experts does combine's sum in its down GEMM's epilogue (bf16 atomics) unless fuse_combine is off:
    a real Qwen3-MoE (8 picks per token: the sum's order varies), the graph without its combine node, outputs
    within bf16 tolerance at decode and prefill sizes, and a CUDA graph replaying the one-token call (the up
    GEMM's programs zero the output inside the graph)."""
    from moe_fx import hf_models

    model = hf_models.build("qwen3_moe", "grouped_mm", num_experts=16, num_experts_per_tok=8).cuda().to(torch.bfloat16)
    inputs = [hf_models.example_inputs(model, T, batch=1) for T in (1, 9, 300)]
    inputs = [{k: v.cuda() for k, v in kw.items()} for kw in inputs]
    with torch.no_grad():
        refs = [model(**kw).logits for kw in inputs]
        report = moe_fx.apply(model, **inputs[1], options={"fuse_combine": fuse})
        assert report.matches, str(report)
        for block in report.matches:
            assert (block.lowerings["combine"].name == "in experts (triton)") == fuse, str(report)
            combines = [n for n in block.after.nodes if "moe_fx.combine" in str(n.target)]
            assert len(combines) == (0 if fuse else 1)
        for kw, ref in zip(inputs, refs):
            assert rel_err(model(**kw).logits, ref) < 2e-2
        assert rel_err(replayed_logits(model, inputs[0]), refs[0]) < 2e-2


def test_deterministic_algorithms_repeat_the_bits_on_cuda():
    """Under torch.use_deterministic_algorithms(True) (warn_only: cuBLAS's workspace setting is not this test's)
    a block with 8 picks per token gives the same bits on every call: rewritten under the flag (combine kept,
    summing in slot order), and rewritten before it (experts stores its rows and sums them in order in place
    of the down GEMM's bf16 atomics), in a CUDA graph too."""
    model = ex.LoopMoE(dim=512, ffn=256, num_experts=16, k=8).eval().cuda().to(torch.bfloat16)
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    earlier = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x)
        moe_fx.apply(earlier, x)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            report = moe_fx.apply(model, x)
            runs = {name: [m(x) for _ in range(4)] for name, m in (("under the flag", model), ("before", earlier))}
            graph = torch.cuda.CUDAGraph()  # the in-order sum (index_add_'s deterministic path) in a CUDA graph
            with torch.cuda.graph(graph):
                replayed = earlier(x)
            graph.replay()
        finally:
            torch.use_deterministic_algorithms(False)
    assert "deterministic algorithms are on" in report.matches[0].lowerings["combine"].reason, str(report)
    for name, outs in runs.items():
        assert all(torch.equal(out, outs[0]) for out in outs), name
        assert rel_err(outs[0], ref) < 2e-2, name
    assert torch.equal(replayed, runs["before"][0])


@pytest.mark.parametrize("quant", ["none", "fp8", "int8"])
def test_routed_decode_on_cuda(quant, monkeypatch):
    """A real Qwen3-MoE (8 picks per token) rewritten to one `routed_experts` node per layer, every experts
    config fused (the shipped fused entries are for the benchmark shapes): at T=1 and 3 the GEMV and the kernel
    that routes each pick, at T=300 route, dispatch and experts; outputs within bf16 tolerance (fp8, int8: within
    the modes' error of the bf16 model; the GEMV quantises x), and the one-token call replayed in a CUDA graph (the
    GEMV writes the sums' zeros inside it)."""
    from moe_fx import hf_models
    from moe_fx.lowering.triton import grouped_gemm

    fuse_every_config(monkeypatch)
    model = hf_models.build("qwen3_moe", "grouped_mm", num_experts=16, num_experts_per_tok=8).cuda().to(torch.bfloat16)
    inputs = [hf_models.example_inputs(model, T, batch=1) for T in (1, 3, 300)]
    inputs = [{k: v.cuda() for k, v in kw.items()} for kw in inputs]
    with torch.no_grad():
        refs = [model(**kw).logits for kw in inputs]
        report = moe_fx.apply(model, **inputs[1], options={"fuse_route": True, "quant": quant})
        assert report.matches and all(
            "in one routed_experts node" in b.lowerings["route"].reason for b in report.matches
        ), str(report)
        bound = 2e-2 if quant == "none" else 6e-2
        for kw, ref, kind in zip(inputs, refs, ("routed", "routed", "fused")):  # T=300: the three ops
            before = grouped_gemm.loads.copy()
            assert rel_err(model(**kw).logits, ref) < bound
            assert kind in {k.split("/")[0] for k in (grouped_gemm.loads - before).elements()}
        assert rel_err(replayed_logits(model, inputs[0]), refs[0]) < bound
