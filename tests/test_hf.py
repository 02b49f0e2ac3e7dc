"""Real HuggingFace transformers MoE models (every architecture in `moe_fx.hf_models`), tiny configs,
random weights: torch.compile(backend="moe_fx") and moe_fx.apply rewrite every MoE block, logits equal eager."""

import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters

import moe_fx
from moe_fx import hf_models
from moe_fx.backend import last_reports
from tests.conftest import no_fallback, rel_err

transformers = pytest.importorskip("transformers")
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
# The matrix below is the 5.x line's; on 4.57 (`.ci/transformers457`) only test_transformers4_forms applies.
five = pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 5.x matrix; 4.x forms: test_transformers4_forms")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# The experts implementations beyond grouped_mm run on a representative subset: plain SiLU experts, GPT-OSS's
# odd layout, DeepSeek-V3's group-limited router with a shared expert, Gemma4's experts that read their own
# pre-norm of the tokens (through batched_mm's repeat_interleave: refused until 2026-12-05).
IMPL_SUBSET = ["mixtral", "gpt_oss", "deepseek_v3", "gemma4"]
# Open: architectures whose bf16 blocks are left untouched (equal eager) while fp32 ones are rewritten; none now
BF16_OPEN: set[str] = set()
# Open: architectures whose blocks apply leaves untouched (equal eager) while compile rewrites them; none now
# (Gemma4's decoder layer, which holds its block, passes its cache through: see moe_fx/capture/passthrough.py)
APPLY_OPEN: set[str] = set()


@functools.cache
def _built(name: str, impl: str) -> torch.nn.Module:
    if reason := hf_models.missing(name):
        pytest.skip(reason)  # an architecture newer than the installed transformers
    return hf_models.build(name, impl)


def tiny(name: str, impl: str = "grouped_mm", dtype=torch.float32) -> torch.nn.Module:
    """A fresh copy of the module-cached tiny model (apply rewrites in place; compile rebinds weights)."""
    return copy.deepcopy(_built(name, impl)).to(dtype)


def expected_blocks(name: str) -> int:
    arch = hf_models.ARCHITECTURES[name]
    return 0 if arch.refused else arch.moe_blocks


def _compile_and_check(model, inputs, expected_blocks: int, dtype) -> list:
    with torch.no_grad():
        ref = hf_models.logits(model(**inputs))
        counters.clear()
        first = len(last_reports())
        out = hf_models.logits(torch.compile(model, backend="moe_fx", options={"inner": "eager"})(**inputs))
    reports = last_reports()[first:]
    text = "\n".join(map(str, reports))
    assert counters["moe_fx"]["rewritten"] == expected_blocks, text
    assert rel_err(out, ref) < TOL[dtype], text
    return [m for r in reports for m in r.matches]


def _apply_and_check(model, inputs, expected_blocks: int, dtype):
    with torch.no_grad():
        ref = hf_models.logits(model(**inputs))
    report = moe_fx.apply(model, **inputs)
    assert len(report.matches) == expected_blocks, str(report)
    with torch.no_grad():
        assert rel_err(hf_models.logits(model(**inputs)), ref) < TOL[dtype], str(report)
    return report


# bf16 on every architecture that is rewritten (a refusal is dtype-blind: fp32 shows it); of the shrink=True
# architectures added with transformers 5.x, on those whose blocks differ from the ones before them
BF16_ADDED = {"gemma4", "lara_mini", "minimax_m3_vl", "openai_privacy_filter", "qwen3_5_moe"}
COMPILE_CASES = [(name, torch.float32) for name in hf_models.ARCHITECTURES] + [
    (name, torch.bfloat16)
    for name, arch in hf_models.ARCHITECTURES.items()
    if not arch.refused and name not in BF16_OPEN and (not arch.shrink or name in BF16_ADDED)
]


def _ids(cases):
    return [f"{n}-{str(d).removeprefix('torch.')}" for n, d in cases]


@five
@pytest.mark.parametrize(("name", "dtype"), COMPILE_CASES, ids=_ids(COMPILE_CASES))
def test_every_architecture_compile(name, dtype):
    """Every block rewritten, logits equal eager; a refused architecture is left untouched, still equal."""
    model = tiny(name, dtype=dtype)
    # a refused model must still hold experts: a tiny config that builds no MoE layer would pass vacuously
    # (Doge's CDMoE experts are embeddings, `down_embed`/`up_embed`)
    assert any(".experts." in n or ".down_embed." in n for n, _ in model.named_parameters())
    matches = _compile_and_check(model, hf_models.example_inputs(model), expected_blocks(name), dtype)
    assert all(m.spec.experts.dtype == str(dtype).removeprefix("torch.") for m in matches)


# apply captures twice (the whole model, then each block's module): bf16 on the representative subset
APPLY_CASES = [(name, torch.float32) for name in hf_models.ARCHITECTURES] + [
    (name, torch.bfloat16) for name in IMPL_SUBSET if name not in BF16_OPEN
]


@five
@pytest.mark.parametrize(("name", "dtype"), APPLY_CASES, ids=_ids(APPLY_CASES))
def test_every_architecture_apply(name, dtype):
    """Captured on batch 2 x 7 tokens, the rewritten blocks then serve other shapes too (one token, batch 3 x 5:
    `moe_fx/capture/guards.py`), equal eager, without running an original block."""
    model = tiny(name, dtype=dtype)
    others = [hf_models.example_inputs(model, T=1, batch=1, seed=1), hf_models.example_inputs(model, T=5, batch=3)]
    with torch.no_grad():
        refs = [hf_models.logits(model(**inputs)) for inputs in others]
    expected = 0 if name in APPLY_OPEN else expected_blocks(name)
    report = _apply_and_check(model, hf_models.example_inputs(model), expected, dtype)
    assert all(m.spec.experts.dtype == str(dtype).removeprefix("torch.") for m in report.matches)
    with no_fallback(), torch.no_grad():
        for inputs, ref in zip(others, refs):
            assert rel_err(hf_models.logits(model(**inputs)), ref) < TOL[dtype], str(report)
    # the block's module, not the model: below a decoder layer, or the layer itself (DiffusionGemma's `layers.0`)
    layers = list(getattr(model.base_model, "layers", ()))
    assert all(m.module_path.count(".") >= 2 or model.get_submodule(m.module_path) in layers for m in report.matches)


# The value over the dropped groups: -inf in transformers 5's DeepSeek-V3 and Kimi-Linear, 0.0 in AXK2's
GROUP_FILLS = {"deepseek_v3": float("-inf"), "kimi_linear": float("-inf"), "axk2": 0.0}


@five
@pytest.mark.parametrize("name", GROUP_FILLS)
def test_group_fill_where_the_correction_bias_makes_scores_negative(name):
    """Trained correction biases can make every kept expert's value negative; then -inf over the dropped groups
    picks other experts than 0.0 would. The fill is read off the graph, and a -inf router's rewrite equals
    eager there (for a 0.0 router the dropped experts then tie at 0.0, which top-k breaks as it likes)."""
    model = tiny(name)
    fill = GROUP_FILLS[name]
    if fill:
        with torch.no_grad():
            for buf_name, buf in model.named_buffers():
                if buf_name.endswith("e_score_correction_bias"):
                    buf.copy_(torch.randn(buf.shape) * 0.1 - 2.0)
    report = _apply_and_check(model, hf_models.example_inputs(model), expected_blocks(name), torch.float32)
    assert {m.spec.router.group_fill for m in report.matches} == {fill}, str(report)


CLAMPED_SILU = ["deepseek_v4", "glm5_next", "hy_v4", "hy_v4_vl"]


@five
@pytest.mark.parametrize("name", CLAMPED_SILU)
def test_clamped_silu_experts_equal_eager_where_the_clamp_acts(name):
    """The tiny models' gate and up values stay far below swiglu_limit (10). With the experts' gate_up_proj
    scaled so that they reach 3x the limit, the clamps change the logits, and the rewrite still equals eager."""
    model = tiny(name)
    inputs = hf_models.example_inputs(model)
    experts = next(m for n, m in model.named_modules() if n.endswith(".experts"))
    attr = "limit" if hasattr(experts, "limit") else "swiglu_limit"
    limit = getattr(experts, attr)
    x = []
    hook = experts.register_forward_pre_hook(lambda module, args: x.append(args[0]))
    with torch.no_grad():
        model(**inputs)
        hook.remove()
        largest = (x[0] @ experts.gate_up_proj.transpose(1, 2)).abs().max()  # gate and up values of every expert
        experts.gate_up_proj.mul_(3 * limit / largest)
        ref = hf_models.logits(model(**inputs))
        setattr(experts, attr, float("inf"))
        assert rel_err(hf_models.logits(model(**inputs)), ref) > 1e-2  # without the clamps: far off
        setattr(experts, attr, limit)
    (match,) = _compile_and_check(model, inputs, 1, torch.float32)
    assert (match.spec.experts.activation, match.spec.experts.limit) == ("clamped_silu_gated", limit)


# Picks each capacity router drops, from its outputs: Switch's capacity-masked one-hot [B, S, E] (a dropped
# token's row is zero); NLLB's combine weights [T, E] (nonzero for the kept ones of each token's two picks)
DROPPED_PICKS = {
    "switch_transformers": lambda out: int((out[0].sum(-1) == 0).sum()),
    "nllb_moe": lambda out: 2 * out[1].shape[0] - int((out[1] > 0).sum()),
}


@pytest.mark.parametrize("name", sorted(DROPPED_PICKS))
def test_capacity_really_drops_on_the_example_inputs(name):
    """The capacity models' configs drop picks in eager on the inputs the compile and apply tests use, so
    those tests (left untouched, logits equal eager) cover dropping."""
    model = tiny(name)
    dropped = []
    routers = [m for m in model.modules() if type(m).__name__.endswith("Router") and hasattr(m, "expert_capacity")]
    hooks = [r.register_forward_hook(lambda mod, args, out: dropped.append(DROPPED_PICKS[name](out))) for r in routers]
    with torch.no_grad():
        model(**hf_models.example_inputs(model))
    for h in hooks:
        h.remove()
    assert len(dropped) == hf_models.ARCHITECTURES[name].moe_blocks and sum(dropped) > 0, dropped


@five
@pytest.mark.parametrize("impl", ["batched_mm", "eager"])
@pytest.mark.parametrize("name", IMPL_SUBSET)
def test_other_experts_implementations(name, impl):
    """batched_mm is traced as it is; eager's loop is traced as batched_mm while moe_fx captures."""
    arch = hf_models.ARCHITECTURES[name]
    inputs = hf_models.example_inputs(_built(name, impl))
    matches = _compile_and_check(tiny(name, impl), inputs, arch.moe_blocks, torch.float32)
    assert {m.form for m in matches} == {"batched_mm"}
    torch._dynamo.reset()
    model = tiny(name, impl)
    _apply_and_check(model, inputs, arch.moe_blocks, torch.float32)
    assert model.config._experts_implementation == impl  # restored: only tracing saw batched_mm


@five
def test_eager_experts_still_run_the_loop_outside_capture():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from moe_fx.capture.hf_experts import traceable_eager_experts

    sentinel = object()
    with traceable_eager_experts():
        assert ALL_EXPERTS_FUNCTIONS.get_interface("eager", sentinel) is sentinel
    assert ALL_EXPERTS_FUNCTIONS.get_interface("eager", sentinel) is sentinel


@five
@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_generate_after_apply_and_under_compile(name):
    model = tiny(name)
    ids = hf_models.example_inputs(model, T=6, batch=1)["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False)
        # generate() calls forward: compile that (an OptimizedModule's generate would run the original)
        model.forward = torch.compile(model.forward, backend="moe_fx", options={"inner": "eager"})
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), ref)
    assert counters["moe_fx"]["rewritten"] >= hf_models.ARCHITECTURES[name].moe_blocks
    torch._dynamo.reset()
    model = tiny(name)
    report = moe_fx.apply(model, ids)
    assert moe_fx.apply(model, ids) is report  # a second apply is a no-op
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), ref)


@five
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "llama4", "dbrx"])  # dbrx: flat [E·F, D] weights
def test_state_dict_and_save_pretrained_round_trip(name, tmp_path):
    model = tiny(name)
    inputs = hf_models.example_inputs(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    keys = set(model.state_dict())
    before = copy.deepcopy(model.state_dict())
    moe_fx.apply(model, **inputs)
    after = model.state_dict()
    assert set(after) == keys
    assert all(torch.equal(after[k], before[k]) for k in keys)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(reloaded(**inputs).logits, ref) < 1e-5
    # a checkpoint written before the rewrite loads into the rewritten model (weights are views)
    fresh = tiny(name)
    moe_fx.apply(fresh, **inputs)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()  # in place: expert parameters are views of the stacked weights
    fresh.load_state_dict(before)
    with torch.no_grad():
        assert rel_err(fresh(**inputs).logits, ref) < 1e-5


@pytest.mark.skipif(not TRANSFORMERS_4, reason="the transformers 4.57 forms (`.ci/transformers457` runs this)")
@pytest.mark.parametrize("name", hf_models.TRANSFORMERS_4)
def test_transformers4_forms(name):
    """transformers 4.57: the forms Dynamo captures whole are rewritten by compile and apply; the loops over the
    experts hit by apply alone (`apply_only_4x`). Logits equal eager either way."""
    arch = hf_models.ARCHITECTURES[name]
    model = tiny(name, impl=None)
    expected = 0 if arch.refused else arch.moe_blocks
    _compile_and_check(model, hf_models.example_inputs(model), 0 if arch.apply_only_4x else expected, torch.float32)
    if expected:  # a refusal shows under compile; apply's second capture would only repeat it
        torch._dynamo.reset()
        model = tiny(name, impl=None)
        report = _apply_and_check(model, hf_models.example_inputs(model), expected, torch.float32)
        if arch.apply_only_4x:  # and the ordinary capture's rejection of the split block is gone
            assert all("loop over the experts hit" in m.capture_note for m in report.matches), str(report)
            assert not report.rejections, str(report)
            one = hf_models.example_inputs(model, T=1, batch=1, seed=1)  # a decode step: the rewrite serves it
            with no_fallback(), torch.no_grad():
                out, ref = hf_models.logits(model(**one)), hf_models.logits(tiny(name, impl=None)(**one))
            assert rel_err(out, ref) < TOL[torch.float32]
