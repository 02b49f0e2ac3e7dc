"""Identify a cut-out MoE block: which moe_fx experts (and router) spec computes what its region computes.

    region_fn(x_TD, weights_TK, ids_TK, *weights) ──▶ out_TD      (cut out of the graph: `passes/subgraph.py`)
        │ run on the real example and on random probes that give every expert tokens
        ▼
    every experts binding of the weight families (`passes/experts.py`) on the same probes ──▶ rel err ≤ tolerance
    the router's top-k on logits probes (`passes/router.py`)                              ──▶ routing error ≤ tol

Experts that clamp float values get the same probes again with the tokens scaled up until every clamp's input
passes its bounds (`experts.ClampWatch`): a block whose clamps no probe gets past is refused, and so is one
whose clamps the chosen spec does not compute (`experts.unmodelled_clamps`). A router no candidate reproduces
stays opaque (the rewrite keeps its nodes). `block` answers an `Identified`, or the reason the block is refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.passes import experts as experts_id
from moe_fx.passes import prequant
from moe_fx.passes import router as router_id
from moe_fx.passes.graph_view import target_name, tensor_meta
from moe_fx.passes.subgraph import extract
from moe_fx.passes.weights import group_families, leaf_name
from moe_fx.spec import MoESpec

log = logging.getLogger("moe_fx")

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
PROBE_TOKENS = 64
EMPTY_BATCH = "the example batch is empty, so the block cannot be verified"


def block_tolerance(*dtypes: torch.dtype) -> float:
    """The tolerance of a block that computes at the precision of its tokens and weights, whatever dtype it
    returns: HF's bf16 experts scaled by float32 routing weights (Mixtral, DeepSeek-V3) return float32
    sums of bf16 products. The loosest of the dtypes' tolerances applies (3e-2 for one not in the table)."""
    return max(TOLERANCE.get(d, 3e-2) for d in dtypes)


def probe_rounds(tokens: int) -> int:
    """Random probes of the example's shape to draw so that together they hold at least PROBE_TOKENS tokens (at
    most 16): with a one-token example, the real token and 3 random ones let a router that skips the
    correction bias pass for one that adds it in about 1 case in 6 (seen by the fuzzer: wrong outputs at T > 1)."""
    return min(16, max(1, -(-PROBE_TOKENS // max(tokens, 1))))


@dataclass
class Cut:
    """A block as the matcher cut it (`match.BlockFinder.match_cut`): the router's `logits` and the nodes computed
    from them alone (`router_only`), the tokens `x`, routing weights `w` and expert `ids` in, `output` out, the
    `region` between, and the tensor its combine accumulates into when that comes from outside (`base`)."""

    anchor: fx.Node
    logits: fx.Node
    router_only: set[fx.Node]
    num_experts: int
    x: fx.Node
    w: fx.Node
    ids: fx.Node
    output: fx.Node
    region: set[fx.Node]
    base: fx.Node | None

    @property
    def inputs(self) -> list[fx.Node]:
        return [self.x, self.w, self.ids, *([self.base] if self.base is not None else [])]


@dataclass
class Identified:
    """What the probes showed a block computes: its spec, the experts binding, and the router's nodes and
    bias when a router candidate reproduces it (none: the router stays opaque)."""

    spec: MoESpec
    binding: experts_id.ExpertsBinding
    errors: dict[str, float]
    router_nodes: set[fx.Node]
    router_bias: fx.Node | None


def block(finder, cut: Cut) -> Identified | str:
    """The spec of the block at `cut` (`finder` a `match.BlockFinder`), or why no spec reproduces it."""
    x_real, logits_real, w_real, ids_real = finder.real_values([cut.x, cut.logits, cut.w, cut.ids])
    if x_real.numel() == 0:
        return EMPTY_BATCH
    num_experts, region = cut.num_experts, cut.region
    # weights the model dequantises from 1-byte parameters: the region starts at the dequantised tensors
    dequantised, why = prequant.frontier(finder, region)
    if why is not None:
        log.debug("moe_fx: %s: %s", cut.anchor.name, why)
    env = {}  # region node -> its copy in region_fn
    region_fn, leaves = extract(finder.view, finder.gm, cut.inputs + dequantised, [cut.output], env)
    dequantised_vals = finder.real_values(dequantised) if dequantised else []
    leaf_vals = finder.leaf_values(leaves)
    weight_leaves = [(n, v) for n, v in zip(leaves, leaf_vals) if n in finder.weights and isinstance(v, torch.Tensor)]
    families, leftovers = group_families(weight_leaves, num_experts)
    more, odd = prequant.families(finder, dequantised, dequantised_vals, num_experts)
    families, leftovers = families + more, leftovers + odd
    leaf_vals = [*dequantised_vals, *leaf_vals]  # the region's extra inputs, in its signature's order
    hypotheses, not_per_expert = [(families, num_experts)], None
    if leftovers:
        shapes = {leaf_name(n): list(v.shape) for n, v in weight_leaves}
        named = ", ".join(f"{name} {shapes.get(name, '')}".strip() for name in leftovers[:3])
        not_per_expert = f"weights {named} are not per-expert (the router picks among E={num_experts})"
        hypotheses = [] if more or odd else view_hypotheses(weight_leaves, leftovers, num_experts)
        if not hypotheses:
            return not_per_expert
    probes = [(x_real, w_real, ids_real), *random_cuts(finder.generator, x_real, w_real, ids_real, num_experts)]
    clamps = [env[n] for n in experts_id.float_clamps(region) if n in env]  # not the dequantisation's
    watch = experts_id.ClampWatch(region_fn, clamps) if clamps else None
    (zero_base,) = [torch.zeros_like(v) for v in finder.real_values([cut.base])] if cut.base is not None else [None]

    def run_region(p):  # the block on a probe, accumulating into zeros (a fresh tensor: it may be in place)
        bases = [zero_base.clone()] if cut.base is not None else []
        return (watch.run if watch else region_fn)(*p, *bases, *leaf_vals)[0]

    with torch.no_grad():
        refs = [run_region(p) for p in probes]
        if watch is not None:  # agreeing inside a clamp's bounds proves nothing past them: probe past them
            scaled = scaled_probes(probes, watch.scale_to_reach())
            probes, refs = probes + scaled, refs + [run_region(p) for p in scaled]
    if watch is not None and (unreached := watch.unreached()):
        more = f"; {len(unreached) - 2} more" if len(unreached) > 2 else ""
        return (
            f"the experts clamp values and no probe goes past the bounds ({'; '.join(unreached[:2])}{more}), "
            "even with the tokens scaled up: what the block computes there is unknown"
        )
    out_dtype = refs[0].dtype
    tol = block_tolerance(out_dtype, x_real.dtype, *(v.dtype for _, v in weight_leaves if v.is_floating_point()))
    K = ids_real.reshape(ids_real.shape[0], -1).shape[1]
    best, best_err = closest_binding(hypotheses, num_experts, hints(region), probes, refs, out_dtype, tol)
    if not_per_expert is not None and best is None:
        return not_per_expert  # no expert layout reads the weights as views either
    if best is None and not families:
        return (
            f"the block between the top-k and its output ({cut.output.name}) reads no expert weights: "
            "nothing there to bind to the experts"
        )
    if best is None:
        return f"no expert layout fits the weights {[f'{f.name}{list(f.shape)}' for f in families]}"
    if best_err > tol:
        return (
            f"no experts spec reproduces the block: closest {best.spec.summary()} "
            f"(weight at {best.weight_placement}) has rel err {best_err:.2e} > {tol:.0e}"
        )
    unmodelled = experts_id.unmodelled_clamps(region, best.spec)
    if unmodelled:
        return (
            f"the experts clamp values ({', '.join(unmodelled)}) and no experts spec has that clamp: the closest, "
            f"{best.spec.summary()}, agrees on the probes (rel err {best_err:.1e}), which cannot tell that clamp apart"
        )
    router_spec, router_bias, router_nodes, router_err = router(finder, cut, logits_real, K)
    spec = MoESpec(experts=best.spec, top_k=K, router=router_spec, weight_placement=best.weight_placement)
    errors = {"experts": best_err} | ({"router": router_err} if router_spec is not None else {})
    return Identified(spec, best, errors, router_nodes, router_bias)


def closest_binding(hypotheses, num_experts: int, hints: dict, probes, refs, out_dtype, tol: float):
    """(binding, its largest rel err over the probes) of the experts binding closest to the region's outputs
    `refs`, over every reading of the weights (`hypotheses`: (families, experts with weights), the rest of the
    `num_experts` computing nothing); (None, inf) when no binding fits the weights. A binding's probes stop at
    the first one past `tol`."""
    x_real, _, ids_real = probes[0]
    hidden, K = x_real.shape[-1], ids_real.reshape(ids_real.shape[0], -1).shape[1]
    best, best_err = None, float("inf")
    bindings = (
        binding
        for families, with_weights in hypotheses
        for binding in experts_id.candidates(
            families, hidden, with_weights, hints, identity_experts=num_experts - with_weights
        )
    )
    for binding in bindings:
        err = 0.0
        for (xp, wp, ip), ref in zip(probes, refs):
            out = experts_id.run_experts(
                binding, xp.reshape(-1, xp.shape[-1]), wp.reshape(-1, K).float(), ip.reshape(-1, K).int(), out_dtype
            )
            err = max(err, experts_id.rel_err(out.reshape(ref.shape), ref))
            if err > tol:
                break
        if err < best_err:
            best, best_err = binding, err
    return best, best_err


def random_cuts(generator: torch.Generator, x, w, ids, num_experts: int) -> list[tuple]:
    """Probes that give every expert tokens: cyclic expert assignments (tokens in ascending expert order, then
    descending: a cut whose region sorts rows by expert must not find them sorted already), then random
    ones, up to 4 or PROBE_TOKENS tokens. With 2 experts and top-1, the cyclic rows all went to expert 0 and
    the one random probe of 4 tokens was sorted 5 times in 16: transformers' grouped_mm experts' weights in
    expert-sorted order ([T·K, 1], shaped as [T, K] at K=1) then passed for the routing weights."""
    T, K = ids.reshape(ids.shape[0], -1).shape if ids.dim() > 1 else (ids.shape[0], 1)
    probes = []
    cyclic = max(2, min(8, -(-2 * num_experts // max(T * K, 1))))
    randoms = min(4, probe_rounds(T))
    scale = x.float().std().item() if x.numel() > 1 else 1.0
    scale = scale if scale == scale and scale > 0 else 1.0
    for r in range(cyclic + randoms):
        x_p = (torch.randn(x.shape, generator=generator) * 2 * scale).to(x.dtype).to(x.device)
        if r < cyclic:
            ids_p = (torch.arange(T * K).view(T, K) + r * T * K) % num_experts
            ids_p = ids_p.flip(0) if r % 2 else ids_p
        else:
            ids_p = torch.rand(T, num_experts, generator=generator).argsort(dim=-1)[:, :K]
        w_p = (torch.rand(T, K, generator=generator) * 0.9 + 0.1).to(w.dtype).to(w.device)
        # contiguous, as top-k's outputs are: the block may view them (torchtitan's `selected.view(-1)`)
        ids_p = ids_p.to(ids.dtype).to(ids.device).contiguous().reshape(ids.shape)
        probes.append((x_p, w_p.reshape(w.shape), ids_p))
    return probes


def scaled_probes(probes: list[tuple], scale: float | None) -> list[tuple]:
    """The experts probes (x, weights, ids) with the tokens times `scale` (`ClampWatch.scale_to_reach`); none
    when the probes already reach the clamps (scale <= 1) or cannot (None)."""
    if scale is None or scale <= 1:
        return []
    return [((x.float() * scale).to(x.dtype), w, ids) for x, w, ids in probes]


def view_hypotheses(weight_leaves, leftovers: list[str], num_experts: int) -> list[tuple[list, int]]:
    """The last resort when some weight is not per-expert: (families, experts with weights) readings
    with views of the leaves (`group_families(views=True)`): E experts with flat-stored weights (DBRX),
    or fewer, the rest zero-computation experts (LongCat-Flash: the down projection holds 8 experts, the
    router picks among 12). A reading is kept only if the probes fit a binding of it."""
    odd = [v for n, v in weight_leaves if leaf_name(n) in leftovers and v.dim() in (2, 3)]
    counts = {v.shape[0] for v in odd if v.shape[0] < num_experts}
    found = []
    for with_weights in (num_experts, *sorted(counts, reverse=True)):
        families, left = group_families(weight_leaves, with_weights, views=True)
        if not left:
            found.append((families, with_weights))
    return found


def hints(region: set[fx.Node]) -> dict:
    """What the region's nodes say about its activation (`experts.activation_hints`)."""
    names = {target_name(n) for n in region}
    tanh = any(n.kwargs.get("approximate") == "tanh" for n in region if target_name(n) == "gelu")
    bounds = experts_id.clamp_bounds(region)
    alphas = [
        c
        for n in region
        if target_name(n) in ("mul", "__mul__") and any(target_name(u) == "sigmoid" for u in n.users)
        for c in n.args
        if isinstance(c, float)
    ]
    return experts_id.activation_hints(names, tanh, bounds, alphas[0] if alphas else None)


def router(finder, cut: Cut, logits_real: torch.Tensor, K: int):
    """(spec, bias leaf, router nodes, routing error) of the router between the logits and the cut, or
    (None, None, set(), None) when no recognised router reproduces it (it stays opaque)."""
    anchor, logits, w, ids, num_experts = cut.anchor, cut.logits, cut.w, cut.ids, cut.num_experts
    router_nodes = (finder.view.backward([w, ids], blocked=[logits]) & cut.router_only) - {logits}
    if any(n.op == "placeholder" for n in router_nodes):
        return None, None, set(), None
    router_fn, leaves = extract(finder.view, finder.gm, [logits], [w, ids])
    leaf_vals = finder.leaf_values(leaves)
    # [E]-sized leaves the router reads may be biases ([1, E] too). Random probes draw them afresh:
    # a bias that happens to be zero now (a fresh init) must not be mistaken for no bias.
    bias_index = [
        i
        for i, v in enumerate(leaf_vals)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() == num_experts
        and v.shape[-1] == num_experts
    ]  # fmt: skip
    g = finder.generator
    std = logits_real.float().std().item() if logits_real.numel() > 1 else 1.0
    std = std if math.isfinite(std) and std > 1e-3 else 1.0
    # scales far apart: near one-hot real logits (a large std) cannot tell renormalised weights from raw
    # ones, diffuse logits can
    probes = [(logits_real, leaf_vals)]
    for s in (2 * std, 1.0, 0.2):
        for _ in range(probe_rounds(logits_real.numel() // num_experts)):
            p = (torch.randn(logits_real.shape, generator=g) * s).to(logits_real.dtype).to(logits_real.device)
            vals = list(leaf_vals)
            for i in bias_index:
                v = vals[i]
                scale = max(v.float().std().item() if v.numel() > 1 else 0.0, 0.1)
                vals[i] = (torch.randn(v.shape, generator=g) * scale).to(v.dtype).to(v.device)
            probes.append((p, vals))
    with torch.no_grad():
        refs = [router_fn(p, *vals) for p, vals in probes]
    tol = TOLERANCE.get(w.meta.get("example_value", logits_real).dtype, 3e-2) if tensor_meta(w) is not None else 3e-2
    bias_leaves = [leaves[i] for i in bias_index]
    for spec, bias in router_id.candidates(list(router_nodes | {anchor}), anchor, K, num_experts, bias_leaves):
        err = 0.0
        for (p, vals), (ref_w, ref_ids) in zip(probes, refs):
            bias_val = vals[leaves.index(bias)].reshape(num_experts) if bias is not None else None
            rw, rids = router_id.run_route(spec, p.reshape(-1, num_experts), bias_val)
            err = max(err, router_id.routing_error(rw, rids, ref_w, ref_ids))
            if err > tol:
                break
        if err <= tol:
            return spec, bias, router_nodes, err
    log.debug("moe_fx: router at %s kept opaque: no recognised router reproduces it", anchor.name)
    return None, None, set(), None
