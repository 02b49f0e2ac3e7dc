"""What moe_fx found and did: `Report.matches` and `Report.rejections`, as text and as HTML."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from moe_fx.spec import MoESpec


@dataclass
class LoweringChoice:
    op: str
    name: str | None
    reason: str
    rejected: tuple[tuple[str, str], ...] = ()


@dataclass
class BlockReport:
    """One rewritten (or, for explain, rewritable) MoE block."""

    module_path: str
    form: str
    spec: MoESpec
    lowerings: dict[str, LoweringChoice]
    errors: dict[str, float]
    weight_bytes: int
    graph: int = 0

    def row(self) -> list[str]:
        lowering = ", ".join(f"{op}={c.name}" for op, c in self.lowerings.items())
        errs = " ".join(f"{k} {v:.1e}" for k, v in self.errors.items())
        return [self.module_path or "<root>", self.form, self.spec.summary(), lowering, errs]


@dataclass
class RejectionReport:
    module_path: str
    where: str
    reason: str
    graph: int = 0


@dataclass
class Report:
    matches: list[BlockReport] = field(default_factory=list)
    rejections: list[RejectionReport] = field(default_factory=list)
    graphs: int = 0
    graph_breaks: int = 0

    def extend(self, other: Report) -> None:
        self.matches += other.matches
        self.rejections += other.rejections
        self.graphs += other.graphs
        self.graph_breaks += other.graph_breaks

    @property
    def weight_bytes(self) -> int:
        return sum(m.weight_bytes for m in self.matches)

    def __str__(self) -> str:
        head = ["module", "form", "spec", "lowerings", "verified rel err"]
        lines = [
            f"moe_fx: {len(self.matches)} MoE block(s) matched, {len(self.rejections)} rejected, "
            f"{self.graphs} graph(s), {self.graph_breaks} graph break(s)"
        ]
        if self.matches:
            lines.append(_table(head, [m.row() for m in self.matches]))
        for r in self.rejections:
            lines.append(f"  rejected {r.module_path or '<root>'} at {r.where}: {r.reason}")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        e = html.escape
        rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in m.row()) + "</tr>" for m in self.matches)
        rejected = "".join(
            f"<li><code>{e(r.module_path or '<root>')}</code> at <code>{e(r.where)}</code>: {e(r.reason)}</li>"
            for r in self.rejections
        )
        return (
            f"<div><b>moe_fx</b>: {len(self.matches)} block(s) matched, {len(self.rejections)} rejected, "
            f"{self.graphs} graph(s)<table><tr><th>module</th><th>form</th><th>spec</th><th>lowerings</th>"
            f"<th>verified rel err</th></tr>{rows}</table>" + (f"<ul>{rejected}</ul>" if rejected else "") + "</div>"
        )


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *rows])
