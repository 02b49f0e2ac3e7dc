"""`passes/overlap.hoist_past_dispatch`: which nodes move between a block's dispatch and its experts, on small
traced graphs whose dispatch / experts / combine stand in for the moe_fx ops (marked as the rewrite marks
them). The graph computes the same values after the move."""

import torch
import torch.fx as fx

from moe_fx.passes.overlap import hoist_past_dispatch


def dispatch(x):
    return x * 1.5


def experts(d):
    return d.tanh()


def combine(y):
    return y + 1.0


for fn in (dispatch, experts, combine):
    fx.wrap(fn.__name__)


def _traced(fn) -> fx.GraphModule:
    gm = fx.symbolic_trace(fn)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target.__name__ in ("dispatch", "experts", "combine"):
            n.meta["moe_fx"] = {"op": {"dispatch": "quantize_dispatch"}.get(n.target.__name__, n.target.__name__)}
    return gm


def _hoist(gm: fx.GraphModule) -> list[str]:
    ops = {n.meta["moe_fx"]["op"]: n for n in gm.graph.nodes if "moe_fx" in n.meta}
    moved = hoist_past_dispatch(gm.graph, ops["quantize_dispatch"], ops["experts"], ops["combine"])
    gm.graph.lint()
    gm.recompile()
    return [n.name for n in moved]


def _order(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _same_values(fn, gm, *args):
    want, got = fn(*args), gm(*args)
    for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def shared_after_block(x, w):
    y = experts(dispatch(x))
    c = combine(y)
    s = torch.relu(x @ w)  # the shared expert: needs only x and w
    late = c.sin()  # reads combine: stays
    mixed = s * y.mean()  # reads a routed value: stays
    return c + s, late, mixed


def test_the_shared_expert_moves_before_experts_in_order():
    gm = _traced(shared_after_block)
    assert _hoist(gm) == ["matmul", "relu"]
    order = _order(gm)
    assert order.index("dispatch") < order.index("matmul") < order.index("relu") < order.index("experts")
    assert order.index("sin") > order.index("combine") and order.index("mul") > order.index("combine")
    x, w = torch.randn(5, 8), torch.randn(8, 8)
    _same_values(shared_after_block, gm, x, w)


def shared_after_an_inplace_write(x, w):
    c = combine(experts(dispatch(x)))
    x.mul_(2.0)  # the shared expert reads x after this write: moving it would read the old x
    s = torch.relu(x @ w)
    return c + s


def test_nothing_overtakes_a_write():
    gm = _traced(shared_after_an_inplace_write)
    assert _hoist(gm) == []
    x, w = torch.randn(5, 8), torch.randn(8, 8)
    torch.testing.assert_close(gm(x.clone(), w), shared_after_an_inplace_write(x.clone(), w), rtol=0, atol=0)


def random_shared(x, w):
    c = combine(experts(dispatch(x)))
    s = x @ w
    noise = torch.rand_like(x)  # impure: stays, and so does what needs it
    return c + s * noise


def test_impure_nodes_and_their_users_stay():
    gm = _traced(random_shared)
    assert _hoist(gm) == ["matmul"]
    assert _order(gm).index("rand_like") > _order(gm).index("combine")


def two_blocks(x, w):
    c = combine(experts(dispatch(x)))
    s = x @ w
    h = c + s
    c2 = combine(experts(dispatch(h)))
    s2 = torch.relu(x @ w.t())  # only the second block's output needs it: not the first block's work
    return c2 + s2


def test_work_of_a_later_block_is_not_taken():
    gm = _traced(two_blocks)
    first = [n for n in gm.graph.nodes if "moe_fx" in n.meta][:3]
    moved = hoist_past_dispatch(gm.graph, *first)
    assert [n.name for n in moved] == ["matmul"]
    gm.recompile()
    x, w = torch.randn(5, 8), torch.randn(8, 8)
    _same_values(two_blocks, gm, x, w)


def shared_before_router(x, w):
    h = x * 2.0  # the routed path needs it: stays
    s = torch.relu(h @ w)  # transformers 5's Qwen2-MoE: the shared expert before the router
    early = x.cos()  # read before the dispatch by something that stays: stays
    c = combine(experts(dispatch(h + early)))
    return c + s


def test_the_shared_expert_before_the_router_moves_after_the_dispatch():
    gm = _traced(shared_before_router)
    assert _hoist(gm) == ["matmul", "relu"]
    order = _order(gm)
    assert order.index("dispatch") < order.index("matmul") < order.index("relu") < order.index("experts")
    assert order.index("mul") < order.index("dispatch") and order.index("cos") < order.index("dispatch")
    x, w = torch.randn(5, 8), torch.randn(8, 8)
    _same_values(shared_before_router, gm, x, w)
