"""Pictures of one MoE block before and after the rewrite, laid out by graphviz `dot`.

`snapshot(nodes)` copies a block's nodes into a standalone `fx.Graph`: values from outside the block
become placeholders (named after the weight or activation they stand for), values used outside it
become outputs. Only what a picture needs is kept in the copies' meta (shape strings, the moe_fx
lowering, a role), so a `Report` holds no tensors. `to_dot` writes that graph in the dot language
with the moe_fx nodes highlighted; `render` runs graphviz's `dot` on it.
"""

from __future__ import annotations

import operator
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.fx as fx

from moe_fx.passes.weights import leaf_name
from moe_fx.report import op_detail

# Names of the tuple outputs of the moe_fx ops (see moe_fx/ops.py), for edge labels.
_OUTPUT_NAMES = {
    "route": ("weights_TK", "ids_TK"),
    "quantize_dispatch": ("xq", "xscale", "offsets", "gather_index", "row_weights", "row_index", "splits"),
}
# Box colours by role: inputs of the block, its router, any other op, its output, the moe_fx ops.
_FILL = {"input": "#e8f0fe", "router": "#e0f2f1", "op": "#f5f5f5", "output": "#fff3e0", "moe_fx": "#ffb74d"}
_INSTALL = (
    "moe_fx: drawing a graph needs graphviz's `dot` on PATH: install graphviz "
    "(apt-get install graphviz, brew install graphviz, or conda install -c conda-forge graphviz)"
)


class GraphvizNotFound(RuntimeError):
    """graphviz's `dot` executable is not installed."""


def _shape(node: fx.Node) -> str:
    v = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(v, (tuple, list)):
        return ", ".join(_shape_of(x) for x in v if isinstance(x, torch.Tensor))
    return _shape_of(v)


def _shape_of(v) -> str:
    if isinstance(v, torch.Tensor):
        dtype = str(v.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(s) for s in v.shape)}]"
    if isinstance(v, (torch.SymInt, int)):
        return f"size {v}"
    return ""


def _source(node: fx.Node) -> str:
    if node.op not in ("placeholder", "get_attr"):
        return node.name
    return re.sub(r"^(modules|parameters|buffers)_", "", leaf_name(node))


def snapshot(nodes, roles: Mapping[fx.Node, str] | None = None, outputs=None) -> fx.Graph:
    """A standalone copy of `nodes` (any order; graph order is kept), for pictures and printouts.

    `roles` maps nodes to "router" or "output" for colouring (default "op"); moe_fx op nodes are "moe_fx".
    `outputs`: the nodes the copy returns (default: those used outside `nodes`).
    """
    roles = roles or {}
    inside = set(nodes)
    if not inside:
        return fx.Graph()
    ordered = [n for n in next(iter(inside)).graph.nodes if n in inside]
    graph, env = fx.Graph(), {}
    for n in ordered:
        for i in n.all_input_nodes:
            if i not in inside and i not in env:
                env[i] = graph.placeholder(i.name)
                env[i].meta.update(source=_source(i), shape=_shape(i), role="input")
    for n in ordered:
        copy = env[n] = graph.node_copy(n, lambda a: env[a])
        copy.meta = {"shape": _shape(n), "source": _source(n), "role": roles.get(n, "op")}
        if "moe_fx" in n.meta:
            copy.meta.update(moe_fx=n.meta["moe_fx"], role="moe_fx")
    if outputs is None:
        outputs = [n for n in ordered if any(u not in inside for u in n.users)]
    graph.output(tuple(env[n] for n in outputs))
    return graph


def _label(node: fx.Node) -> str:
    shape = node.meta.get("shape", "")
    if node.op in ("placeholder", "get_attr"):
        head = node.meta.get("source", node.name)
    elif "moe_fx" in node.meta:
        info = node.meta["moe_fx"]
        op = "routed_experts" if info.get("routes") else info["op"]
        head = f"moe_fx::{op}  [{info['selection'].chosen.name}]"
        detail = op_detail(op, info["spec"])
        return "\n".join(s for s in (head, detail, shape) if s)
    elif node.op == "call_method":
        head = f".{node.target}()"
    elif node.target is operator.getitem:
        head = f"getitem [{node.args[1]}]" if not isinstance(node.args[1], (tuple, slice)) else "getitem"
    else:
        head = getattr(node.target, "__name__", str(node.target))
    return f"{head}\n{shape}" if shape else head


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _folded(node: fx.Node) -> bool:
    """`getitem(t, i)` of a tuple-valued node: drawn as a labelled edge, not as a box."""
    return node.target is operator.getitem and isinstance(node.args[1], int) and node.args[0].op != "placeholder"


def _edge_label(node: fx.Node) -> str:
    src, i = node.args
    names = _OUTPUT_NAMES.get(src.meta.get("moe_fx", {}).get("op"), ())
    name = names[i] if i < len(names) else f"[{i}]"
    return f"{name} {node.meta.get('shape', '')}".strip()


def to_dot(graph: fx.Graph, title: str = "") -> str:
    """The graph in graphviz's dot language: one box per node, moe_fx nodes filled orange and bold.

    `getitem(t, i)` of a tuple output is drawn as an edge labelled with the output's name and shape.
    """
    lines = [
        "digraph moe_fx {",
        "  rankdir=TB; nodesep=0.25; ranksep=0.35;",
        f"  label={_quote(title)}; labelloc=t; fontname=Helvetica; fontsize=12;",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=9, margin="0.08,0.03"];',
        "  edge [color=gray40, arrowsize=0.6, fontname=Helvetica, fontsize=7, fontcolor=gray30];",
    ]
    for n in graph.nodes:
        if _folded(n):
            continue
        role = "output" if n.op == "output" else n.meta["role"]
        attrs = [f"label={_quote(_label(n) if n.op != 'output' else 'block output')}", f'fillcolor="{_FILL[role]}"']
        if role == "moe_fx":
            attrs.append("penwidth=2.5")
        if n.op in ("placeholder", "get_attr", "output"):
            attrs.append("shape=ellipse")
        lines.append(f"  {_quote(n.name)} [{', '.join(attrs)}];")
    for n in graph.nodes:
        if _folded(n):
            continue
        for i in n.all_input_nodes:
            if _folded(i):
                lines.append(f"  {_quote(i.args[0].name)} -> {_quote(n.name)} [label={_quote(_edge_label(i))}];")
            else:
                lines.append(f"  {_quote(i.name)} -> {_quote(n.name)};")
    lines.append("}")
    return "\n".join(lines)


def render(dot_source: str, fmt: str = "svg") -> bytes:
    """Run graphviz `dot -T{fmt}` on `dot_source`; raise GraphvizNotFound saying what to install."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizNotFound(_INSTALL)
    done = subprocess.run([exe, f"-T{fmt}"], input=dot_source.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"moe_fx: graphviz dot failed ({done.returncode}): {done.stderr.decode()[:500]}")
    return done.stdout


class Drawing:
    """A drawn block: `.svg` (text), `.dot` (the source); shows itself in Jupyter; `save("x.png")`."""

    def __init__(self, dot_source: str):
        self.dot = dot_source
        self.svg = render(dot_source, "svg").decode()

    def _repr_svg_(self) -> str:
        return self.svg

    def __str__(self) -> str:
        return self.svg

    def save(self, path: str | Path) -> Path:
        """Write the picture; the suffix picks the format (.svg, .png, .pdf, .dot)."""
        path = Path(path)
        fmt = path.suffix.lstrip(".").lower()
        if fmt == "svg":
            path.write_text(self.svg)
        elif fmt == "dot":
            path.write_text(self.dot)
        else:
            path.write_bytes(render(self.dot, fmt))
        return path
