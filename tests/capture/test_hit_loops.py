"""Loops over the experts hit (`moe_fx.capture.hit_loops`), written as transformers 4.57 writes its Mixtral, Qwen and
DeepSeek-V3 blocks: `apply` captures them as loops over every expert and installs the rewrite only where it agrees
with the original forward; a loop whose experts without tokens do something is left untouched with the reason;
`torch.compile(backend="moe_fx")` leaves them all untouched. (The real 4.57 models: `test_hf.py::
test_transformers4_forms`, run by `.ci/transformers457`.)"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moe_fx
from moe_fx.capture import hit_loops
from tests.conftest import FALLBACK, TOLERANCE, rel_err

D, FF, E = 32, 48, 8


class Expert(nn.Module):
    """transformers 4.57's per-expert MLP (Mixtral's w1, w3, w2)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False)
        self.w2 = nn.Linear(FF, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HitLoopMoE(nn.Module):
    """transformers 4.57's Mixtral block in its structure. `loop`: "hit", over `nonzero()` of the experts hit (Mixtral,
    Qwen2/3-MoE); "numel", over every expert with `if top_x.numel() > 0:` (DeepSeek-V3); "truthy", the same with
    `if top_x.numel():`. `idle_bias`: an expert without tokens adds a bias of its own (the loop is then no MoE)."""

    def __init__(self, loop: str = "hit", k: int = 2, idle_bias: bool = False):
        super().__init__()
        self.loop, self.k, self.idle_bias = loop, k, idle_bias
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(E))
        self.bias = nn.Parameter(torch.randn(E, D) * 0.1)

    def forward(self, hidden_states):
        B, S, _ = hidden_states.shape
        x_TD = hidden_states.view(-1, D)
        logits_TE = self.gate(x_TD)
        weights_TK = F.softmax(logits_TE, dim=1, dtype=torch.float)
        weights_TK, ids_TK = torch.topk(weights_TK, self.k, dim=-1)
        weights_TK = (weights_TK / weights_TK.sum(dim=-1, keepdim=True)).to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(ids_TK, num_classes=E).permute(2, 1, 0)
        experts = torch.greater(mask_EKT.sum(dim=(-1, -2)), 0).nonzero() if self.loop == "hit" else range(E)
        for e in experts:
            slot, top_x = torch.where(mask_EKT[e].squeeze(0))
            if self.loop == "numel" and top_x.numel() > 0 or self.loop == "truthy" and top_x.numel():
                hit = True
            else:
                hit = self.loop == "hit"
            if hit:
                y = self.experts[e](x_TD[None, top_x].reshape(-1, D)) * weights_TK[top_x, slot, None]
                out_TD.index_add_(0, top_x, y.to(x_TD.dtype))
            elif self.idle_bias:
                out_TD = out_TD + self.bias[e]
        return out_TD.view(B, S, D), logits_TE


def _batches():
    g = torch.Generator().manual_seed(1)
    one_token = torch.randn(1, 1, D, generator=g).expand(1, 5, D).contiguous()  # 2 experts hit, 6 without tokens
    return [torch.randn(1, n, D, generator=g) for n in (10, 1, 7)] + [one_token]


def _apply(model):
    """(report, outputs of the rewritten model, outputs of an untouched copy) on `_batches`; no fallback."""
    torch.manual_seed(0)
    model = model.eval()
    original = copy.deepcopy(model)
    batches = _batches()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = [original(x) for x in batches]
        report = moe_fx.apply(model, batches[0])
        outs = [model(x) for x in batches]
    assert not [w for w in caught if FALLBACK in str(w.message)]
    return report, outs, expected


@pytest.mark.parametrize("loop", ["hit", "numel", "truthy"])
def test_apply_rewrites_a_loop_over_the_experts_hit(loop):
    torch.manual_seed(0)
    report, outs, expected = _apply(HitLoopMoE(loop))
    assert len(report.matches) == 1 and not report.rejections, str(report)
    match = report.matches[0]
    assert match.capture_note.startswith("its loop over the experts hit was captured as a loop over every expert")
    assert match.errors["against the original forward"] < TOLERANCE[torch.float32]
    for (out, logits), (ref, ref_logits) in zip(outs, expected):
        assert rel_err(out, ref) < TOLERANCE[torch.float32]
        assert torch.equal(logits, ref_logits)


def test_a_loop_whose_experts_without_tokens_act_is_left_untouched():
    """Captured with the branch taken, the loop is an MoE block and the graph check passes; only the original
    forward, on probes with experts that get no token, shows the idle experts' biases."""
    torch.manual_seed(0)
    report, outs, expected = _apply(HitLoopMoE("numel", idle_bias=True))
    assert not report.matches, str(report)
    assert any("disagrees with the original forward" in r.reason for r in report.rejections), str(report)
    for (out, _), (ref, _) in zip(outs, expected):
        assert torch.equal(out, ref)


def test_one_expert_per_token_keeps_the_axis_squeeze_drops():
    """k = 1: `mask[e].squeeze(0)` drops the leading axis the 1-element index keeps, not the slot axis (of size 1
    here), as the original's 1-element tensor index does."""
    torch.manual_seed(0)
    report, outs, expected = _apply(HitLoopMoE("hit", k=1))
    assert len(report.matches) == 1 and report.matches[0].spec.router.k == 1, str(report)
    for (out, _), (ref, _) in zip(outs, expected):
        assert rel_err(out, ref) < TOLERANCE[torch.float32]


class IndexedHitExperts(nn.Module):
    """transformers 4.57's GPT-OSS experts loop on the CPU (and 5.x Switch's), in a module of its own: 3-D weights
    indexed by `expert_idx[0]` of each row of `nonzero()[:]`, over E + 1 mask classes, skipping the last."""

    def __init__(self):
        super().__init__()
        self.w13 = nn.Parameter(torch.randn(E, D, 2 * FF) / D**0.5)
        self.w2 = nn.Parameter(torch.randn(E, FF, D) / FF**0.5)

    def forward(self, x_TD, ids_TK, weights_TK):
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(ids_TK, num_classes=E + 1).permute(2, 1, 0)
        for expert_idx in torch.greater(mask_EKT.sum(dim=(-1, -2)), 0).nonzero()[:]:
            expert_idx = expert_idx[0]
            if expert_idx == E:
                continue
            slot, top_x = torch.where(mask_EKT[expert_idx])
            gate, up = (x_TD[top_x] @ self.w13[expert_idx]).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.w2[expert_idx] * weights_TK[top_x, slot, None]
            out_TD.index_add_(0, top_x, y.to(x_TD.dtype))
        return out_TD


class IndexedHitLoopMoE(nn.Module):
    """The router here, the loop in a submodule."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = IndexedHitExperts()

    def forward(self, hidden_states):
        x_TD = hidden_states.reshape(-1, D)
        weights_TK, ids_TK = torch.topk(F.softmax(self.gate(x_TD), dim=-1), 2, dim=-1)
        return self.experts(x_TD, ids_TK, weights_TK).view(hidden_states.shape)


class Decoder(nn.Module):
    """Two blocks under a module of their own."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(IndexedHitLoopMoE() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_a_loop_in_a_submodule_that_reads_the_hit_rows_first_element():
    torch.manual_seed(0)
    report, outs, expected = _apply(Decoder())
    assert [m.module_path for m in report.matches] == ["blocks.0", "blocks.1"] and not report.rejections, str(report)
    for out, ref in zip(outs, expected):
        assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_compile_leaves_the_loops_untouched():
    """Under torch.compile nothing checks the captured loop against the original, so the switch stays off: the
    loop graph-breaks, as under any backend."""
    torch.manual_seed(0)
    model = HitLoopMoE("hit").eval()
    x = _batches()[0]
    with torch.no_grad():
        ref = model(x)[0]
        torch._dynamo.reset()
        counters.clear()
        out = torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x)[0]
    assert counters["moe_fx"]["rewritten"] == 0
    assert torch.equal(out, ref)
    assert not hit_loops.SWITCH.active


def test_explain_reports_what_apply_would_do_and_leaves_the_model_as_it_is():
    torch.manual_seed(0)
    model = HitLoopMoE("hit").eval()
    x = _batches()[0]
    with torch.no_grad():
        ref = model(x)[0]
        report = moe_fx.explain(model, x)
        out = model(x)[0]
    assert len(report.matches) == 1 and not report.rejections, str(report)
    assert report.matches[0].capture_note.startswith("its loop over the experts hit")
    assert "forward" not in vars(model)  # no rewritten forward installed
    assert torch.equal(out, ref)


def test_a_quantised_rewrite_is_checked_over_the_probes_together():
    """fp8 (the reference lowering's true fp8 arithmetic on the CPU): the check pools each output's error over the
    probes, against the mode's expected error, as the graph check does."""
    torch.manual_seed(0)
    model = HitLoopMoE("hit").eval()
    x = _batches()[0]
    report = moe_fx.apply(model, x, options={"quant": "fp8"})
    assert len(report.matches) == 1, str(report)
    assert 1e-3 < report.matches[0].errors["against the original forward"] < 8e-2


class Stats:
    """Not a pytree: export can't return it."""

    def __init__(self, logits):
        self.logits = logits


class ReturnsStats(HitLoopMoE):
    def forward(self, hidden_states):
        out, logits = super().forward(hidden_states)
        return out, Stats(logits)


def test_an_owner_whose_output_export_cannot_flatten_is_tried_once(monkeypatch):
    """The loop's owner returns an object export can't flatten: every capture mode would fail alike, so the
    capture is tried once (each try traces the whole owner), and the block is left as it is."""
    from moe_fx import api

    exports = []
    export = api._export
    monkeypatch.setattr(api, "_export", lambda *a: exports.append(1) or export(*a))
    torch.manual_seed(0)
    model = ReturnsStats("hit").eval()
    x = _batches()[0]  # batch 1: the modes that fix sizes of 1 are tried after the first
    with torch.no_grad():
        ref = model(x)[0]
        report = moe_fx.apply(model, x)
        out = model(x)[0]
    assert len(exports) == 1 and not report.matches, str(report)
    assert torch.equal(out, ref)
