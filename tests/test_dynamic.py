"""Dynamic token counts: one dynamic graph serves every T (no recompile per T), sizes stay symbolic.

Dynamo compiles the first call with static sizes, then, on a new T, one graph with T a symbol
(`dynamic=None`); `mark_dynamic` makes the first graph dynamic already. The rewrite must keep T a
symbol: its nodes' sizes are sympy expressions in T, never the example's value.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from moe_fx import examples as ex
from tests.conftest import TOLERANCE, rel_err

TOKENS = (5, 9, 17, 33, 2)


def _moe_nodes(report_index: int = -1):
    return [n for n in _graphs[report_index].graph.nodes if n.meta.get("moe_fx")]


_graphs: list[torch.fx.GraphModule] = []


@pytest.fixture(autouse=True)
def _keep_graphs(monkeypatch):
    """Record the graphs the backend rewrote, to look at their symbolic sizes."""
    from moe_fx import backend

    rewrite_graph = backend.rewrite_graph

    def spy(gm, *args, **kwargs):
        report = rewrite_graph(gm, *args, **kwargs)
        _graphs.append(gm)
        return report

    monkeypatch.setattr(backend, "rewrite_graph", spy)
    _graphs.clear()


def _run_tokens(model, compiled, mark=False):
    with torch.no_grad():
        for T in TOKENS:
            x = torch.randn(T, 32)
            if mark:
                torch._dynamo.mark_dynamic(x, 0)
            assert rel_err(compiled(x), model(x)) < TOLERANCE[torch.float32], T


def _token_symbol_free(nodes) -> set:
    """The free sympy symbols of the combine output's token dim."""
    (combine,) = [n for n in nodes if n.meta["moe_fx"]["op"] == "combine"]
    T = combine.meta["val"].shape[0]
    assert isinstance(T, torch.SymInt), f"the token count was baked in as {T}"
    return T.node.expr.free_symbols


@pytest.mark.parametrize("cls", [ex.LoopMoE, ex.GatherEinsumMoE], ids=["loop", "gather_einsum"])
def test_dynamic_none_settles_into_one_dynamic_graph(cls):
    model = cls().eval()
    _run_tokens(model, torch.compile(model, backend="moe_fx", options={"inner": "eager"}))
    # the first T is compiled static, the second recompiles once with T dynamic, then no more
    assert counters["frames"]["ok"] == 2 and counters["stats"]["unique_graphs"] == 2
    assert counters["moe_fx"]["rewritten"] == 2 and len(_graphs) == 2
    assert _token_symbol_free(_moe_nodes(-1)), "the dynamic graph's T is a symbol"


def test_mark_dynamic_compiles_once():
    model = ex.LoopMoE().eval()
    _run_tokens(model, torch.compile(model, backend="moe_fx", options={"inner": "eager"}), mark=True)
    assert counters["frames"]["ok"] == 1 and counters["moe_fx"]["rewritten"] == 1
    symbols = _token_symbol_free(_moe_nodes(-1))
    # route's weights are [T, K]: the same symbol as the combine output, K and D stay constants
    (route,) = [n for n in _moe_nodes(-1) if n.meta["moe_fx"]["op"] == "route"]
    weights_TK = route.meta["val"][0]
    assert weights_TK.shape[0].node.expr.free_symbols == symbols and weights_TK.shape[1] == 2


def test_dynamic_true_with_inductor():
    model = ex.TwoFormModel().eval()
    compiled = torch.compile(model, backend="moe_fx", dynamic=True)
    with torch.no_grad():
        for S in (3, 6, 11):
            x = torch.randn(2, S, 64)
            assert rel_err(compiled(x), model(x)) < TOLERANCE[torch.float32], S
    # one frame, one graph. (Inductor restarts Dynamo's analysis once here, TensorifyScalarRestartAnalysis,
    # so the backend may run twice on that frame; the graph that serves every S has both blocks.)
    assert counters["frames"]["ok"] == 1 and counters["stats"]["unique_graphs"] == 1
    assert len(_moe_nodes(-1)) == 8


def test_hf_mixtral_sequence_lengths_share_one_dynamic_graph():
    pytest.importorskip("transformers")
    from moe_fx import hf_models

    model = hf_models.build("mixtral")
    compiled = torch.compile(model, backend="moe_fx", options={"inner": "eager"})
    with torch.no_grad():
        for S in (5, 7, 11, 4):
            ids = torch.randint(0, 128, (1, S))
            assert rel_err(compiled(ids).logits, model(ids).logits) < TOLERANCE[torch.float32], S
    assert counters["stats"]["unique_graphs"] == 2 and counters["moe_fx"]["rewritten"] == 4
