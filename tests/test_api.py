"""moe_fx.explain and moe_fx.apply on naive models: reports, memory, weight updates, grad mode; a cache passed
through a block's module (moe_fx.capture.passthrough)."""

import copy
import functools

import pytest
import torch

import moe_fx
from moe_fx import examples as ex
from moe_fx.api import _RewrittenForward
from tests.conftest import no_fallback, rel_err


def test_explain_lists_two_forms_with_specs_and_lowerings():
    model = ex.TwoFormModel().eval()
    report = moe_fx.explain(model, torch.randn(2, 5, 64))
    assert [(m.module_path, m.form) for m in report.matches] == [("moe1", "expert_loop"), ("moe2", "gather_einsum")]
    for m in report.matches:
        assert m.spec.experts.num_experts == 8 and m.spec.top_k == 2 and m.spec.router.scoring == "softmax"
        assert {op: c.name for op, c in m.lowerings.items()} == dict.fromkeys(
            ("route", "quantize_dispatch", "experts", "combine"), "reference"
        )
        assert all(c.reason for c in m.lowerings.values())
    text = str(report)
    assert "moe1" in text and "gather_einsum" in text and "softmax→top2→renorm" in text
    assert "<table>" in report._repr_html_()
    assert report.graphs == 1 and report.graph_breaks == 0


def test_explain_does_not_rewrite():
    model = ex.LoopMoE().eval()
    forward = model.forward
    moe_fx.explain(model, torch.randn(4, 32))
    assert model.forward == forward and not hasattr(model, "_moe_fx_report")


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_apply_keeps_one_copy_of_the_weights():
    model = ex.LoopMoE(dim=64, ffn=128, num_experts=8).eval()
    before = _storage_bytes(model.parameters())
    moe_fx.apply(model, torch.randn(6, 64))
    gm = model.forward.gm
    stacked = [t for name, t in gm.named_buffers() if name.startswith("moe_fx_block")]
    assert stacked, "per-expert weights are stacked"
    after = _storage_bytes([*model.parameters(), *stacked])
    assert after <= before * 1.05, (before, after)
    assert model.experts[3].w1.weight.untyped_storage().data_ptr() == stacked[0].untyped_storage().data_ptr()


def test_a_block_the_owners_capture_refuses_is_reported_at_its_path(monkeypatch):
    """apply finds the blocks on the whole model, then captures each owning module alone and rewrites that: a
    block refused there (here its verification, forced to fail) is reported at its module path in the model, as a
    match would be, and the block runs as it was."""
    from moe_fx.passes import pipeline

    model = ex.TwoFormModel().eval()
    x = torch.randn(2, 5, 64)
    ref = model(x)
    verify, seen = pipeline.verify, []

    def fails_in_the_owners_capture(finder, match):
        seen.append(match.module_path)
        return verify(finder, match) if len(seen) <= 2 else (None, "forced failure")  # 2 blocks: the whole-model pass

    monkeypatch.setattr(pipeline, "verify", fails_in_the_owners_capture)
    report = moe_fx.apply(model, x)
    assert not report.matches and len(seen) > 2
    assert sorted(r.module_path for r in report.rejections) == ["moe1", "moe2"], str(report)
    assert all("forced failure" in r.reason for r in report.rejections)
    assert torch.equal(model(x), ref)


def test_apply_twice_is_a_no_op_and_state_dict_round_trips():
    model = ex.LoopMoE().eval()
    x = torch.randn(6, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = moe_fx.apply(model, x)
    assert moe_fx.apply(model, x) is report and len(report.matches) == 1
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    fresh = ex.LoopMoE().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(model(x), fresh(x)) < 1e-6


def test_weights_loaded_after_apply_are_used():
    model, other = ex.LoopMoE().eval(), ex.LoopMoE().eval()
    x = torch.randn(8, 32)
    moe_fx.apply(model, x)
    model.load_state_dict(other.state_dict())  # copies into the parameters, now views of the stack
    with torch.no_grad():
        assert rel_err(model(x), other(x)) < 1e-5


def test_grad_mode_runs_the_original_block_with_a_warning():
    model = ex.LoopMoE().eval()
    x = torch.randn(5, 32)
    moe_fx.apply(model, x)
    with pytest.warns(UserWarning, match="grad mode"):
        out = model(x)
    out.sum().backward()
    assert model.experts[0].w1.weight.grad is not None


def test_compile_in_grad_mode_refuses_with_reason():
    from moe_fx.backend import last_reports

    model = ex.LoopMoE().eval()
    x = torch.randn(5, 32)
    out = torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x)
    assert "grad mode" in last_reports()[-1].rejections[0].reason
    out.sum().backward()


def test_apply_needs_inputs_for_a_plain_module():
    with pytest.raises(ValueError, match="moe_fx: LoopMoE needs example inputs"):
        moe_fx.apply(ex.LoopMoE())


def _passes_through(forward):
    """A decorator like transformers' `deprecate_kwarg`: Dynamo sees the module as `args[0]` of the wrapper."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class _DecoratedForward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(32, 32), ex.LoopMoE())

    @_passes_through
    def forward(self, x):
        return self.inner(x)


def test_apply_finds_blocks_under_a_decorated_forward():
    model = _DecoratedForward().eval()
    x = torch.randn(6, 32)
    with torch.no_grad():
        expected = model(x)
        report = moe_fx.apply(model, x)
        out = model(x)
    assert [m.module_path for m in report.matches] == ["inner.1"], str(report)
    assert "L[" not in str(report), str(report)
    assert isinstance(model.inner[1].forward, _RewrittenForward)
    assert rel_err(out, expected) < 1e-5


# ------------------------------------------------------- objects export cannot take (moe_fx.capture.passthrough)
class _AttentionWithCache(torch.nn.Module):
    """Attention over the tokens so far: appends this call's keys and values to a transformers cache."""

    def __init__(self, dim: int, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x_BSD, cache=None):
        q, k, v = self.qkv(x_BSD).unsqueeze(1).chunk(3, dim=-1)  # [B, 1, S, D] each
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, 1, S_past + S, D]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1)


class _LayerWithCache(ex.LoopMoE):
    """Router and experts in the layer itself, beside an attention that takes the cache (as in Gemma4's decoder
    layer): the block's owner is the layer, whose call holds the cache. `peek`: what the layer's own code also
    does with the cache (a near miss), doubling its tokens where that is true."""

    def __init__(self, dim: int, layer_idx: int, peek=None):
        super().__init__(dim=dim)
        self.attn, self.peek = _AttentionWithCache(dim, layer_idx), peek

    def forward(self, x_BSD, cache=None):
        if self.peek is not None and self.peek(cache):
            x_BSD = x_BSD * 2
        h_BSD = x_BSD + self.attn(x_BSD, cache=cache)
        return h_BSD + super().forward(h_BSD)


class _DecoderWithCache(torch.nn.Module):
    def __init__(self, dim: int = 32, layers: int = 2, peek=None):
        super().__init__()
        self.layers = torch.nn.ModuleList(_LayerWithCache(dim, i, peek) for i in range(layers))

    def forward(self, x_BSD, cache=None):
        for layer in self.layers:
            x_BSD = layer(x_BSD, cache=cache)
        return x_BSD


def test_apply_passes_a_cache_through_to_the_attention_beside_the_block():
    """The layer is captured on its tensors; the attention runs on each call's own cache (a new one per sequence,
    updated once per call), the block through moe_fx; a call without a cache runs the original layer."""
    from moe_fx.capture.passthrough import Passthrough

    DynamicCache = pytest.importorskip("transformers").DynamicCache

    model = _DecoderWithCache().eval()
    reference = copy.deepcopy(model)
    report = moe_fx.apply(model, torch.randn(2, 5, 32), cache=DynamicCache())
    assert [m.module_path for m in report.matches] == ["layers.0", "layers.1"], str(report)
    assert all(isinstance(layer.forward.passed, Passthrough) for layer in model.layers)
    for steps in ([5, 1, 3], [4, 1]):  # prefill, then decode steps; a fresh cache per sequence
        cache, ref_cache = DynamicCache(), DynamicCache()
        for tokens in steps:
            x = torch.randn(2, tokens, 32)
            with no_fallback(), torch.no_grad():  # the rewritten layers run
                out = model(x, cache=cache)
                ref = reference(x, cache=ref_cache)
            assert rel_err(out, ref) < 1e-5
            assert cache.get_seq_length() == ref_cache.get_seq_length()
            for got, want in zip(cache.layers, ref_cache.layers):  # layer 1's tokens went through a rewritten block
                assert got.keys.shape == want.keys.shape and rel_err(got.keys, want.keys) < 1e-5
                assert got.values.shape == want.values.shape and rel_err(got.values, want.values) < 1e-5
    x = torch.randn(2, 3, 32)
    with pytest.warns(UserWarning, match="is a NoneType, captured as DynamicCache"), torch.no_grad():
        out = model(x)  # cache=None: the graph was captured with a cache
    with torch.no_grad():
        assert rel_err(out, reference(x)) < 1e-5
    with pytest.warns(UserWarning, match="structured unlike the recorded call"), torch.no_grad():
        out = model.layers[0](x, DynamicCache())  # the cache by position: the example passed it by keyword
    with torch.no_grad():
        assert rel_err(out, reference.layers[0](x, DynamicCache())) < 1e-5


@pytest.mark.parametrize(
    ("peek", "why"),
    [
        ("reads it", "Dynamo found no exception handler"),  # the stand-in has no get_seq_length
        ("tests its truth", "Dynamo found no exception handler"),  # the stand-in's truth raises
        ("checks its type", "output 0 of the captured graph is not the module's"),  # the stand-in is no Cache
    ],
)
def test_apply_leaves_a_layer_that_looks_at_the_cache_itself(peek, why):
    """Near misses: the layer's own code looks at the cache (not only hands it on), so it cannot be captured on
    its tensors: left untouched with the reason, outputs equal eager."""
    transformers = pytest.importorskip("transformers")
    Cache, DynamicCache = transformers.Cache, transformers.DynamicCache
    peeks = {
        "reads it": lambda cache: cache.get_seq_length() > 0,
        "tests its truth": lambda cache: bool(cache),
        "checks its type": lambda cache: isinstance(cache, Cache),
    }
    model = _DecoderWithCache(layers=1, peek=peeks[peek]).eval()
    forward = model.layers[0].forward
    report = moe_fx.apply(model, torch.randn(2, 5, 32), cache=DynamicCache())
    assert not report.matches and len(report.rejections) == 1, str(report)
    assert "could not capture the block module whole" in report.rejections[0].reason
    assert why in report.rejections[0].reason, report.rejections[0].reason
    assert model.layers[0].forward == forward
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        out = model(x, cache=DynamicCache())
        ref = copy.deepcopy(model)(x, cache=DynamicCache())
    assert torch.equal(out, ref)


def test_apply_gemma4_generates_with_a_cache():
    """Gemma4's decoder layer holds its block and hands its cache and shared-KV dict to the attention:
    generate() with a cache runs the rewritten layer on every step and gives eager's tokens."""
    pytest.importorskip("transformers")
    from moe_fx import hf_models

    if reason := hf_models.missing("gemma4"):
        pytest.skip(reason)
    model = hf_models.build("gemma4", "grouped_mm")
    ids = hf_models.example_inputs(model, T=6, batch=1)["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    report = moe_fx.apply(model, ids, use_cache=True)
    assert len(report.matches) == hf_models.ARCHITECTURES["gemma4"].moe_blocks, str(report)
    with no_fallback(), torch.no_grad():  # every step runs the rewritten layer
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True), ref)


def test_apply_gemma4_on_one_token_serves_every_length():
    """A one-token example of Gemma4 (batch 2): its rotary embeddings have batch 1 (fixed by the capture), its
    sequence length stays a symbol (transformers' SDPA takes is_causal = length > 1, a SymBool while the fake
    run traces the attention: decided there, `passthrough._attention_flags_decided`). Before, the capture fixed
    the length at 1 and every longer call ran the original layer."""
    pytest.importorskip("transformers")
    from moe_fx import hf_models

    if reason := hf_models.missing("gemma4"):
        pytest.skip(reason)
    model = hf_models.build("gemma4", "grouped_mm").eval()
    reference = copy.deepcopy(model)
    report = moe_fx.apply(model, **hf_models.example_inputs(model, T=1, seed=0))
    assert len(report.matches) == hf_models.ARCHITECTURES["gemma4"].moe_blocks, str(report)
    with no_fallback(), torch.no_grad():
        for T in (1, 5, 9):
            x = hf_models.example_inputs(model, T=T, seed=T)
            out, ref = hf_models.logits(model(**x)), hf_models.logits(reference(**x))
            assert rel_err(out, ref) < 1e-5, T


class SkipsUnusedExperts(ex.LoopMoE):
    """An expert loop that skips experts without tokens: `if idx.numel():` (under moe_fx's capture flags Dynamo
    2.13 failed the whole capture on it: `moe_fx.capture.breaks`) or `if mask.sum():` (vLLM's reference
    torch_moe). Either is a graph break inside a loop, so Dynamo skips the frame and records no graph break."""

    def __init__(self, skip: str):
        super().__init__()
        self.skip = skip

    def forward(self, x):
        weights_TK, ids_TK = ex.softmax_topk(self.gate(x), self.k)
        out_TD = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where(ids_TK == e)
            if token_idx.numel() if self.skip == "numel" else (ids_TK == e).sum():
                out_TD.index_add_(0, token_idx, expert(x[token_idx]) * weights_TK[token_idx, slot_idx, None])
        return out_TD


@pytest.mark.parametrize("skip", ["numel", "sum"])
def test_a_frame_dynamo_skips_is_named_with_the_reason(skip):
    """The skipped frame is named; `apply` then captures `if idx.numel():` with the branch taken
    (`moe_fx.capture.hit_loops`, checked against the original forward), not `if mask.sum():`, a branch on a
    tensor's value."""
    model = SkipsUnusedExperts(skip).eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
        report = moe_fx.apply(model, x)
        out = model(x)
    assert any("Dynamo skipped the frame forward" in r for r in report.break_reasons), str(report)
    assert not any("failed under moe_fx's capture flags" in r for r in report.break_reasons), str(report)
    if skip == "numel":
        assert [m.capture_note.startswith("its loop over the experts hit") for m in report.matches] == [True]
        assert rel_err(out, ref) < 1e-5
    else:
        assert not report.matches, str(report)  # the expert modules' and softmax_topk's own frames are graphs
        assert torch.equal(out, ref)
    with torch.no_grad():  # and a torch.compile with moe_fx runs it as Dynamo does with any backend
        assert rel_err(torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x), ref) < 1e-5
