"""The rewrite's choices that follow the lowerings' abilities. Router projection: a route lowering registered with
`projects=True` takes the router's linear (tokens, weight, bias) in place of its logits, unless something else reads
the logits. Combine in experts: an experts lowering registered with `reduces=True` returns the block's output itself,
and the graph has no combine node. On the CPU test lowerings stand in for Triton's (its route, the projection GEMV
included, and its experts, under the interpreter)."""

import contextlib
import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fx
from moe_fx import examples as ex
from moe_fx import hf_models, ops
from moe_fx.lowering import registry
from moe_fx.lowering import triton as triton_lowering
from moe_fx.lowering.quant import EXPECTED_ERROR
from tests.conftest import TOLERANCE, fuse_every_config, no_fallback, rel_err
from tests.passes.test_identity_experts import _longcat

NAME = "projecting_test_route"


@pytest.fixture
def projecting_route():
    """Triton's route lowering registered for the CPU with `projects=True`, above the reference."""
    calls = []

    def route(*, proj_weight=None, proj_bias=None, **kwargs):
        calls.append(proj_weight is not None)
        return triton_lowering.triton_route(proj_weight=proj_weight, proj_bias=proj_bias, **kwargs)

    registry.register_lowering("route", device="cpu", name=NAME, priority=100, projects=True)(route)
    yield calls
    registry.unregister_lowering("route", device="cpu", name=NAME)


def _route_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "moe_fx.route" in str(n.target)]


class ReturnsLogits(ex.LoopMoE):
    """A block that returns its router logits beside its output (an auxiliary loss reads them)."""

    def forward(self, x):
        logits_TE = self.gate(x)
        weights_TK, ids_TK = ex.softmax_topk(logits_TE, self.k)
        out_TD = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where(ids_TK == e)
            out_TD.index_add_(0, token_idx, expert(x[token_idx]) * weights_TK[token_idx, slot_idx, None])
        return out_TD, logits_TE


class BiasedRouter(nn.Module):
    """GPT-OSS's router: a linear with a bias, top-k, then softmax over the k values."""

    def __init__(self, dim=32, ffn=48, num_experts=6, k=2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(dim, num_experts, bias=True)
        self.experts = nn.ModuleList(ex.SwiGLU(dim, ffn) for _ in range(num_experts))

    def forward(self, x):
        values_TK, ids_TK = F.linear(x, self.router.weight, self.router.bias).topk(self.k, dim=-1)
        weights_TK = values_TK.softmax(dim=-1)
        out_TD = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where(ids_TK == e)
            out_TD.index_add_(0, token_idx, expert(x[token_idx]) * weights_TK[token_idx, slot_idx, None])
        return out_TD


@pytest.mark.parametrize("model", [ex.LoopMoE, ex.DeepSeekStyleMoE, BiasedRouter], ids=lambda m: m.__name__)
def test_route_takes_the_routers_linear(model, projecting_route):
    model = model().eval()
    xs = [torch.randn(T, 32) for T in (7, 1, 3, 20)]  # 7, 20 > PROJECT_MAX_T: torch's linear inside route
    with torch.no_grad():
        refs = [model(x) for x in xs]
        report = moe_fx.apply(model, xs[0])
        with no_fallback():
            outs = [model(x) for x in xs]
    route_choice = report.matches[0].lowerings["route"]
    assert route_choice.name == NAME and "takes the router's linear" in route_choice.reason
    (route,) = _route_nodes(model.forward.gm)
    assert route.args[13] is not None, route  # proj_weight (`ops.route_args`)
    linears = [n for n in model.forward.gm.graph.nodes if n.target in (torch._C._nn.linear, F.linear)]
    assert all(n.args[0] is not route.args[0] for n in linears), "the router's linear is gone from the graph"
    assert projecting_route[-len(xs) :] == [True] * len(xs)  # the calls after apply (verify's came before)
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_logits_read_elsewhere_keep_the_linear(projecting_route):
    model = ReturnsLogits().eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        ref, ref_logits = model(x)
        moe_fx.apply(model, x)
        out, logits = model(x)
    (route,) = _route_nodes(model.forward.gm)
    assert route.args[13] is None and not any(projecting_route)
    assert torch.equal(logits, ref_logits) and rel_err(out, ref) < TOLERANCE[torch.float32]


def test_the_reference_route_keeps_the_linear():
    """No `projects`: the graph keeps the router's linear and route reads its logits, as before."""
    model = ex.LoopMoE().eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        moe_fx.apply(model, x)
    (route,) = _route_nodes(model.forward.gm)
    assert route.args[13] is None


REDUCING = "reducing_test_experts"


@pytest.fixture
def reducing_experts():
    """Triton's experts lowering registered for the CPU with `reduces=True`, above the reference; records `reduce`."""
    calls = []

    def experts(*, reduce=False, **kwargs):
        calls.append(reduce)
        return triton_lowering.triton_experts(reduce=reduce, **kwargs)

    registry.register_lowering("experts", device="cpu", name=REDUCING, priority=100, reduces=True)(experts)
    yield calls
    registry.unregister_lowering("experts", device="cpu", name=REDUCING)


@pytest.mark.parametrize("name,fuse", [("LoopMoE", True), ("LoopMoE", False), ("DeepSeekStyleMoE", True),
                                       ("longcat_flash", True)])  # fmt: skip
def test_combine_in_experts(name, fuse, reducing_experts):
    """Verification off: the interpreted kernels are slow, and the outputs are compared here."""
    if name == "longcat_flash":  # zero-computation experts: dispatch drops their picks, added after the sum
        model = copy.deepcopy(_longcat())
        inputs = [hf_models.example_inputs(model)]
        run = lambda kw: hf_models.logits(model(**kw))  # noqa: E731
    else:
        model = getattr(ex, name)().eval()
        inputs = [{"x": torch.randn(T, 32)} for T in (7, 1, 20)]
        run = lambda kw: model(**kw)  # noqa: E731
    with torch.no_grad():
        refs = [run(kw) for kw in inputs]
        report = moe_fx.apply(model, **inputs[0], options={"fuse_combine": fuse, "verify": False})
        with no_fallback():
            outs = [run(kw) for kw in inputs]
    assert report.matches, str(report)
    for block in report.matches:
        combine = block.lowerings["combine"]
        assert (combine.name == f"in experts ({REDUCING})") == fuse, combine
        combines = [n for n in block.after.nodes if "moe_fx.combine" in str(n.target)]
        assert len(combines) == (0 if fuse else 1), block.after
    assert reducing_experts[-len(inputs) :] == [fuse] * len(inputs)
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_combine_in_experts_under_torch_compile(reducing_experts):
    """Through Dynamo and Inductor: the fake `experts(reduce=True)` is [T, D], and the compiled model matches."""
    model = ex.LoopMoE().eval()
    x = torch.randn(9, 32)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="moe_fx")(x)
    assert reducing_experts and all(reducing_experts) and rel_err(out, ref) < TOLERANCE[torch.float32]


def test_a_forced_combine_is_kept(reducing_experts):
    model = ex.LoopMoE().eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        report = moe_fx.apply(model, x, options={"lowerings": {"combine": "reference"}, "verify": False})
    assert report.matches[0].lowerings["combine"].name == "reference" and not any(reducing_experts)


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms(True) inside (errors, not warnings, for an op without such an
    implementation), off after."""
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture
def gemm_reduces(monkeypatch):
    """The `reduce` of each grouped-GEMM launch the Triton experts op makes."""
    calls, experts = [], triton_lowering._gemm.experts

    def recorded(*args, reduce=False, **kwargs):
        calls.append(reduce)
        return experts(*args, reduce=reduce, **kwargs)

    monkeypatch.setattr(triton_lowering._gemm, "experts", recorded)
    return calls


def test_deterministic_algorithms_keep_combine(reducing_experts, gemm_reduces):
    """Under torch.use_deterministic_algorithms(True) the block keeps its combine node (experts' sum adds with
    atomics in no fixed order), and the report says why."""
    model = ex.LoopMoE().eval()
    x = torch.randn(7, 32)
    with torch.no_grad(), deterministic():
        ref = model(x)
        report = moe_fx.apply(model, x, options={"verify": False})
        out = model(x)
    (block,) = report.matches
    combine = block.lowerings["combine"]
    assert combine.name == "reference" and "deterministic algorithms are on" in combine.reason, combine
    assert "deterministic algorithms are on" in str(report)
    assert len(_op_nodes(model.forward.gm, "combine")) == 1
    assert reducing_experts and not any(reducing_experts) and not any(gemm_reduces)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_an_applied_sum_in_experts_runs_in_order_once_deterministic(reducing_experts, gemm_reduces):
    """Rewritten with the sum in experts, then run under deterministic algorithms: the experts op stores the
    weighted rows and sums them per token in order (no atomics); the outputs still equal the model's."""
    x = torch.randn(3, 3, 32)
    # the routing weight applied by the sum, then on the experts' input tokens (torchtitan's score_before)
    for model, weight_at in ((ex.LoopMoE(), "none"), (ex.TorchtitanStyleMoE(shared=False), "input")):
        model.eval()
        with torch.no_grad():
            ref = model(x)
            report = moe_fx.apply(model, x, options={"verify": False})
            with deterministic():
                out = model(x)
            fused = model(x)
        assert ops.weight_at(report.matches[0].spec) == weight_at, report
        assert reducing_experts[-2:] == [True, True] and gemm_reduces[-2:] == [False, True]
        assert rel_err(out, ref) < TOLERANCE[torch.float32] and rel_err(fused, ref) < TOLERANCE[torch.float32]


def test_torch_compile_rewrites_again_when_deterministic_algorithms_turn_on(reducing_experts):
    """Dynamo guards on the flag: the next call compiles again, and that graph keeps its combine node."""
    model = ex.LoopMoE().eval()
    x = torch.randn(9, 32)
    compiled = torch.compile(model, backend="moe_fx", options={"verify": False})  # the interpreter is slow
    with torch.no_grad():
        ref = model(x)
        first = compiled(x)
        before = len(reducing_experts)
        with deterministic():
            second = compiled(x)
    assert before and all(reducing_experts[:before])
    assert len(reducing_experts) > before and not any(reducing_experts[before:])
    assert rel_err(first, ref) < TOLERANCE[torch.float32] and rel_err(second, ref) < TOLERANCE[torch.float32]


def _op_nodes(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and f"moe_fx.{op}." in str(n.target)]


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_experts_read_the_tokens_unless_quantised(quant):
    """One device, activations unquantised: dispatch returns no rows and experts reads x itself, so the tokens are
    not copied (`ops.rows_are_tokens`); quantised, experts reads dispatch's rows."""
    model = ex.LoopMoE().eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        ref = model(x)
        moe_fx.apply(model, x, options={"quant": quant})
        out = model(x)
    gm = model.forward.gm
    (dispatch,), (experts,) = _op_nodes(gm, "quantize_dispatch"), _op_nodes(gm, "experts")
    rows = experts.args[0]
    if quant == "none":
        assert rows is dispatch.args[0] and dispatch.meta["val"][0].shape == (0, 32)
    else:
        assert rows.target is operator.getitem and rows.args == (dispatch, 0)
        assert dispatch.meta["val"][0].shape == (7, 32)
    assert rel_err(out, ref) < (TOLERANCE[torch.float32] if quant == "none" else EXPECTED_ERROR[quant])


ROUTING = "routing_test_triton"


@pytest.fixture
def routing_lowerings(monkeypatch):
    """Triton's route (projecting) and experts (reducing and routing) registered for the CPU under one name, above
    the reference, every experts config fused (the interpreter's defaults are not): what a GPU runs at decode.
    Records the tokens of each routed call that the two-kernel path took."""
    fuse_every_config(monkeypatch)
    routed, real = [], triton_lowering._decode.routed_experts

    def recorded(x, *args):
        out = real(x, *args)
        if out is not None:
            routed.append(x.shape[0])
        return out

    monkeypatch.setattr(triton_lowering._decode, "routed_experts", recorded)
    reg = dict(device="cpu", name=ROUTING, priority=100)
    registry.register_lowering("route", projects=True, **reg)(triton_lowering.triton_route)
    registry.register_lowering("experts", reduces=True, routes=triton_lowering.routes, **reg)(
        triton_lowering.triton_experts
    )
    yield routed
    registry.unregister_lowering("route", device="cpu", name=ROUTING)
    registry.unregister_lowering("experts", device="cpu", name=ROUTING)


@pytest.mark.parametrize("name,fuse", [("LoopMoE", True), ("LoopMoE", False), ("DeepSeekStyleMoE", True),
                                       ("TorchtitanStyleMoE", True), ("GatherEinsumMoE", True)])  # fmt: skip
def test_route_and_dispatch_in_experts(name, fuse, routing_lowerings):
    """With route and experts lowerings that can, the block is one `routed_experts` node: at T <= 4 its two
    kernels (the GEMV, then experts routing each pick), above that (and at T=0) route, dispatch and experts;
    outputs equal the model's either way, and the report says where route and dispatch went. Without fuse_route
    (the default), three nodes. DeepSeek's sigmoid, bias and groups and torchtitan's weight on the input route
    in the kernel as the route kernel does (`route._route_row`)."""
    model = getattr(ex, name)().eval()
    shape = (lambda T: (1, T, 32)) if name == "TorchtitanStyleMoE" else (lambda T: (T, 32))
    inputs = [torch.randn(*shape(T)) for T in (3, 1, 9, 0)]
    with torch.no_grad():
        refs = [model(x) for x in inputs]
        report = moe_fx.apply(model, inputs[0], options={"fuse_route": fuse, "verify": False})
        with no_fallback():
            outs = [model(x) for x in inputs]
    gm = model.forward.gm
    counts = {op: len(_op_nodes(gm, op)) for op in ("routed_experts", "route", "quantize_dispatch", "experts")}
    assert counts == ({"routed_experts": 1, "route": 0, "quantize_dispatch": 0, "experts": 0} if fuse else
                      {"routed_experts": 0, "route": 1, "quantize_dispatch": 1, "experts": 1})  # fmt: skip
    (block,) = report.matches
    for op in ("route", "quantize_dispatch"):
        assert ("in one routed_experts node" in block.lowerings[op].reason) == fuse, block.lowerings[op]
    assert routing_lowerings == ([3, 1] if fuse else [])  # T=9: more tokens than the GEMV's, the three ops
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and (not ref.numel() or rel_err(out, ref) < TOLERANCE[torch.float32])
    if fuse:  # the drawing and print_readable name the one node
        assert "moe_fx::routed_experts  [" + ROUTING in moe_fx.draw.to_dot(block.after)
        assert f"routed_experts [{ROUTING}]" in gm.print_readable(print_output=False)


def test_route_and_dispatch_in_experts_under_torch_compile(routing_lowerings):
    """Through Dynamo and Inductor: the fake `routed_experts` is [T, D]; decode takes the two kernels."""
    model = ex.LoopMoE().eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="moe_fx", options={"verify": False, "fuse_route": True})(x)
    assert routing_lowerings == [2] and rel_err(out, ref) < TOLERANCE[torch.float32]


def test_deterministic_algorithms_route_apart(routing_lowerings):
    """Under torch.use_deterministic_algorithms(True) the block keeps combine, and with it route and dispatch; an
    applied routed node runs the three ops (the decode kernel sums with atomics)."""
    model = ex.LoopMoE().eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        ref = model(x)
        with deterministic():
            report = moe_fx.apply(copy.deepcopy(model), x, options={"verify": False, "fuse_route": True})
        assert "in one routed_experts node" not in str(report)
        moe_fx.apply(model, x, options={"verify": False, "fuse_route": True})
        with deterministic():
            out = model(x)
    assert routing_lowerings == [] and rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("quant", ["fp8", "int8", "fp8_block"])
def test_route_and_dispatch_in_experts_under_quant(quant, routing_lowerings):
    """Activations quantised per token (fp8, int8) route in experts as unquantised ones do: one `routed_experts`
    node with the weight scales, the GEMV quantising x at decode, outputs within the mode's error of the model's.
    fp8_block's 1×128 groups run the three ops."""
    model = ex.LoopMoE().eval()
    inputs = [torch.randn(T, 32) for T in (3, 1, 9)]
    with torch.no_grad():
        refs = [model(x) for x in inputs]
        moe_fx.apply(model, inputs[0], options={"fuse_route": True, "verify": False, "quant": quant})
        with no_fallback():
            outs = [model(x) for x in inputs]
    routed = quant != "fp8_block"
    assert len(_op_nodes(model.forward.gm, "routed_experts")) == routed
    assert routing_lowerings == ([3, 1] if routed else [])  # T=9: more tokens than the GEMV's, the three ops
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) < EXPECTED_ERROR[quant]
