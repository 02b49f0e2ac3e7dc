"""match -> select lowerings -> rewrite, for one FX graph. Used by the backend, `apply` and `explain`."""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from moe_fx.draw import snapshot
from moe_fx.options import Options
from moe_fx.passes.graph_view import value
from moe_fx.passes.match import MoEMatch, find_blocks
from moe_fx.passes.rewrite import apply_rebind, rewrite, select_lowerings
from moe_fx.report import BlockReport, LoweringChoice, RejectionReport, Report
from moe_fx.spec import QuantSpec

log = logging.getLogger("moe_fx")


def _needs_autograd(match: MoEMatch) -> bool:
    b = match.binding
    families = [*b.w13_parts, b.w2_family, *b.w13_bias_parts, b.w2_bias_family]
    return torch.is_grad_enabled() and any(t.requires_grad for f in families if f for t in f.tensors)


def _block_report(match: MoEMatch, graph: int) -> BlockReport:
    b = match.binding
    tensors = [t for t in (b.w13, b.w3, b.w2, b.w13_bias, b.w2_bias) if t is not None]
    lowerings = {
        op: LoweringChoice(op, sel.chosen.name, sel.reason, sel.rejected) for op, sel in match.selections.items()
    }
    if not match.router_recognized:
        lowerings = {
            "route": LoweringChoice("route", "opaque", "router kept in the graph: not a recognised form"),
            **lowerings,
        }
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return BlockReport(match.module_path, match.form, match.spec, lowerings, match.errors, nbytes, graph)


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
) -> Report:
    """Find every MoE block in `gm`, pick lowerings and rewrite each in place.

    Parameters that must become views of a stacked tensor are added to `rebind` (the caller applies
    them once tracing is over, see `apply_rebind`), or rebound at once when `rebind` is None.
    `dry_run` (explain): `gm` is a throwaway copy; it is rewritten so that the report can show each
    block after the rewrite, but no parameter is rebound and nothing is counted as rewritten.
    Each block's report keeps standalone copies of its subgraph before and after (`moe_fx.draw`).
    """
    pending = [] if rebind is None else rebind
    matches, rejections = find_blocks(gm, example_inputs)
    report = Report(graphs=1)
    report.rejections += [RejectionReport(r.module_path, r.where, r.reason, graph) for r in rejections]
    taken = {n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("moe_fx_block")}
    index = len(taken)
    for match in matches:
        match.spec = match.spec.replace(quant=QuantSpec(options.quant), layout=options.layout)
        reason = None
        if _needs_autograd(match):
            reason = (
                "grad mode is on and the expert weights require grad, but moe_fx lowerings have no "
                "autograd yet: run under torch.no_grad()/inference_mode() or call requires_grad_(False)"
            )
        reason = reason or select_lowerings(match, value(match.x).device.type, options.lowerings)
        if reason is not None:
            log.info("moe_fx: not rewriting %s: %s", match.module_path, reason)
            report.rejections.append(RejectionReport(match.module_path, match.ids_cut.name, reason, graph))
            counters["moe_fx"]["rejected"] += 1
            continue
        _log_lowerings(match)
        block = _block_report(match, graph)
        report.matches.append(block)
        block.before = snapshot(_block_nodes(match), _roles(match), outputs=[match.output])
        old = set(gm.graph.nodes)
        rewrite(gm, match, index, [] if dry_run else pending)
        block.after = snapshot([n for n in gm.graph.nodes if n not in old])
        index += 1
        if not dry_run:
            counters["moe_fx"]["rewritten"] += 1
            log.info("moe_fx: rewrote %s (%s): %s", match.module_path, match.form, match.spec.summary())
    counters["moe_fx"]["rejected"] += len(rejections)
    if rebind is None and not dry_run:
        apply_rebind(pending)
    return report
