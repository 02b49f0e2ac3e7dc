"""MoE blocks written as widely used codebases write them (`moe_fx.examples`): torchtitan's (histc, stable argsort,
`torch._grouped_mm` or a split loop, scores before or after the experts, routed rows scatter-added into the shared
expert's output), llama-models' Llama 4 reference (transposed scattered scores, bmm over every expert) and
DeepSeek-V3's reference inference code (a loop that skips experts without tokens: `apply` only). Through `apply`
and `torch.compile`: rewritten with equal outputs, or left untouched with the reason, never a crash."""

import copy
import warnings

import pytest
import torch

import moe_fx
from moe_fx import examples as ex
from moe_fx.backend import last_reports
from tests.conftest import FALLBACK, TOLERANCE, rel_err

TITAN = {
    "grouped_mm, shared, scores before": dict(grouped_mm=True),
    "grouped_mm, shared, scores after, in place": dict(grouped_mm=True, score_before=False, inplace=True),
    "split loop, shared, softmax": dict(scoring="softmax"),
    "split loop, no shared, scores after": dict(shared=False, score_before=False),
}


def _inputs(dtype, T=10):
    g = torch.Generator().manual_seed(T)
    return [torch.randn(1, n, 32, generator=g, dtype=dtype) for n in (T, T + 3, 1)]


def _rewrite_and_compare(model, entry: str, dtype=torch.float32, blocks: int = 1):
    """`model` rewritten by `entry` ("apply" or "compile") on three batches, against an untouched copy: `blocks`
    rewritten, outputs within the dtype's tolerance (equal when none is), no fallback warning. Returns the report."""
    torch.manual_seed(0)
    model = model.to(dtype).eval()
    original = copy.deepcopy(model)
    inputs = _inputs(dtype)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = [original(x) for x in inputs]
        if entry == "apply":
            report = moe_fx.apply(model, inputs[0])
            outs = [model(x) for x in inputs]
        else:
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="moe_fx", options={"inner": "eager"}, dynamic=True)
            outs = [compiled(x) for x in inputs]
            report = last_reports()[-1]
    assert not [w for w in caught if FALLBACK in str(w.message)]
    assert len(report.matches) == blocks, str(report)
    for out, ref in zip(outs, expected):
        assert rel_err(out, ref) < TOLERANCE[dtype] if blocks else torch.equal(out, ref)
    return report


@pytest.mark.parametrize("entry", ["apply", "compile"])
@pytest.mark.parametrize("case", list(TITAN))
def test_torchtitan_style_blocks_are_rewritten(case, entry):
    grouped_mm = TITAN[case].get("grouped_mm", False)
    dtype = torch.bfloat16 if grouped_mm else torch.float32  # torch._grouped_mm runs bf16 on the CPU
    report = _rewrite_and_compare(ex.TorchtitanStyleMoE(**TITAN[case]), entry, dtype)
    placement = "input" if TITAN[case].get("score_before", True) else "output"
    assert report.matches[0].spec.weight_placement == placement


@pytest.mark.parametrize("entry", ["apply", "compile"])
@pytest.mark.parametrize("k", [1, 2])
def test_llama4_reference_blocks_are_rewritten(k, entry):
    """Scores scattered into -inf and transposed before the sigmoid (`router.sink_sigmoid_into_scatter` takes the
    transpose along), every expert on every token, rows scatter-added in place into the shared expert's output."""
    spec = _rewrite_and_compare(ex.Llama4ReferenceMoE(k=k), entry).matches[0].spec
    assert spec.router.scoring == "sigmoid" and spec.top_k == k


def test_the_combine_accumulates_into_the_shared_experts_output():
    """The rewritten graph adds the combine's rows to the shared expert's output, which stays outside the block;
    the shared weights are not taken for experts."""
    model = ex.TorchtitanStyleMoE().eval()
    x = _inputs(torch.float32)[0]
    moe_fx.apply(model, x)
    graph = model.forward.gm.graph
    (combine,) = [n for n in graph.nodes if "combine" in str(n.target)]
    added = [u for n in (combine, *combine.users) for u in n.users if "add" in str(u.target)]
    assert added, graph
    shared_reads = [n for n in graph.nodes if n.op == "get_attr" and "shared_experts" in str(n.target)]
    assert shared_reads, "the shared expert runs in the rewritten graph as before"


def test_deepseek_reference_loop_is_rewritten_by_apply():
    """`counts = bincount(ids, minlength=E).tolist()` and `if counts[i] == 0: continue`: apply captures the loop over
    every expert (`moe_fx.capture.hit_loops`), checked against the original forward; no count is read in the rewrite."""
    model = ex.DeepSeekReferenceMoE()
    report = _rewrite_and_compare(model, "apply")
    assert report.matches[0].capture_note.startswith("its loop over the experts hit"), str(report)
    assert not report.rejections, str(report)
    code = model.forward.gm.code
    assert ".item()" not in code and "expert_counts" not in code and "bincount" not in code, code


def test_deepseek_reference_loop_is_left_untouched_by_compile_with_the_reason():
    """`bincount(...).tolist()` made Dynamo fail the whole compile under moe_fx's capture flags; it is a graph
    break now (`moe_fx.capture.breaks`), and the reports say the break splits the block."""
    first = len(last_reports())
    _rewrite_and_compare(ex.DeepSeekReferenceMoE(), "compile", blocks=0)
    text = "\n".join(map(str, last_reports()[first:]))
    assert "a graph break splits the block" in text, text


@pytest.mark.parametrize("entry", ["apply", "compile"])
def test_deepseek_reference_loop_without_the_skip_is_rewritten(entry):
    _rewrite_and_compare(ex.DeepSeekReferenceMoE(skip_empty=False), entry)


def test_a_capture_that_fails_under_the_flags_is_retried_without_them(monkeypatch):
    """A Dynamo failure that only moe_fx's capture flags cause is no crash: apply captures as a plain compile
    would and reports why."""
    import contextlib

    from moe_fx import api

    failing = {"on": False}

    @contextlib.contextmanager
    def capture_config():
        failing["on"] = True
        try:
            yield
        finally:
            failing["on"] = False

    class Block(ex.LoopMoE):
        def forward(self, x):
            if failing["on"]:
                raise RuntimeError("a Dynamo failure under the flags")
            return super().forward(x)

    monkeypatch.setattr(api, "capture_config", capture_config)
    model = Block().eval()
    x = torch.randn(6, 32)
    report = moe_fx.explain(model, x)
    assert any("Dynamo failed under moe_fx's capture flags" in r for r in report.break_reasons), report
