"""Real HuggingFace transformers MoE models, built from tiny configs with random weights."""

import pytest
import torch
from torch._dynamo.utils import counters

import moe_fx
from moe_fx import hf_models
from moe_fx.backend import last_reports
from tests.conftest import rel_err

transformers = pytest.importorskip("transformers")


def tiny(name: str, experts_implementation: str = "grouped_mm"):
    return hf_models.build(name, experts_implementation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
def test_compile_rewrites_every_block(name, impl, dtype):
    model = tiny(name, impl).to(dtype)
    ids = torch.randint(0, 128, (2, 7))
    counters.clear()
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="moe_fx", options={"inner": "eager"})(ids).logits
    report = last_reports()[-1]
    assert counters["moe_fx"]["rewritten"] == 2, str(report)
    assert {m.form for m in report.matches} == {"hf_grouped_mm" if impl == "grouped_mm" else "batched_mm"}
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_apply_mixtral_generate_and_state_dict(tmp_path):
    model = tiny("mixtral")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    report = moe_fx.apply(model)
    assert [m.module_path for m in report.matches] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert moe_fx.apply(model) is report
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref_gen)
    model.save_pretrained(tmp_path)
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, ref) < 1e-5


def test_apply_qwen2_moe_keeps_shared_expert():
    model = tiny("qwen2_moe")
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        ref = model(ids).logits
    report = moe_fx.apply(model)
    assert len(report.matches) == 2
    assert all(m.spec.router.renormalize is False for m in report.matches)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-5
