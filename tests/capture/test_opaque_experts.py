"""Experts modules whose loop never reaches a Dynamo graph (`moe_fx/capture/opaque_experts.py`): captured as one
`moe_fx::opaque_experts` op, identified by probing the loop, rewritten; left untouched, equal, when not."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moe_fx
from moe_fx.backend import last_reports
from moe_fx.capture.opaque_experts import SWITCH, _install, has_contract
from tests.conftest import TOLERANCE, rel_err

E, K, D, FF = 6, 2, 32, 40


class FlatLoopExperts(nn.Module):
    """DBRX's form: weights stored flat [E·F, D], a loop over the experts hit with `.item()`, which
    Dynamo cannot trace."""

    def __init__(self, tanh_experts=False):
        super().__init__()
        self.tanh_experts = tanh_experts
        self.w1 = nn.Parameter(torch.randn(E * FF, D) / D**0.5)
        self.v1 = nn.Parameter(torch.randn(E * FF, D) / D**0.5)
        self.w2 = nn.Parameter(torch.randn(E * FF, D) / FF**0.5)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        x_TD = hidden_states.reshape(-1, D)
        out_TD = torch.zeros_like(x_TD)
        hit = torch.unique(top_k_index).nonzero()  # data-dependent: a graph break under plain Dynamo
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            w1, v1, w2 = (w.view(E, FF, D)[e] for w in (self.w1, self.v1, self.w2))
            x = x_TD[token]
            h = torch.tanh(x @ w1.T) if self.tanh_experts else F.silu(x @ w1.T) * (x @ v1.T)
            out_TD.index_add_(0, token, (h @ w2) * top_k_weights[token, slot, None])
        del hit
        return out_TD.view(hidden_states.shape)


class Block(nn.Module):
    def __init__(self, tanh_experts=False):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.experts = FlatLoopExperts(tanh_experts)

    def forward(self, x_BSD):
        probs_TE = F.softmax(self.router(x_BSD.reshape(-1, D)), dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, K, dim=-1)
        return x_BSD + self.experts(x_BSD, ids_TK, weights_TK / weights_TK.sum(-1, keepdim=True))


def test_the_contract_is_read_off_the_forward_signature():
    assert has_contract(_original(FlatLoopExperts))
    assert not has_contract(Block.forward)


def _original(cls):
    forward = cls.forward
    return getattr(forward, "moe_fx_original", forward)


@pytest.mark.parametrize("T", [1, 9])
def test_loop_experts_are_rewritten_under_compile(T):
    model = Block().eval()
    x = torch.randn(1, T, D)
    with torch.no_grad():
        ref = model(x)
        counters.clear()
        out = torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x)
    report = last_reports()[-1]
    assert counters["moe_fx"]["rewritten"] == 1, str(report)
    assert report.graph_breaks == 0 and report.matches[0].form == "expert_loop"
    assert report.matches[0].spec.experts.gate_up == "separate" and report.matches[0].spec.experts.w2_transposed
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_apply_rewrites_loop_experts_and_reads_the_flat_parameters_in_place():
    model = Block().eval()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        ref = model(x)
    report = moe_fx.apply(model, x)
    assert len(report.matches) == 1, str(report)
    with torch.no_grad():
        assert rel_err(model(x), ref) < TOLERANCE[torch.float32]
        model.experts.w2.mul_(2.0)  # the rewritten block reads the flat parameter's storage: it follows
        doubled = model(x) - x
    assert rel_err(doubled, 2 * (ref - x)) < TOLERANCE[torch.float32]


def test_a_loop_that_is_no_known_experts_stays_and_runs_the_original():
    model = Block(tanh_experts=True).eval()  # ungated tanh experts with an unused v1: no ExpertsSpec
    x = torch.randn(1, 7, D)
    with torch.no_grad():
        ref = model(x)
        counters.clear()
        out = torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x)
    report = last_reports()[-1]
    assert counters["moe_fx"]["rewritten"] == 0 and report.rejections, str(report)
    assert "no experts spec reproduces" in report.rejections[0].reason
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the opaque op is the original forward


def test_outside_capture_the_forward_is_the_original():
    model = Block().eval()
    x = torch.randn(1, 4, D)
    with torch.no_grad():
        torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x)  # installs the patch
        plain = torch.compile(model, backend="eager")(x)  # another backend: the loop, graph breaks and all
        torch.testing.assert_close(plain, model(x), rtol=0, atol=0)


def test_the_op_runs_probe_weights_in_place_of_the_modules_and_checks_the_contract():
    experts = FlatLoopExperts()
    x = torch.randn(5, D)
    ids = torch.randint(0, E, (5, K))
    w = torch.rand(5, K)
    with SWITCH.lock:
        _install()  # what entering the capture context does first
    params = list(experts.parameters())
    same = torch.ops.moe_fx.opaque_experts(x, ids, w, params, id(experts))
    torch.testing.assert_close(same, experts(x, ids, w), rtol=0, atol=0)
    probe = [params[0], params[1], params[2] * 3]
    swapped = torch.ops.moe_fx.opaque_experts(x, ids, w, probe, id(experts))
    torch.testing.assert_close(swapped, 3 * experts(x, ids, w), rtol=1e-5, atol=1e-5)  # the probe's w2
    assert experts.w2 is params[2]  # restored
    with pytest.raises(ValueError, match="moe_fx: opaque_experts: got 1 weights, the module holds 3"):
        torch.ops.moe_fx.opaque_experts(x, ids, w, params[:1], id(experts))
