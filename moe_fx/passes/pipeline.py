"""match -> select lowerings -> verify -> rewrite, for one FX graph. Used by the backend, `apply` and `explain`.

Every check (grad mode, a lowering for each op, verification) runs on the pristine graph; only the
blocks that pass are rewritten, so a failed block is left exactly as it was.
"""

from __future__ import annotations

import logging
import re
import threading

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from moe_fx.capture.hit_loops import drop_unused_counts
from moe_fx.draw import snapshot
from moe_fx.lowering.distributed import plan_shard
from moe_fx.options import Options
from moe_fx.passes import prequant
from moe_fx.passes.graph_view import value
from moe_fx.passes.identify import EMPTY_BATCH
from moe_fx.passes.match import BlockFinder, MoEMatch, find_blocks
from moe_fx.passes.overlap import hoist_past_dispatch
from moe_fx.passes.rewrite import _fake_mode, _set_meta, apply_rebind, rewrite, select_lowerings
from moe_fx.passes.router import fills_from_scatter_index, sink_sigmoid_into_scatter
from moe_fx.passes.verify import verify
from moe_fx.report import BlockReport, LoweringChoice, RejectionReport, Report
from moe_fx.spec import QuantSpec

log = logging.getLogger("moe_fx")


def source_line(node: fx.Node | None) -> str:
    """ "file:line" of the innermost user frame in `node`'s stack trace ("" where it has none)."""
    found = re.findall(r'File "([^"]+)", line (\d+)', (node.meta.get("stack_trace") or "") if node is not None else "")
    return f"{found[-1][0]}:{found[-1][1]}" if found else ""


_COUNT_LOCK = threading.Lock()


def count(key: str, n: int = 1) -> None:
    """`counters["moe_fx"][key] += n`, atomically: `apply` may run while another thread compiles."""
    with _COUNT_LOCK:
        counters["moe_fx"][key] += n


def _needs_autograd(match: MoEMatch) -> bool:
    """Grad mode, and gradients would have to flow through the block: into its expert weights, or back
    to its tokens or router logits (a frozen MoE inside a model that trains something upstream)."""
    if not torch.is_grad_enabled():
        return False
    b = match.binding
    families = [*b.w13_parts, b.w2_family, *b.w13_bias_parts, b.w2_bias_family]
    if any(t.requires_grad for f in families if f for t in f.tensors):
        return True
    taken = prequant.prequantised(b)  # the quantised parameters the dequantised weights came from
    if taken is not None and any(t.requires_grad for pq in taken for t in (pq.q, pq.scale)):
        return True
    return any(getattr(value(n), "requires_grad", False) for n in (match.x, match.logits))


def _block_report(match: MoEMatch, graph: int, device: torch.device) -> BlockReport:
    lowerings = {
        op: LoweringChoice(op, sel.chosen.name, sel.reason, sel.rejected) for op, sel in match.selections.items()
    }
    if not match.router_recognized:
        lowerings = {
            "route": LoweringChoice("route", "opaque", "router kept in the graph: not a recognised form"),
            **lowerings,
        }
    if match.combine_in_experts:
        experts = match.selections["experts"].chosen.name
        lowerings["combine"] = LoweringChoice(
            "combine", f"in experts ({experts})", f"{experts} experts sums each token's rows itself, in no fixed "
            "order (options={'fuse_combine': False} or torch.use_deterministic_algorithms(True) keeps a combine node)",
            lowerings["combine"].rejected,
        )  # fmt: skip
    elif match.combine_kept:
        kept = lowerings["combine"]
        lowerings["combine"] = LoweringChoice(
            "combine", kept.name, f"{kept.reason}; {match.combine_kept}", kept.rejected
        )
    block = BlockReport(match.module_path, match.form, match.spec, lowerings, match.errors, 0, graph)
    block.weights_note = match.weights_note
    block.tiles_note = _tiles_note(match, device)
    if match.spec.quant.mode != "none" and prequant.prequantised(match.binding) is None:
        b = match.binding
        block.unquantised_bytes = sum(t.numel() * t.element_size() for t in (b.w13, b.w3, b.w2) if t is not None)
    return block


def _overlap(gm: fx.GraphModule, new_nodes: list[fx.Node], block: BlockReport, example_inputs, pin: bool) -> None:
    """Move the block's independent work (its shared expert) between its dispatch and experts, and say so;
    `pin` it there with data edges for a compiler that orders the graph itself (Inductor)."""
    by_op = {n.meta["moe_fx"]["op"]: n for n in new_nodes if "moe_fx" in n.meta}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {n for n, v in zip(placeholders, example_inputs) if isinstance(v, torch.nn.Parameter)}

    def activation(node: fx.Node) -> bool:  # what the shared work reads that a copy may stand in for
        return node.op != "get_attr" and node not in params and isinstance(value(node), torch.Tensor)

    moved = hoist_past_dispatch(gm.graph, by_op["quantize_dispatch"], by_op["experts"], by_op["combine"],
                                activation if pin else None)  # fmt: skip
    if moved:
        dispatch = block.lowerings["quantize_dispatch"]
        dispatch.reason = f"{dispatch.reason}; its exchange overlaps {len(moved)} node(s) of the block's shared work"


# The report's word on route and dispatch where one `routed_experts` node runs them (`rewrite.select_lowerings`).
ROUTED = (
    "in one routed_experts node with experts ({}) (fuse_route): at the few tokens where its tiles are fused, its "
    "kernel routes each pick itself after the router's GEMV (no route, sort or fill kernels); elsewhere this "
    "lowering runs"
)


def _tiles_note(match: MoEMatch, device: torch.device) -> str:
    """Which T-buckets the Triton experts run tuned tiles in, for a block on one GPU; "" for other lowerings."""
    spec = match.spec
    if device.type != "cuda" or spec.layout != "single" or match.selections["experts"].chosen.name != "triton":
        return ""
    from moe_fx.lowering.triton import tuning  # chosen "triton": Triton imports

    ex = spec.experts
    return tuning.tiles_note(ex.num_experts, ex.hidden, ex.ffn, spec.top_k, ex.gated, getattr(torch, ex.dtype), device,
                             spec.quant.mode)  # fmt: skip


_WEIGHT_ARGS = ("w13", "w3", "w2", "w13_bias", "w2_bias", "w13_scale", "w2_scale")


def _weight_bytes(gm: fx.GraphModule, new_nodes: list[fx.Node]) -> int:
    """Bytes of the weights (stacked or quantised), biases and scales the block's experts node reads."""
    experts = next(n for n in new_nodes if n.meta.get("moe_fx", {}).get("op") == "experts")
    args = dict(zip((a.name for a in experts.target._schema.arguments), experts.args))
    return sum(_tensor_bytes(gm, args.get(name)) for name in _WEIGHT_ARGS if isinstance(args.get(name), fx.Node))


def _tensor_bytes(gm: fx.GraphModule, node: fx.Node) -> int:
    if node.op == "call_function":  # a concatenation the graph makes per call (`rewrite._bind`): its parts
        return sum(_tensor_bytes(gm, n) for n in node.all_input_nodes)
    t = value(node) if value(node) is not None else getattr(gm, node.target)
    return t.numel() * t.element_size()


def _check_native_quant(match: MoEMatch, device: torch.device, options: Options) -> None:
    """A quantised block on a GPU must get a native experts lowering, unless the user allows the reference."""
    chosen = match.selections["experts"].chosen.name
    if device.type != "cuda" or options.quant == "none" or chosen != "reference" or options.allow_reference_fallback:
        return
    major, minor = torch.cuda.get_device_capability(device)
    raise ValueError(
        f"moe_fx: quant={options.quant!r} has no native experts lowering on {device} (compute capability "
        f"{major}.{minor}; fp8 tensor cores need >= 8.9): the reference lowering would emulate it, slowly. "
        "Pass options={'allow_reference_fallback': True} to run it anyway, or quant='none'"
    )


def _not_sharded(match: MoEMatch, layout: str) -> str | None:
    """Why the block's weights are not sharded for the parallel `layout` yet (it runs on one device), or None:
    weights read as views of their leaves, or separate stacked biases the graph concatenates per call
    (`rewrite._bind`)."""
    b = match.binding
    viewed = [f.name for f in (*b.w13_parts, b.w2_family) if f is not None and f.source is not None]
    biases = b.w13_bias_parts
    if viewed:
        what = (f"expert weights read as views ({', '.join(viewed)}: stored flat as [E·F, D], or holding more "
                "experts) are")  # fmt: skip
    elif len(biases) > 1 and all(f.stacked for f in biases):
        what = f"separate stacked gate/up biases ({', '.join(f.name for f in biases)}) are concatenated per call and"
    else:
        return None
    return f"{what} not sharded for layout={layout!r} yet; they run on one device (layout='single')"


def _block_nodes(match: MoEMatch) -> set[fx.Node]:
    return match.region | match.router_nodes | {match.output}


def _roles(match: MoEMatch) -> dict[fx.Node, str]:
    return {**dict.fromkeys(match.router_nodes, "router"), match.output: "output"}


def _log_lowerings(match: MoEMatch) -> None:
    for op, sel in match.selections.items():
        rejected = "; ".join(f"{name}: {why}" for name, why in sel.rejected) or "none"
        path = match.module_path or "<root>"
        log.debug("moe_fx: %s %s -> %s (%s); refused: %s", path, op, sel.chosen.name, sel.reason, rejected)


def rewrite_graph(
    gm: fx.GraphModule,
    example_inputs: list,
    options: Options,
    *,
    dry_run: bool = False,
    graph: int = 0,
    rebind: list | None = None,
    owns_forward: bool = False,
    inner_reorders: bool = False,
) -> Report:
    """Find every MoE block in `gm`, pick lowerings and rewrite each in place.

    Parameters that must become views of a stacked tensor are added to `rebind` (the caller applies
    them once tracing is over, see `apply_rebind`), or rebound at once when `rebind` is None.
    `dry_run` (explain): `gm` is a throwaway copy; it is rewritten so that the report can show each
    block after the rewrite, but no parameter is rebound and nothing is counted as rewritten.
    Each block's report keeps standalone copies of its subgraph before and after (`moe_fx.draw`).
    `owns_forward`: the caller runs `gm` instead of the module from now on (apply), so under a parallel
    layout the original parameters may shrink to this rank's shard (see `rewrite._bind_shard`).
    `inner_reorders`: a compiler that schedules the nodes itself (Inductor) receives `gm`: a moved shared
    expert is pinned between dispatch and experts by data edges (`overlap.hoist_past_dispatch`).
    """
    pending = [] if rebind is None else rebind
    fake_mode = _fake_mode(gm.graph)  # value-exact normalisations first (Llama4's router)
    drop_unused_counts(gm)  # a hit-loop capture's `.tolist()` of the expert counts (`moe_fx.capture.hit_loops`)
    sink_sigmoid_into_scatter(gm, lambda node: _set_meta(node, fake_mode))
    fills_from_scatter_index(gm, lambda node: _set_meta(node, fake_mode))
    finder = BlockFinder(gm, example_inputs)
    matches, rejections = find_blocks(gm, example_inputs, finder)
    empty = [r for r in rejections if r.reason == EMPTY_BATCH]
    if empty and options.layout != "single":  # left as it is, the block would skip the exchanges its peers wait in
        raise ValueError(
            f"moe_fx: block {empty[0].module_path or '<root>'} was captured for an empty batch (0 tokens) under "
            f"layout={options.layout!r}: moe_fx cannot verify it there, and left as it is this rank would skip the "
            "exchanges the other ranks wait in. Capture it with tokens: give apply a non-empty example, or under "
            "torch.compile make this rank's first call of each new shape non-empty (Dynamo specialises 0 tokens "
            "into a graph of its own)"
        )
    report = Report(graphs=1)
    nodes = {n.name: n for n in gm.graph.nodes}
    report.rejections += [
        RejectionReport(r.module_path, r.where, r.reason, graph, source_line(nodes.get(r.where))) for r in rejections
    ]
    count("rejected", len(rejections))
    accepted = []
    for match in matches:  # every check runs on the pristine graph; the rewrites come after
        mode, reason, match.weights_note = prequant.quant_mode(match.binding, options.quant, options.layout)
        match.spec = match.spec.replace(quant=QuantSpec(mode, options.keep_original_weights), layout=options.layout,
                                        max_tokens_per_rank=options.max_tokens_per_rank)  # fmt: skip
        if reason is None and _needs_autograd(match):
            reason = (
                "grad mode is on and the block's inputs or weights require grad, but moe_fx lowerings have no "
                "autograd yet: run under torch.no_grad()/inference_mode() or call requires_grad_(False)"
            )
        if reason is None and options.layout != "single":
            reason = _not_sharded(match, options.layout)
        device = value(match.x).device
        reason = reason or select_lowerings(match, device.type, options.lowerings, options.fuse_combine,
                                            options.fuse_route)  # fmt: skip
        if reason is None:
            _check_native_quant(match, device, options)
        if reason is None and options.verify:
            err, why = verify(finder, match)
            if why is not None:
                chosen = ", ".join(f"{op}={sel.chosen.name}" for op, sel in match.selections.items())
                reason = f"verification failed ({chosen}): {why}"
                count("verify_failed")
            elif err is not None:
                match.errors["verified" if match.spec.layout == "single" else "verified (one device)"] = err
        if reason is not None:
            log.info("moe_fx: not rewriting %s: %s", match.module_path, reason)
            report.rejections.append(RejectionReport(match.module_path, match.ids_cut.name, reason, graph))
            count("rejected")
            continue
        accepted.append((match, plan_shard(match.spec, options.group, options.expert_placement, device.type)))
    taken = {n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("moe_fx_block")}
    index = len(taken)
    overlapping = []  # blocks whose dispatch overlaps its exchange: their shared work moves once all are rewritten
    for match, shard in accepted:  # shard: this rank's part under a parallel layout, None on one device
        _log_lowerings(match)
        block = _block_report(match, graph, device)
        if shard is not None:  # explain shows which experts (or F slice) this rank holds
            dispatch = block.lowerings["quantize_dispatch"]
            dispatch.reason = f"{dispatch.reason}; {shard}"
        report.matches.append(block)
        block.before = snapshot(_block_nodes(match), _roles(match), outputs=[match.output])
        old = set(gm.graph.nodes)
        rewrite(gm, match, index, [] if dry_run else pending, shard, owns_forward and not dry_run)
        new_nodes = [n for n in gm.graph.nodes if n not in old]
        if any(n.meta.get("moe_fx", {}).get("projects") for n in new_nodes):
            route = block.lowerings["route"]
            route.reason = f"{route.reason}; takes the router's linear (projects the tokens itself)"
        if match.route_in_experts:
            experts = block.lowerings["experts"]
            for op in ("route", "quantize_dispatch"):
                choice = block.lowerings[op]
                choice.reason = f"{choice.reason}; {ROUTED.format(experts.name)}"
        if options.overlap_shared and match.selections["quantize_dispatch"].chosen.overlaps:
            overlapping.append((new_nodes, block))
        block.after, block.weight_bytes = snapshot(new_nodes), _weight_bytes(gm, new_nodes)
        index += 1
        if not dry_run:
            count("rewritten")
            log.info("moe_fx: rewrote %s (%s): %s", match.module_path, match.form, match.spec.summary())
    for new_nodes, block in overlapping:
        _overlap(gm, new_nodes, block, example_inputs, inner_reorders)
    if overlapping:
        gm.recompile()
    if rebind is None and not dry_run:
        apply_rebind(pending)
    return report
