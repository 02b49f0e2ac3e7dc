"""Verify a rewrite before it lands: the original block against a rewritten copy, with the chosen lowerings.

    block(x_TD, logits_TE) = original region, cut out of the graph (router, experts, combine)
    copy  = the same region rewritten by `rewrite()` with the lowerings `select_lowerings` chose
    for (x, logits) in [the real example values, random ones of the same shape at two logit scales, as many
                        as hold >= 64 tokens together (`identify.probe_rounds`: 2 of each at T=32, 16 at T <= 4)]:
        out, ref = copy(x, logits, *weights), block(x, logits, *weights)
        same shape and dtype, same non-finite pattern, rel err <= TOLERANCE[dtype], inputs and weights untouched
    (quantised: rel err over all probes together <= the mode's EXPECTED_ERROR)
    and the copy's output meta (symbolic shape, dtype) equals the original's

The matcher already identified the block with the reference lowering; this check runs what will
really run (a Triton kernel, a plugin), through the real graph surgery, with the real weights.
A block that fails is left untouched and the reason goes into the Report's rejections.

Parallel layouts (`layout != "single"`) are verified as one device: the block with the same spec
(quant and pre-quantised weights included) and the lowerings this device would pick for `single`,
on the full weights. That checks everything but the exchange: running the layout's collectives at
compile time would need every rank to verify the same blocks in step, and one rank may refuse a
block another accepts (an empty example batch, a failed check) and leave the rest waiting forever.
The dispatch/combine lowerings are tested against one device on real process groups
(tests/lowering/test_distributed.py); `experts` and `route` under a parallel layout are the
single-device lowerings, which this check runs. The error goes into `errors["verified (one device)"]`.

Cost and default. `verify` defaults to True: moe_fx's promise is never to be silently wrong, and only
this check sees the lowering that will really run (the matcher probes with the reference). It adds
1 + 2·probe_rounds(T) runs of each block, original and rewritten, at the example's size (3 from T = 64 on;
33 at T <= 4, where few tokens tell little). Measured with 3 runs, before that change, with
`python -m bench.verify_cost --repeats 5` (CPU, 1 thread, inner="eager", median compile time, off -> on):
demo TwoFormModel (2 blocks, T=32) 2.57 s -> 2.55 s (within noise); tiny HF Mixtral (2 blocks, T=32)
3.18 s -> 3.31 s (+0.13 s, +4%). On a box whose cores are oversubscribed, OpenMP spinning makes every
tiny op slow and the same runs cost far more (+59% measured with 2 threads on the shared 2-core box).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.fx as fx

from moe_fx.lowering import registry
from moe_fx.lowering.quant import EXPECTED_ERROR
from moe_fx.lowering.reference import selection
from moe_fx.passes.experts import rel_err
from moe_fx.passes.graph_view import same_shape, shape_of, tensor_meta
from moe_fx.passes.identify import block_tolerance, probe_rounds
from moe_fx.passes.match import BlockFinder, MoEMatch
from moe_fx.passes.prequant import PreQuantised
from moe_fx.passes.rewrite import rewrite
from moe_fx.passes.subgraph import extract

log = logging.getLogger("moe_fx")


def _map_match(match: MoEMatch, env: dict[fx.Node, fx.Node]) -> MoEMatch:
    """`match` with every node replaced by its copy in the cut-out block."""

    def family(f):
        if f is None:
            return None
        pq = f.prequant
        if isinstance(pq, PreQuantised):  # the quantised parameters the rewrite will read
            pq = dataclasses.replace(pq, q_node=env[pq.q_node], scale_node=env[pq.scale_node])
        return dataclasses.replace(f, nodes=[env[n] for n in f.nodes], prequant=pq)

    b = match.binding
    binding = dataclasses.replace(
        b,
        w13_parts=[family(f) for f in b.w13_parts],
        w2_family=family(b.w2_family),
        w13_bias_parts=[family(f) for f in b.w13_bias_parts],
        w2_bias_family=family(b.w2_bias_family),
    )
    return dataclasses.replace(
        match,
        x=env[match.x],
        logits=env[match.logits],
        weights_cut=env[match.weights_cut],
        ids_cut=env[match.ids_cut],
        output=env[match.output],
        region={env[n] for n in match.region},
        router_nodes={env[n] for n in match.router_nodes},
        router_bias=None if match.router_bias is None else env[match.router_bias],
        binding=binding,
        base=None if match.base is None else env[match.base],
    )


def compare(out, ref, tol: float) -> tuple[float, str | None]:
    """(rel err, why it is a mismatch or None)."""
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        return float("inf"), f"output {got} where the original gives {tuple(ref.shape)} {ref.dtype}"
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)):
        return float("inf"), "non-finite values where the original has none (or the reverse)"
    err = rel_err(out[finite], ref[finite])
    return err, None if err <= tol else f"rel err {err:.2e} > {tol:.0e}"


class PooledError:
    """The rel err of outputs against their references over many probes together, sqrt(sum |out - ref|^2 /
    sum |ref|^2) over the references' finite elements: a quantised block's error varies from probe to probe, and
    the largest of many would refuse right rewrites."""

    def __init__(self):
        self.diff2, self.ref2 = 0.0, 0.0

    def add(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        finite = torch.isfinite(ref)
        self.diff2 += (out[finite].double() - ref[finite].double()).square().sum().item()
        self.ref2 += ref[finite].double().square().sum().item()

    def check(self, tol: float) -> tuple[float, str | None]:
        """(rel err, why it exceeds tol or None)."""
        err = math.sqrt(self.diff2 / self.ref2) if self.ref2 > 0 else math.sqrt(self.diff2)
        return err, None if err <= tol else f"rel err {err:.2e} over the probes > {tol:.0e}"


def random_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Standard normal values at t's scale (its std; 1 where that is 0, not finite or undefined), t's shape, dtype
    and device."""
    std = t.float().std().item() if t.numel() > 1 else 1.0
    std = std if 0 < std < float("inf") else 1.0
    return (torch.randn(t.shape, generator=g) * std).to(t.dtype).to(t.device)


def _probes(finder: BlockFinder, match: MoEMatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x_real, logits_real = finder.real_values([match.x, match.logits])
    g = torch.Generator().manual_seed(0)

    def unit() -> torch.Tensor:
        return torch.randn(logits_real.shape, generator=g).to(logits_real.dtype).to(logits_real.device)

    # the real batch; random tokens with logits at the real scale; and diffuse (unit-scale) logits, which
    # tell apart routers that agree on near one-hot logits (renormalised or not); as many random ones as
    # give PROBE_TOKENS tokens where the example has few
    rounds = probe_rounds(logits_real.numel() // max(logits_real.shape[-1], 1))
    at_scale = [(random_like(x_real, g), random_like(logits_real, g)) for _ in range(rounds)]
    return [(x_real, logits_real), *at_scale, *((random_like(x_real, g), unit()) for _ in range(rounds))]


def _tied_tokens(finder: BlockFinder, match: MoEMatch, logits: torch.Tensor) -> torch.Tensor | None:
    """Tokens whose top-k is a tie at the k-th place, at the original router's precision: which of the tied
    experts wins is the top-k implementation's choice (torch's differs between CPU and CUDA), so a rewrite
    may pick the other one. They are left out of the comparison; every other token must agree."""
    r = match.spec.router
    E = logits.shape[-1]
    if r is None or r.k >= E:  # an opaque router's own ops stay in the graph
        return None
    bias = None if match.router_bias is None else finder.leaf_values([match.router_bias])[0]
    _, select_TE = selection(
        logits.reshape(-1, E), bias, r.scoring, r.order, r.n_group, r.topk_group, r.group_score_topk,
        getattr(torch, r.score_dtype), r.group_fill,
    )  # fmt: skip
    top_TK1 = select_TE.topk(r.k + 1, dim=-1).values
    return top_TK1[:, r.k - 1] == top_TK1[:, r.k]


def verify(finder: BlockFinder, match: MoEMatch) -> tuple[float | None, str | None]:
    """Check `match` rewritten with its selected lowerings against the original block.

    Returns (worst rel err over the probes, None) when it agrees, (err, reason) when it does not,
    A parallel layout is verified as one device (see the module docstring).
    """
    if match.spec.layout != "single":
        log.info("moe_fx: %s (%s) verified as one device", match.module_path, match.spec.layout)
        spec = match.spec.replace(layout="single", max_tokens_per_rank=0)
        device = finder.real_values([match.x])[0].device.type
        selections = {op: registry.select(op, device, spec) for op in match.selections}
        if any(sel.chosen is None for sel in selections.values()):
            return None, None  # nothing runs this spec on one device: the parallel lowerings alone are tested
        match = dataclasses.replace(match, spec=spec, selections=selections)
    env: dict[fx.Node, fx.Node] = {}
    block, leaves = extract(finder.view, finder.gm, [match.x, match.logits], [match.output], env)
    for node, copy in env.items():
        if copy.op == "placeholder":
            copy.meta = dict(node.meta)  # fake values: the rewrite reads shapes and the fake mode from them
    leaf_values = finder.leaf_values(leaves)
    probes = _probes(finder, match)
    with torch.no_grad():
        refs = [block(x, logits, *leaf_values)[0] for x, logits in probes]
    scratch = _map_match(match, env)
    try:
        rewrite(block, scratch, 0, [])
    except Exception as e:  # a rewrite that cannot be built is a refusal, never a crash
        return float("inf"), f"the rewrite could not be built: {e!r}"[:300]
    new_out = block.graph.output_node().args[0][0]
    old_out = finder.view.result_node(match.output)
    old_meta, new_meta = tensor_meta(old_out), tensor_meta(new_out)
    if old_meta is not None and new_meta is not None:
        # symbolic sizes compared with sympy (statically_known_true), so T stays a symbol, never a constant
        if not same_shape(shape_of(new_out), shape_of(old_out)) or new_meta.dtype != old_meta.dtype:
            return float("inf"), (
                f"the rewritten output's meta {tuple(new_meta.shape)} {new_meta.dtype} differs from "
                f"the original's {tuple(old_meta.shape)} {old_meta.dtype}"
            )
    tol = max(
        block_tolerance(refs[0].dtype, probes[0][0].dtype, match.binding.w13.dtype),
        EXPECTED_ERROR.get(match.spec.quant.mode, 0.0),
    )
    # quantised: the rel err over all probes together against the mode's expected error (a tiny block's
    # quantisation error varies from probe to probe; the largest of many would refuse right rewrites);
    # unquantised: every probe within the float tolerance
    quantised = match.spec.quant.mode != "none"
    worst, pooled = 0.0, PooledError()
    for (x, logits), ref in zip(probes, refs):
        inputs = [x, logits, *(v for v in leaf_values if isinstance(v, torch.Tensor)), *block.buffers()]
        inputs = [t for t in inputs if not t.is_inference()]  # inference tensors keep no version counter
        versions = [t._version for t in inputs]
        try:
            with torch.no_grad():
                out = block(x, logits, *leaf_values)[0]
        except Exception as e:
            return float("inf"), f"the rewritten block failed to run: {e!r}"[:300]
        if [t._version for t in inputs] != versions:
            return float("inf"), "the rewritten block modified its inputs or weights in place"
        tied = _tied_tokens(finder, match, logits)
        if tied is not None and out.shape == ref.shape and tied.numel() == ref.reshape(-1, ref.shape[-1]).shape[0]:
            out, ref = (t.reshape(-1, t.shape[-1])[~tied] for t in (out, ref))
        err, why = compare(out, ref, math.inf if quantised else tol)
        worst = max(worst, err)
        if why is not None:
            return worst, why
        if quantised:
            pooled.add(out, ref)
    return pooled.check(tol) if quantised else (worst, None)
