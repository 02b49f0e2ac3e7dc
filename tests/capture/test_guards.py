"""`apply`'s capture on examples Dynamo would over-fit (equal sizes, a size of 1), and the guards that keep a call
outside what the capture assumed on the original block (moe_fx/capture/guards.py)."""

import copy
import warnings

import pytest
import torch

import moe_fx
from moe_fx import examples as ex
from tests.conftest import TOLERANCE, no_fallback, rel_err

CALLS_3D = ((4, 4), (2, 5), (5, 2), (1, 1), (3, 1), (1, 6), (0, 3))


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _mixtral_block(D: int = 64):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(hidden_size=D, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():  # a block built alone is not initialised
            p.normal_(0, 0.05)
    return block


def _runs_rewritten(model, reference, shapes):
    """Every call runs the rewritten graph (a fallback warns: an error here) and matches the original."""
    with no_fallback(), torch.no_grad():
        for shape in shapes:
            x = torch.randn(*shape)
            out, ref = _out(model(x)), _out(reference(x))
            assert out.shape == ref.shape, shape
            if ref.numel():
                assert rel_err(out, ref) < TOLERANCE[torch.float32], shape


def _runs_original(model, reference, args: tuple, why: str):
    """A call outside the capture runs the original block, with a warning matching `why`, and equals it."""
    with torch.no_grad(), pytest.warns(UserWarning, match=why):
        out = model(*args)
    with torch.no_grad():
        assert rel_err(out, reference(*args)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("example", [(4, 4), (1, 1), (1, 5), (3, 1)])
def test_hf_block_captured_on_any_example_runs_every_size(example):
    """Dynamo's default capture fits (4, 4) as batch == seq (a reshape by one size for both: a (2, 5) call
    failed) and (1, 1) as one token (every other call ran the original block)."""
    block = _mixtral_block()
    reference = copy.deepcopy(block)
    report = moe_fx.apply(block, torch.randn(*example, 64))
    assert len(report.matches) == 1
    assert block.forward.guards.fixed[0][1][2] == (None, None, 64)  # batch, seq symbolic; D fixed by the weights
    _runs_rewritten(block, reference, [(*s, 64) for s in CALLS_3D])


@pytest.mark.parametrize("T", [1, 32])
def test_loop_block_captured_on_one_token_or_T_equal_to_D(T):
    """T = 1 was a constant; T = D (32) shared the hidden size's symbol, which the weights fix: T became 32."""
    model = ex.LoopMoE().eval()
    reference = copy.deepcopy(model)
    assert moe_fx.apply(model, torch.randn(T, 32)).matches[0].capture_note == ""  # every call
    _runs_rewritten(model, reference, [(t, 32) for t in (1, 32, 7, 0, 2)])


@pytest.mark.parametrize("stacked", [False, True])
def test_dense_block_with_a_shared_expert_captured_on_one_token(stacked):
    """`torch._dynamo.export` runs the traced graph once more on fake tensors, whose einsum of gates by stacked
    expert outputs guarded Eq(D·T², D·T) for a one-token example: every call with T > 1 ran the original
    block. A guard added after tracing is an op's metadata, not a branch of the code."""
    model = ex.NaiveMoE(dim=16, ffn=8, form="dense", stacked=stacked, bias=True, shared=True).eval()
    reference = copy.deepcopy(model)
    report = moe_fx.apply(model, torch.randn(1, 16))
    assert len(report.matches) == 1 and report.matches[0].capture_note == ""  # every call
    assert model.forward.guards.branched == []
    _runs_rewritten(model, reference, [(t, 16) for t in (1, 5, 16, 0, 2)])


class _BranchOnTokens(ex.LoopMoE):
    """Code that branches on a size: the graph holds the branch taken on the example only."""

    def forward(self, x):
        if x.shape[0] > 4:
            x = x * 2
        return super().forward(x)


def test_a_branch_on_a_size_is_guarded():
    """Captured on 6 tokens, the graph doubles x; a call with 3 tokens must run the original block (it ran the
    graph, silently wrong, before the relations Dynamo guarded on were checked)."""
    model = _BranchOnTokens().eval()
    reference = copy.deepcopy(model)
    moe_fx.apply(model, torch.randn(6, 32))
    assert [text for _, text in model.forward.guards.branched] == ["input 0.size(0) > 4"]
    assert model._moe_fx_report.matches[0].capture_note == (
        "calls with every size, where input 0.size(0) > 4; other calls run the original block"
    )
    _runs_rewritten(model, reference, [(6, 32), (5, 32), (9, 32)])
    why = r"branched on input 0.size\(0\) > 4, which this call's sizes \(input 0.size\(0\) = 3\) do not meet"
    _runs_original(model, reference, (torch.randn(3, 32),), why)


class _AddsABias(ex.LoopMoE):
    def forward(self, x, bias):
        return super().forward(x + bias)


def test_sizes_tied_in_the_example_are_checked():
    """x + bias ties the two token counts in the capture; a call where they differ (bias broadcast) runs the
    original block, with the reason."""
    model = _AddsABias().eval()
    reference = copy.deepcopy(model)
    moe_fx.apply(model, torch.randn(6, 32), torch.randn(6, 32))
    x, bias = torch.randn(5, 32), torch.randn(1, 32)
    _runs_original(model, reference, (x, bias), r"input 1.size\(0\) is 1, captured as input 0.size\(0\)")
    with torch.no_grad():
        assert rel_err(model(x, bias.expand(5, 32)), reference(x, bias)) < TOLERANCE[torch.float32]


def test_what_the_guards_refuse_is_named():
    model = ex.LoopMoE().eval()
    moe_fx.apply(model, torch.randn(6, 32))
    guards = model.forward.guards
    assert guards.failure([torch.randn(1, 32)]) is None
    expected = "input 0 is (6, 32) torch.float64 on cpu; the block was captured for (None, 32) (None: any size) "
    assert guards.failure([torch.randn(6, 32, dtype=torch.float64)]) == expected + "torch.float32 on cpu"
    assert "captured for (None, 32)" in guards.failure([torch.randn(6, 16)])


def test_a_block_matched_only_with_fixed_sizes_is_captured_as_dynamo_does():
    """Loop experts seen as one opaque op: a one-token capture that keeps 0 and 1 symbolic leaves the hidden size
    a symbol the matcher cannot compare with the weights', so the block is captured again with Dynamo's default
    (sizes 1 fixed): rewritten for one token, the original block (with the reason) for other sizes."""
    from tests.capture.test_opaque_experts import Block, D

    model = Block().eval()
    reference = copy.deepcopy(model)
    assert len(moe_fx.apply(model, torch.randn(1, 1, D)).matches) == 1
    assert model.forward.guards.fixed[0][1][2] == (1, 1, D)
    assert "capture 0: calls with input 0 (1, 1, 32); other calls run" in str(model._moe_fx_report)
    _runs_rewritten(model, reference, [(1, 1, D)])
    _runs_original(model, reference, (torch.randn(2, 5, D),), rf"captured for \(1, 1, {D}\)")


class _BranchOnMoreThanOne(ex.LoopMoE):
    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return super().forward(x)


@pytest.mark.parametrize(
    "mode, why",
    [
        ("dynamo", r"input 0.size\(0\) is 1; the block was captured for sizes >= 2"),
        ("every_size", r"branched on input 0.size\(0\) > 1"),
    ],
    ids=["dynamo", "every_size"],
)
def test_a_branch_on_more_than_one_token(mode, why, monkeypatch):
    """Dynamo's default capture decides `x.shape[0] > 1` with no guard (every size >= 2 to it): its graph must
    not serve one token. The capture that keeps 0 and 1 symbolic guards the branch instead."""
    from moe_fx import api
    from moe_fx.capture.guards import capturing

    monkeypatch.setattr(api, "capturing", lambda _, example: capturing(mode, example))
    model = _BranchOnMoreThanOne().eval()
    reference = copy.deepcopy(model)
    report = moe_fx.apply(model, torch.randn(6, 32))
    assert (
        report.matches[0].capture_note
        == {
            "dynamo": "calls with every size, where every * >= 2; other calls run the original block",
            "every_size": "calls with every size, where input 0.size(0) > 1; other calls run the original block",
        }[mode]
    )
    _runs_rewritten(model, reference, [(6, 32), (2, 32)])
    _runs_original(model, reference, (torch.randn(1, 32),), why)


class _ScalesTokens(ex.LoopMoE):
    def forward(self, x, scale):
        return super().forward(x * scale)


def test_a_size_one_input_broadcast_against_the_tokens():
    """x_TD * scale_1D: with the 1 a symbol too the trace cannot broadcast it (the symbol may be any size), so the
    capture fixes the example's sizes of 1 and keeps the rest symbolic, 0 and 1 included: one token still runs
    the rewritten block."""
    model = _ScalesTokens().eval()
    reference = copy.deepcopy(model)
    scale = torch.rand(1, 32) + 0.5
    moe_fx.apply(model, torch.randn(6, 32), scale)
    assert [sizes for _, (_, _, sizes) in model.forward.guards.fixed] == [(None, 32), (1, 32)]
    assert not hasattr(scale, "_dynamo_static_indices")  # the marks the capture set are gone
    with no_fallback(), torch.no_grad():
        for T in (6, 1, 0, 9):
            x = torch.randn(T, 32)
            out, ref = model(x, scale), reference(x, scale)
            assert out.shape == ref.shape and (T == 0 or rel_err(out, ref) < TOLERANCE[torch.float32])


class _AddsPositions(ex.LoopMoE):
    def forward(self, x_BTD, positions_1TD):
        h_BTD = x_BTD + positions_1TD  # position embeddings of batch 1, as HF's rotary ones
        return super().forward(h_BTD.reshape(-1, h_BTD.shape[-1])).reshape(h_BTD.shape)


def test_a_batch_one_input_broadcast_on_a_one_token_example():
    """x_BTD + positions_1TD on a decode-shaped example (B=2, T=1): with every size a symbol the trace cannot
    broadcast the 1 (it may be any size); fixing every size of 1 fixed T=1 too (every longer call ran the original
    block). The capture fixes the positions' batch alone, where the other input is larger: every T runs."""
    model = _AddsPositions().eval()
    reference = copy.deepcopy(model)
    moe_fx.apply(model, torch.randn(2, 1, 32), torch.randn(1, 1, 32))
    assert [sizes for _, (_, _, sizes) in model.forward.guards.fixed] == [(None, None, 32), (1, None, 32)]
    with no_fallback(), torch.no_grad():
        for B, T in ((2, 1), (2, 5), (3, 9), (1, 4)):
            x, positions = torch.randn(B, T, 32), torch.randn(1, T, 32)
            assert rel_err(model(x, positions), reference(x, positions)) < TOLERANCE[torch.float32]


def test_a_later_compile_of_the_model_traces_the_checks():
    """apply, then torch.compile of the whole model: Dynamo traces the checks (guards on the sizes, no graph break
    of their own), so a compiled call that breaks the branch's condition still runs the original block."""
    from torch._dynamo.utils import counters

    model = _BranchOnTokens().eval()
    reference = copy.deepcopy(model)
    moe_fx.apply(model, torch.randn(6, 32))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for T in (6, 7, 3):
            x = torch.randn(T, 32)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = compiled(x)
            assert rel_err(out, reference(x)) < TOLERANCE[torch.float32], T
            assert any("branched on input 0.size(0) > 4" in str(w.message) for w in caught) == (T == 3), T
    breaks = " ".join(counters["graph_break"])
    assert "sympy" not in breaks and "tp_iter" not in breaks, breaks


def test_an_error_of_the_rewrite_is_raised_not_reported_as_a_capture_failure(monkeypatch):
    from moe_fx import api

    def fails(*args, **kwargs):
        raise ValueError("moe_fx: the rewrite's own error")

    monkeypatch.setattr(api, "rewrite_graph", fails)
    with pytest.raises(ValueError, match="the rewrite's own error"):
        moe_fx.apply(ex.LoopMoE().eval(), torch.randn(6, 32))
