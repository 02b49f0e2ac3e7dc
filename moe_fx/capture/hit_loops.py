"""Capture a loop over the experts hit as a loop over every expert (`apply` only, checked against the original).

transformers 4.57's Mixtral, Qwen2-MoE and Qwen3-MoE blocks loop over the experts hit,
`for e in expert_mask.sum(...).gt(0).nonzero():`; its DeepSeek-V3 loops over every expert but skips the empty
ones, `if token_indices.numel() > 0:`. Dynamo can neither unroll a loop whose length depends on the data nor
take a branch on it, so such a block never reaches one graph and no capture finds it.

While `SWITCH.on()`, in a Dynamo trace:
- iterating the result of `nonzero()` of a 1-D tensor of static length E (at most MAX_EXPERTS) yields the
  indices [0] … [E-1], as if every expert were hit. Like the original's 1-element tensors, each keeps a leading
  dimension of 1 where it indexes a tensor (Mixtral's `mask[e].squeeze(0)`, with k = 1 too), gives e at `[0]`
  (GPT-OSS's and Switch's `expert_idx[0]`), and is e as a key of an nn.ModuleList (`self.experts[e]`) or in a
  comparison (`if e == num_experts:`);
- `torch.bincount(ids, minlength=E)` has E elements (`expert_counts`: the routing ids are below E), so that its
  `.tolist()` holds E data-dependent counts (DeepSeek-V3's reference code: `counts = ….tolist()`);
- a branch on whether a data-dependent size or count is zero (`if idx.numel() > 0:`, `if n:`,
  `if counts[i] == 0:`) takes the side of a positive one. The counts `.tolist()` read are then used by no node:
  `drop_unused_counts` removes them (their `.item()` calls would each wait for the GPU).

The captured loop runs its body for the experts without tokens too. That is the original block only if the
body then does nothing (an `index_add_` of no rows), which no graph shows. So `apply` captures this way only
the modules whose code broke the ordinary capture, and installs a rewrite only after it agrees with the
module's original forward, run eagerly, on probes where most experts get no token (`check_against_original`).
"""

from __future__ import annotations

import collections
import functools
import operator

import torch
from torch.utils import _pytree as pytree

from moe_fx.capture.switch import CaptureSwitch

MAX_EXPERTS = 1024  # the longest hit-expert loop unrolled
_installed: list = []


def _hit_loop_length(var) -> int | None:
    """E when `var` (a Dynamo TensorVariable) is `nonzero()` (or `nonzero()[:]`) of a 1-D tensor of static length
    E <= MAX_EXPERTS, whose own length depends on the data; None otherwise."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    try:
        node = var.as_proxy().node
    except Exception:
        return None
    value = node.meta.get("example_value")
    if node.target is operator.getitem and node.args[1] == slice(None):  # `nonzero()[:]` (GPT-OSS 4.57)
        node = node.args[0]
    if node.target not in ("nonzero", torch.nonzero) or not isinstance(value, torch.Tensor) or value.dim() != 2:
        return None
    if not free_unbacked_symbols(value.shape[0]) or node.kwargs.get("as_tuple"):
        return None
    source = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(source, torch.Tensor) or source.dim() != 1 or not isinstance(source.shape[0], int):
        return None
    return source.shape[0] if 0 < source.shape[0] <= MAX_EXPERTS else None


def _when_hit(value) -> bool | None:
    """The value of `value` (a SymBool over data-dependent sizes or counts) when they are positive, where it tests
    whether they are zero: the same at every positive value tried, the other at 0 (`n > 0`, `n != 0`, `n == 0`).
    None for any other test."""
    import sympy
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    if not isinstance(value, torch.SymBool):
        return None
    expr = value.node.expr
    sizes = free_unbacked_symbols(expr)
    if not sizes or set(expr.free_symbols) != set(sizes):
        return None

    def at(n: int):
        return expr.subs({s: n for s in sizes})

    hit = {at(n) for n in (1, 2, 3, 64, 4096)}
    if len(hit) != 1 or hit == {at(0)} or not hit <= {sympy.true, sympy.false}:
        return None
    return hit == {sympy.true}


def _install() -> None:
    if _installed:
        return
    _installed.append(True)
    try:
        from torch._dynamo import symbolic_convert
        from torch._dynamo.variables.base import ValueMutationNew
        from torch._dynamo.variables.constant import ConstantVariable
        from torch._dynamo.variables.lists import ListVariable
        from torch._dynamo.variables.tensor import SymNodeVariable, TensorVariable
        from torch._dynamo.variables.torch import TorchInGraphFunctionVariable
    except ImportError:  # another Dynamo layout: nothing is patched, such loops stay uncaptured
        return

    class HitExpertVariable(ListVariable):
        """[e], one row of the hit experts' `nonzero()`: a list where it indexes (a tensor, or itself at [0]), e
        where Dynamo asks for its constant value (an nn.Module container's key, a comparison)."""

        def as_python_constant(self):
            return self.items[0].as_python_constant()

        def nb_index_impl(self, tx):  # operator.index (ModuleList.__getitem__, inlined)
            return self.items[0]

    unpack = TensorVariable.unpack_var_sequence

    @functools.wraps(unpack)
    def unpack_var_sequence(self, tx, idxes=None):
        length = _hit_loop_length(self) if SWITCH.active and idxes is None else None
        if length is not None:
            return [HitExpertVariable([ConstantVariable.create(e)], mutation_type=ValueMutationNew())
                    for e in range(length)]  # fmt: skip
        return unpack(self, tx, idxes)

    evaluate = SymNodeVariable.evaluate_expr

    @functools.wraps(evaluate)
    def evaluate_expr(self, *args, **kwargs):  # `if n > 0:`, `if counts[e] == 0:`
        hit = _when_hit(self.sym_num) if SWITCH.active else None
        return evaluate(self, *args, **kwargs) if hit is None else hit

    guard_bool = getattr(symbolic_convert, "guard_bool", None)

    def guard_nonempty(value, *args, **kwargs):  # `if n:` (Dynamo guards on n != 0)
        hit = _when_hit(value) if SWITCH.active else None
        return guard_bool(value, *args, **kwargs) if hit is None else hit

    call_torch = TorchInGraphFunctionVariable.call_function

    @functools.wraps(call_torch)
    def call_function(self, tx, args, kwargs):  # bincount(ids, minlength=E): E counts
        if SWITCH.active and self.value is torch.bincount and len(args) == 1 and set(kwargs) == {"minlength"}:
            minlength = kwargs["minlength"]
            if minlength.is_python_constant() and 0 < minlength.as_python_constant() <= MAX_EXPERTS:
                counts = TorchInGraphFunctionVariable(torch.ops.moe_fx.expert_counts.default)
                return call_torch(counts, tx, [args[0], minlength], {})
        return call_torch(self, tx, args, kwargs)

    TorchInGraphFunctionVariable.call_function = call_function
    TensorVariable.unpack_var_sequence = unpack_var_sequence
    SymNodeVariable.evaluate_expr = evaluate_expr
    if guard_bool is not None:
        symbolic_convert.guard_bool = functools.wraps(guard_bool)(guard_nonempty)


SWITCH = CaptureSwitch(_install)


@torch.library.custom_op("moe_fx::expert_counts", mutates_args=())
def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`torch.bincount(ids, minlength=num_experts)` (1-D int ids) with exactly num_experts elements."""
    counts = torch.bincount(ids, minlength=num_experts)
    if counts.numel() != num_experts:
        raise ValueError(f"moe_fx: expert ids must be below num_experts ({num_experts}), got {counts.numel() - 1}")
    return counts


@expert_counts.register_fake
def _(ids, num_experts):
    return ids.new_empty((num_experts,), dtype=torch.int64)


def drop_unused_counts(gm: torch.fx.GraphModule) -> int:
    """Remove the unused `.item()` reads of `expert_counts` and what made them (indexing, the counts); returns how
    many nodes went."""
    g, dropped = gm.graph, 0
    for node in reversed(list(g.nodes)):
        item = node.op == "call_method" and node.target == "item" and isinstance(node.args[0], torch.fx.Node)
        made = node.target is operator.getitem or node.target is torch.ops.moe_fx.expert_counts.default
        if not node.users and (item and _reads_counts(node.args[0]) or made and _reads_counts(node)):
            g.erase_node(node)
            dropped += 1
    if dropped:
        gm.recompile()
    return dropped


def _reads_counts(node: torch.fx.Node) -> bool:
    while node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node.target is torch.ops.moe_fx.expert_counts.default


# Within the context, Dynamo captures loops over the experts hit as loops over every expert.
every_expert = SWITCH.on


def _probe_calls(margs: tuple, mkwargs: dict, rounds: int = 2) -> list[tuple[tuple, dict]]:
    """The recorded call, then calls with its floating-point tensors replaced: random ones at their scale
    (`rounds`), and as many where every token is one random token (each floating tensor of 2+ dimensions holds
    one row repeated): that token's top-k experts get every row, all others none."""
    from moe_fx.passes.verify import random_like

    g = torch.Generator().manual_seed(0)

    def one_token(t: torch.Tensor) -> torch.Tensor:
        if t.dim() < 2:
            return t
        return t.reshape(-1, t.shape[-1])[:1].expand(t.numel() // t.shape[-1], t.shape[-1]).reshape(t.shape)

    def replaced(fn):
        def leaf(v):
            return fn(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        return pytree.tree_map(leaf, (margs, mkwargs))

    calls = [(margs, mkwargs)]
    calls += [replaced(lambda t: random_like(t, g)) for _ in range(rounds)]
    calls += [replaced(lambda t: one_token(random_like(t, g))) for _ in range(rounds)]
    return calls


def check_against_original(
    original, rewritten, margs: tuple, mkwargs: dict, tol: float, pooled: bool = False
) -> tuple[float, str | None]:
    """(rel err, None) when `rewritten(*args, **kwargs)` agrees with `original` on the probe calls (`_probe_calls`)
    within `tol`, output leaf by output leaf, each call on its own or, `pooled` (quantised blocks, whose error
    varies from probe to probe), over all calls together; (err, why) where it does not. Shapes, dtypes and
    non-finite patterns must agree on every call either way."""
    from moe_fx.passes.verify import PooledError, compare

    worst, pools = 0.0, collections.defaultdict(PooledError)  # pooled: per output leaf
    for i, (args, kwargs) in enumerate(_probe_calls(margs, mkwargs)):
        with torch.no_grad():
            ref = pytree.tree_leaves(original(*args, **kwargs))
            try:
                out = pytree.tree_leaves(rewritten(*args, **kwargs))
            except Exception as e:
                return float("inf"), f"the rewritten module failed on probe {i}: {e!r}"[:300]
        if len(out) != len(ref):
            return float("inf"), f"probe {i}: {len(out)} outputs where the original gives {len(ref)}"
        for j, (o, r) in enumerate(zip(out, ref)):
            if not isinstance(r, torch.Tensor):
                continue
            err, why = compare(o, r, float("inf") if pooled else tol)
            worst = max(worst, err)
            if why is not None:
                return worst, f"probe {i}: {why}"
            if pooled:
                pools[j].add(o, r)
    if pooled:
        return max((pool.check(tol) for pool in pools.values()), default=(0.0, None), key=lambda c: c[0])
    return worst, None
