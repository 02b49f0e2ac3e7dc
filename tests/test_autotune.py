"""`moe_fx.tune`: which blocks it tunes, and its errors (on the CPU; tests/test_cuda.py tunes on a GPU)."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import moe_fx
from moe_fx import autotune
from moe_fx import examples as ex
from moe_fx.lowering.triton import tuner


def on_triton(report):
    """The report as a GPU's explain gives it: the experts on the Triton lowering (not registered on the CPU)."""
    for block in report.matches:
        block.lowerings["experts"] = dataclasses.replace(block.lowerings["experts"], name="triton")
    return report


def test_tuning_shapes_are_the_blocks_on_the_triton_experts_once_each():
    model, x = ex.TwoFormModel().eval(), torch.randn(5, 64)  # two blocks of one shape
    report = moe_fx.explain(model, x)
    assert len(report.matches) == 2 and autotune.tuning_shapes(report) == []  # the reference lowering: nothing
    assert autotune.tuning_shapes(on_triton(report)) == [(8, 64, 96, 2, "silu_gated", "float32", "none")]
    quantised = on_triton(moe_fx.explain(model, x, options={"quant": "int8"}))
    assert autotune.tuning_shapes(quantised) == [(8, 64, 96, 2, "silu_gated", "float32", "int8")]
    report.matches[0].spec = report.matches[0].spec.replace(layout="ep_alltoall")
    with pytest.raises(ValueError, match="moe_fx: tune times the experts on one device.*layout='ep_alltoall'"):
        autotune.tuning_shapes(report)


def test_tune_calls_the_tuner_once_per_shape_with_the_token_counts(monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "_require_gpu", lambda: None)
    monkeypatch.setattr(autotune, "explain", lambda *a, **kw: on_triton(moe_fx.explain(*a, **kw)))
    monkeypatch.setattr(tuner, "tune", lambda *a, **kw: calls.append((a, kw)) or {f"key{len(calls)}": {"best": 1.0}})
    model = ex.TwoFormModel().eval()
    result = moe_fx.tune(model, torch.randn(5, 64), tokens=(1, 64), candidates=((16,) * 6,))
    assert result == {"key1": {"best": 1.0}}
    ((args, kwargs),) = calls
    assert args == (8, 64, 96, 2, "silu_gated", torch.float32, [1, 64])
    assert kwargs["quant"] == "none" and kwargs["candidates"] == ((16,) * 6,)


def test_tune_errors_name_the_problem(monkeypatch, caplog):
    model, x = ex.TwoFormModel().eval(), torch.randn(5, 64)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="moe_fx: tune times the Triton GEMMs on a CUDA GPU"):
            moe_fx.tune(model, x)
    monkeypatch.setattr(autotune, "_require_gpu", lambda: None)
    with pytest.raises(ValueError, match=r"moe_fx: tune's tokens must be positive integers, got \(1, 0\)"):
        moe_fx.tune(model, x, tokens=(1, 0))
    assert moe_fx.tune(model, x) == {}  # on the CPU the experts run the reference lowering: nothing to tune
    assert "no block of TwoFormModel runs the Triton experts lowering" in caplog.text


def test_moe_fx_and_its_command_line_import_without_triton():
    """Triton is optional (the transformers 4.57 CI job has none): tune imports it only when it runs."""
    code = "import sys; sys.modules['triton'] = None; import moe_fx, moe_fx.__main__; assert moe_fx.tune"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
