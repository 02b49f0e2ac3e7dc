"""moe_fx.explain's Report: text and HTML tables, lowering choices, logging, pictures, annotated printout."""

import dataclasses
import logging
import re
import shutil
from html.parser import HTMLParser

import pytest
import torch
import torch.nn as nn

import moe_fx
from moe_fx import draw
from moe_fx import examples as ex
from moe_fx.lowering import registry

OPS = ("route", "quantize_dispatch", "experts", "combine")


class MatchAndNearMiss(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = ex.LoopMoE(num_experts=4)
        self.tanh_moe = ex.LoopMoE(num_experts=4, expert=ex.TanhExpert)

    def forward(self, x):
        x = x + self.moe(x)
        torch._dynamo.graph_break()  # the report counts Dynamo's graphs and says why they broke
        return x + self.tanh_moe(x)


def _refuse(spec):
    return "needs a device this test does not have"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def explained():
    """One explain run for the whole module: the report and what the moe_fx logger said during it."""
    torch.manual_seed(0)
    logger, records = logging.getLogger("moe_fx"), _Records()
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    registry.register_lowering("experts", device="*", name="test_refused", priority=99, supports=_refuse)(_refuse)
    try:
        report = moe_fx.explain(MatchAndNearMiss().eval(), torch.randn(6, 32))
    finally:
        registry.unregister_lowering("experts", device="*", name="test_refused")
        logger.removeHandler(records)
        logger.setLevel(level)
    return report, records.messages


def test_report_holds_matches_lowerings_rejections_and_memory(explained):
    report, _ = explained
    assert [(m.module_path, m.form) for m in report.matches] == [("moe", "expert_loop")]
    block = report.matches[0]
    assert block.spec.experts.num_experts == 4 and block.spec.top_k == 2
    assert {op: c.name for op, c in block.lowerings.items()} == dict.fromkeys(OPS, "reference")
    assert block.lowerings["experts"].rejected == (("test_refused", "needs a device this test does not have"),)
    assert block.weight_bytes == 4 * (2 * 48 * 32 + 32 * 48) * 4  # w13 [4, 96, 32] + w2 [4, 32, 48], fp32
    assert [r.module_path for r in report.rejections] == ["tanh_moe"]
    assert "no experts spec reproduces the block" in report.rejections[0].reason
    assert (report.graphs, report.graph_breaks, len(report.break_reasons)) == (2, 1, 1)
    assert "graph_break" in report.break_reasons[0] and "test_report.py" in report.break_reasons[0]


def test_text_table(explained):
    report, _ = explained
    text = str(report)
    head, table_head, row = text.splitlines()[:3]
    assert head.startswith("moe_fx: 1 MoE block(s) matched, 1 rejected; Dynamo: 2 graph(s), 1 graph break(s)")
    assert table_head.split() == [
        "#",
        "module",
        "form",
        "router",
        "experts",
        "lowering",
        "weights",
        "verified",
        "rel",
        "err",
    ]
    assert row.split()[:4] == ["0", "moe", "expert_loop", "softmax→top2→renorm"] and "72.0 KiB" in row
    assert "experts = reference (highest priority (0) supporting the spec); refused test_refused: needs a" in text
    assert re.search(r"rejected tanh_moe at topk\w*: no experts spec reproduces the block", text)
    assert "  graph break: " in text


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.cells = [], []

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack.pop() == tag, f"</{tag}> closes an unopened tag"

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("td", "code", "b"):
            self.cells.append(data)


def test_html_is_well_formed_escaped_and_complete(explained):
    report, _ = explained
    page = report._repr_html_()
    parser = _Tags()
    parser.feed(page)
    assert parser.stack == []
    assert page.count("<table>") == 3 and "<p>Graph breaks</p><ul><li>" in page  # blocks, lowerings, rejections
    for cell in ("moe", "expert_loop", "softmax→top2→renorm", "reference", "tanh_moe", "72.0 KiB"):
        assert cell in parser.cells, cell
    assert any("test_refused: needs a device" in c for c in parser.cells)
    empty = moe_fx.Report()
    assert "&lt;" not in empty._repr_html_() and "0 MoE block(s) matched" in empty._repr_html_()


def test_block_notes_show_in_text_and_html(explained):
    """A block's notes (pre-quantised weights, Triton tiles; set on GPUs and for quantised checkpoints) print
    under the lowerings, and the HTML lists them escaped."""
    report, _ = explained
    block = dataclasses.replace(report.matches[0], weights_note="fp8 <e4m3> taken as is",
                                tiles_note="Triton tiles tuned for T-buckets 1, 16 (this GPU)")  # fmt: skip
    noted = moe_fx.Report(matches=[block])
    assert "  weights 0: fp8 <e4m3> taken as is (72.0 KiB read)\n  tiles 0: Triton tiles tuned for T-buckets 1, 16" in (
        str(noted)
    )
    page = noted._repr_html_()
    assert "<p>Notes</p><ul><li>weights 0: fp8 &lt;e4m3&gt; taken as is (72.0 KiB read)</li><li>tiles 0:" in page
    assert "<p>Notes</p>" not in report._repr_html_() and "  tiles 0" not in str(report)


def test_every_rejection_and_lowering_choice_is_logged(explained):
    _, messages = explained
    assert any(m.startswith("moe_fx: rejected tanh_moe") and "no experts spec" in m for m in messages), messages
    for op in OPS:
        assert any(f"moe {op} -> reference" in m for m in messages), (op, messages)
    assert any("moe experts -> reference" in m and "test_refused: needs a device" in m for m in messages)


def test_subgraphs_before_and_after(explained):
    report, _ = explained
    before, after = report.subgraph("before", 0), report.subgraph("after", 0)
    targets = [str(n.target) for n in before.nodes]
    assert "topk" in targets and "index_add_" in targets
    moe_nodes = [n for n in after.nodes if n.meta.get("role") == "moe_fx"]
    assert [n.meta["moe_fx"]["op"] for n in moe_nodes] == list(OPS)
    assert not any(str(n.target) in ("topk", "index_add_") for n in after.nodes)
    with pytest.raises(ValueError, match="moe_fx: which='middle' is not one of"):
        report.subgraph("middle", 0)
    with pytest.raises(ValueError, match="moe_fx: block=3 is out of range: the report has 1 match"):
        report.draw("after", 3)


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot is not installed")
def test_draw_gives_svg_with_the_moe_fx_nodes_highlighted(explained, tmp_path):
    report, _ = explained
    after, before = report.draw("after", 0), report.draw("before", 0)
    assert after.svg.lstrip().startswith("<?xml") and "</svg>" in after.svg
    for op in OPS:
        assert f"moe_fx::{op}" in after.svg
    assert after.svg.count(draw._FILL["moe_fx"]) == 4  # the four moe_fx boxes, filled orange
    assert after._repr_svg_() == after.svg
    assert "topk" in before.svg and "moe_fx::" not in before.svg
    png = after.save(tmp_path / "after.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_without_graphviz_says_what_to_install(explained, monkeypatch):
    report, _ = explained
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    with pytest.raises(draw.GraphvizNotFound, match="moe_fx: drawing a graph needs graphviz's `dot`.*apt-get install"):
        report.draw("before", 0)


def test_print_readable_annotates_moe_fx_nodes():
    model = ex.LoopMoE(num_experts=4).eval()
    moe_fx.apply(model, torch.randn(5, 32))
    code = model.forward.gm.print_readable(print_output=False)
    assert "Annotation: {'moe_fx': 'route [reference]', 'spec': 'softmax→top2→renorm'}" in code
    assert "Annotation: {'moe_fx': 'experts [reference]', 'spec': 'E=4 F=48 silu_gated'}" in code
    assert code.count("Annotation: {'moe_fx'") == 4
