"""match -> select lowerings -> verify -> rewrite, for one FX graph. Used by the backend, `apply` and `explain`.

Every check (grad mode, a lowering for each op, verification) runs on the pristine graph; only the
blocks that pass are rewritten, so a failed block is left exactly as it was.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from moe_fx.options import Options
from moe_fx.passes.graph_view import value
from moe_fx.passes.match import BlockFinder, MoEMatch, find_blocks
from moe_fx.passes.rewrite import apply_rebind, rewrite, select_lowerings
from moe_fx.passes.verify import verify
from moe_fx.report import BlockReport, LoweringChoice, RejectionReport, Report
from moe_fx.spec import QuantSpec

log = logging.getLogger("moe_fx")


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
    return any(getattr(value(n), "requires_grad", False) for n in (match.x, match.logits))


def _block_report(match: MoEMatch, graph: int) -> BlockReport:
    b = match.binding
    tensors = [t for t in (b.w13, b.w2, b.w13_bias, b.w2_bias) if t is not None]
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


def rewrite_graph(
    gm: fx.GraphModule,
    example_inputs: list,
    options: Options,
    *,
    dry_run: bool = False,
    graph: int = 0,
    rebind: list | None = None,
) -> Report:
    """Find every MoE block in `gm`, pick lowerings and (unless `dry_run`) rewrite it in place.

    Parameters that must become views of a stacked tensor are added to `rebind` (the caller applies
    them once tracing is over, see `apply_rebind`), or rebound at once when `rebind` is None.
    """
    pending = [] if rebind is None else rebind
    finder = BlockFinder(gm, example_inputs)
    matches, rejections = find_blocks(gm, example_inputs, finder)
    report = Report(graphs=1)
    report.rejections += [RejectionReport(r.module_path, r.where, r.reason, graph) for r in rejections]
    count("rejected", len(rejections))
    accepted = []
    for match in matches:  # every check runs on the pristine graph; the rewrites come after
        match.spec = match.spec.replace(quant=QuantSpec(options.quant), layout=options.layout)
        reason = None
        if _needs_autograd(match):
            reason = (
                "grad mode is on and the block's inputs or weights require grad, but moe_fx lowerings have no "
                "autograd yet: run under torch.no_grad()/inference_mode() or call requires_grad_(False)"
            )
        reason = reason or select_lowerings(match, value(match.x).device.type, options.lowerings)
        if reason is None and options.verify:
            err, why = verify(finder, match)
            if why is not None:
                chosen = ", ".join(f"{op}={sel.chosen.name}" for op, sel in match.selections.items())
                reason = f"verification failed ({chosen}): {why}"
                count("verify_failed")
            elif err is not None:
                match.errors["verified"] = err
        if reason is not None:
            log.info("moe_fx: not rewriting %s: %s", match.module_path, reason)
            report.rejections.append(RejectionReport(match.module_path, match.ids_cut.name, reason, graph))
            count("rejected")
            continue
        accepted.append(match)
    taken = {n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("moe_fx_block")}
    index = len(taken)
    for match in accepted:
        report.matches.append(_block_report(match, graph))
        if not dry_run:
            rewrite(gm, match, index, pending)
            index += 1
            count("rewritten")
            log.info("moe_fx: rewrote %s (%s): %s", match.module_path, match.form, match.spec.summary())
    if rebind is None:
        apply_rebind(pending)
    return report
