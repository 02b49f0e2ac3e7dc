"""What moe_fx found and did: `Report.matches` and `Report.rejections`, as text, HTML and pictures.

report = moe_fx.explain(model, x)     # or moe_fx.apply(model), or moe_fx.backend.last_reports()
print(report)                         # compact text table
report                                # in Jupyter: an HTML table (`_repr_html_`, no extra packages)
report.draw("after", block=0)         # SVG of block 0 after the rewrite (needs graphviz's `dot`)
report.subgraph("before", block=0)    # the same block as a standalone fx.Graph
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch.fx as fx

from moe_fx.spec import MoESpec

WHICH = ("before", "after")


@dataclass
class LoweringChoice:
    """The lowering picked for one op of one block, why, and the candidates refused (name, reason)."""

    op: str
    name: str | None
    reason: str
    rejected: tuple[tuple[str, str], ...] = ()

    def rejected_text(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.rejected)


@dataclass
class BlockReport:
    """One rewritten (or, for explain, rewritable) MoE block.

    `before` / `after`: standalone copies of the block's subgraph (see `moe_fx.draw.snapshot`).
    `weight_bytes`: the stacked (or quantised) expert weights the lowerings read; `unquantised_bytes`: what
    they took before quantisation (0 when the block is not quantised, or its weights came quantised);
    `weights_note`: for weights the model holds quantised, whether they were taken as they are (mode, the
    quantised tensors and their scales) or why not (`passes/prequant.py`).
    """

    module_path: str
    form: str
    spec: MoESpec
    lowerings: dict[str, LoweringChoice]
    errors: dict[str, float]
    weight_bytes: int
    graph: int = 0
    before: fx.Graph | None = field(default=None, repr=False)
    after: fx.Graph | None = field(default=None, repr=False)
    unquantised_bytes: int = 0
    weights_note: str = ""  # pre-quantised weights: taken as they are (mode, scales) or why not
    tiles_note: str = ""  # Triton experts on a GPU: the T-buckets with tuned tiles, and whose entries they are
    capture_note: str = ""  # apply: the calls the rewritten block serves, where they are not every size

    def notes(self) -> list[tuple[str, str]]:
        """(kind, text) of the block's notes that apply: its pre-quantised weights, its Triton tiles, the calls
        `apply`'s capture serves."""
        notes = (
            [("weights", f"{self.weights_note} ({format_bytes(self.weight_bytes)} read)")] if self.weights_note else []
        )
        notes += [("tiles", self.tiles_note)] if self.tiles_note else []
        return notes + ([("capture", self.capture_note)] if self.capture_note else [])

    @property
    def lowering_summary(self) -> str:
        """The lowering most ops use, then the ops that use another: 'reference, experts=triton'."""
        names = [str(c.name) for c in self.lowerings.values()]
        common = max(dict.fromkeys(names), key=names.count)
        return ", ".join([common, *(f"{op}={c.name}" for op, c in self.lowerings.items() if c.name != common)])

    def row(self, index: int) -> list[str]:
        router = self.spec.router.summary() if self.spec.router else f"opaque top{self.spec.top_k}"
        experts = self.spec.experts.summary()
        if self.spec.weight_placement == "input":
            experts += " weight@input"
        quant = "" if self.spec.quant.mode == "none" else f" {self.spec.quant.mode}"
        errs = ", ".join(f"{k} {v:.1e}" for k, v in self.errors.items())
        return [
            str(index),
            self.module_path or "<root>",
            self.form,
            router,
            experts + quant,
            self.lowering_summary,
            format_bytes(self.weight_bytes)
            + (f" (was {format_bytes(self.unquantised_bytes)})" if self.unquantised_bytes else ""),
            errs,
        ]


@dataclass
class RejectionReport:
    """A near-miss left untouched: where (module path, anchor node) and why."""

    module_path: str
    where: str
    reason: str
    graph: int = 0
    source: str = ""  # "file:line" of the user code that made the anchor node, where the graph says


HEAD = ["#", "module", "form", "router", "experts", "lowering", "weights", "verified rel err"]


@dataclass
class Report:
    """Matches, rejections and Dynamo's graph/break counts for one model (see the module docstring)."""

    matches: list[BlockReport] = field(default_factory=list)
    rejections: list[RejectionReport] = field(default_factory=list)
    graphs: int = 0
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)

    def extend(self, other: Report) -> None:
        self.matches += other.matches
        self.rejections += other.rejections
        self.graphs += other.graphs
        self.graph_breaks += other.graph_breaks
        self.break_reasons += other.break_reasons

    @property
    def weight_bytes(self) -> int:
        return sum(m.weight_bytes for m in self.matches)

    def break_counts(self) -> dict[str, int]:
        """Each distinct graph-break reason (in order) and how often Dynamo gave it."""
        return Counter(self.break_reasons)

    # ---------------------------------------------------------------- text
    def headline(self) -> str:
        return (
            f"moe_fx: {len(self.matches)} MoE block(s) matched, {len(self.rejections)} rejected; "
            f"Dynamo: {self.graphs} graph(s), {self.graph_breaks} graph break(s); "
            f"expert weights {format_bytes(self.weight_bytes)}"
        )

    def lowering_lines(self) -> list[tuple[str, str, str, str, str]]:
        """(blocks, ops, lowering, reason, candidates refused): identical choices grouped over ops and blocks."""
        grouped: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
        for i, m in enumerate(self.matches):
            per_block: dict[tuple[str, str, str], list[str]] = defaultdict(list)
            for op, c in m.lowerings.items():
                per_block[(str(c.name), c.reason, c.rejected_text())].append(op)
            for (name, reason, rejected), ops in per_block.items():
                grouped[(", ".join(ops), name, reason, rejected)].append(str(i))
        return [(",".join(blocks), *key) for key, blocks in grouped.items()]

    def __str__(self) -> str:
        lines = [self.headline()]
        if self.matches:
            lines.append(_table(HEAD, [m.row(i) for i, m in enumerate(self.matches)]))
            lines.append("  lowerings (blocks: ops = lowering (why); candidates refused):")
            for blocks, ops, name, reason, rejected in self.lowering_lines():
                refused = f"; refused {rejected}" if rejected else ""
                lines.append(f"    {blocks}: {ops} = {name} ({reason}){refused}")
            for i, m in enumerate(self.matches):
                lines += [f"  {kind} {i}: {note}" for kind, note in m.notes()]
        for r in self.rejections:
            lines.append(f"  rejected {r.module_path or '<root>'} at {r.where or '-'}: {r.reason}")
        for reason, n in self.break_counts().items():
            lines.append(f"  graph break{f' (x{n})' if n > 1 else ''}: {reason}")
        return "\n".join(lines)

    __repr__ = __str__

    # ---------------------------------------------------------------- HTML
    def _repr_html_(self) -> str:
        e = html.escape
        th = "".join(f"<th>{e(h)}</th>" for h in HEAD)
        rows = "".join(
            "<tr>" + "".join(f"<td>{e(c)}</td>" for c in m.row(i)) + "</tr>" for i, m in enumerate(self.matches)
        )
        parts = [f'<div class="moe-fx-report">{_STYLE}<p><b>{e(self.headline())}</b></p>']
        if self.matches:
            parts.append(f"<table><thead><tr>{th}</tr></thead><tbody>{rows}</tbody></table>")
            low = "".join(
                f"<tr><td>{e(b)}</td><td><code>{e(op)}</code></td><td><b>{e(name)}</b></td>"
                f"<td>{e(reason)}</td><td>{e(rejected) or '&ndash;'}</td></tr>"
                for b, op, name, reason, rejected in self.lowering_lines()
            )
            head = "".join(f"<th>{h}</th>" for h in ("blocks", "ops", "lowering", "why", "candidates refused"))
            parts.append(f"<p>Lowerings</p><table><thead><tr>{head}</tr></thead><tbody>{low}</tbody></table>")
        notes = "".join(
            f"<li>{e(kind)} {i}: {e(note)}</li>" for i, m in enumerate(self.matches) for kind, note in m.notes()
        )
        if notes:
            parts.append(f"<p>Notes</p><ul>{notes}</ul>")
        if self.rejections:
            rej = "".join(
                f"<tr><td><code>{e(r.module_path or '<root>')}</code></td>"
                f"<td><code>{e(r.where or '-')}</code></td><td>{e(r.reason)}</td></tr>"
                for r in self.rejections
            )
            head = "".join(f"<th>{h}</th>" for h in ("module", "at node", "why it was left as it is"))
            parts.append(f"<p>Rejected</p><table><thead><tr>{head}</tr></thead><tbody>{rej}</tbody></table>")
        if self.break_reasons:
            items = "".join(f"<li>{e(r)}{f' (x{n})' if n > 1 else ''}</li>" for r, n in self.break_counts().items())
            parts.append(f"<p>Graph breaks</p><ul>{items}</ul>")
        return "".join(parts) + "</div>"

    # ---------------------------------------------------------------- pictures
    def subgraph(self, which: str = "after", block: int = 0) -> fx.Graph:
        """Block `block`'s subgraph `which` ("before" | "after") the rewrite, as a standalone fx.Graph."""
        if which not in WHICH:
            raise ValueError(f"moe_fx: which={which!r} is not one of {WHICH}")
        if not 0 <= block < len(self.matches):
            raise ValueError(f"moe_fx: block={block} is out of range: the report has {len(self.matches)} match(es)")
        graph = getattr(self.matches[block], which)
        if graph is None:
            raise ValueError(f"moe_fx: block {block} has no recorded subgraph {which} the rewrite")
        return graph

    def draw(self, which: str = "after", block: int = 0):
        """An SVG picture (`moe_fx.draw.Drawing`) of block `block` `which` ("before" | "after") the rewrite.

        The moe_fx nodes are filled orange. Needs graphviz's `dot` on PATH; without it raises
        `moe_fx.draw.GraphvizNotFound` saying what to install.
        """
        from moe_fx.draw import Drawing, to_dot

        graph = self.subgraph(which, block)
        m = self.matches[block]
        return Drawing(to_dot(graph, f"{m.module_path or '<root>'} ({m.form}), {which} the moe_fx rewrite"))


def op_detail(op: str, spec: MoESpec) -> str:
    """One short line on what moe_fx op `op` does for `spec` (node annotations and pictures)."""
    es = spec.experts
    if op == "route":
        return spec.router.summary() if spec.router else f"opaque top{spec.top_k}"
    if op == "quantize_dispatch":
        return f"quant={spec.quant.mode} layout={spec.layout}"
    if op == "experts":
        layout = "" if not es.gated or es.gate_up == "concat" else f" {es.gate_up}"
        return f"E={es.num_experts} F={es.ffn} {es.activation}{layout}"
    if op == "routed_experts":  # route, dispatch and experts(reduce=True) in one node
        return f"{op_detail('route', spec)} -> {op_detail('experts', spec)}, summed"
    return f"weight at {spec.weight_placement}"


def annotation(op: str, spec: MoESpec, lowering: str) -> dict[str, str]:
    """What `GraphModule.print_readable()` shows above a moe_fx node (FX's `node.meta["custom"]`)."""
    return {"moe_fx": f"{op} [{lowering}]", "spec": op_detail(op, spec)}


_STYLE = (
    "<style>.moe-fx-report table{border-collapse:collapse;font-size:90%;margin-bottom:.6em}"
    ".moe-fx-report th,.moe-fx-report td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
    ".moe-fx-report th{background:#f3f3f3}.moe-fx-report p{margin:.3em 0}</style>"
)


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [head, *rows])
