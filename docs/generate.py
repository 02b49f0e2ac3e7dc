"""Regenerate the generated sections of the docs from the code and the tests' own lists.

    python docs/generate.py          # rewrite the sections in place
    python docs/generate.py --check  # exit 1 and name the stale sections (tests/test_docs.py runs this)
    python docs/generate.py --images # also redraw docs/img/*.png (needs graphviz `dot` and chromium)

A section sits between `<!-- generated:NAME -->` and `<!-- end generated:NAME -->` in a Markdown
file; everything else in the file is hand-written. Sources:
- architecture.md `codemap`: the first paragraph of every moe_fx module's docstring;
- architecture.md `contract`: the docstring of moe_fx/ops.py (the op contract);
- user_guide.md `options`: `moe_fx.options.VALID_KEYS`;
- user_guide.md `forms`: `FORMS` in tests/passes/test_match.py (the naive forms the tests rewrite);
- user_guide.md `models`: `moe_fx.hf_models.ARCHITECTURES` (the HF architectures the tests build);
- user_guide.md `transformers4`: `moe_fx.hf_models.TRANSFORMERS_4` and each one's `refused` or `apply_only_4x`;
- performance.md `standing`: the latest H100 measurement of each cell of the issues' targets in those files;
  `results`: bench/results/*.json, as `bench/layer.py` writes them; `quant_notes`: the quantised section of
  bench/NOTES.md.
- performance.md `hf_models`: the latest bench/results/hf_models-*.json, as `bench/hf_models.py` writes it;
- performance.md `ep`: the latest bench/results/*-ep.json, as `bench/ep.py --json` writes it.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _module_doc(path: Path) -> str:
    """A module's docstring, read without importing it (optional dependencies stay optional)."""
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def codemap_section() -> str:
    rows = []
    for path in sorted((ROOT / "moe_fx").rglob("*.py")):
        first = _module_doc(path).split("\n\n")[0].replace("\n", " ").strip()
        if first:
            rows.append([f"`{path.relative_to(ROOT).as_posix()}`", first])
    return _table(["module", "what it holds (its docstring)"], rows)


def contract_section() -> str:
    return "```\n" + _module_doc(ROOT / "moe_fx" / "ops.py") + "\n```"


def options_section() -> str:
    from moe_fx.options import VALID_KEYS

    return _table(["option", "what it takes"], [[f"`{k}`", v] for k, v in VALID_KEYS.items()])


def forms_section() -> str:
    from tests.passes.test_match import FORMS

    rows = [
        [f"`{name}`", f"`moe_fx.examples.{cls.__name__}`", f"`{form}`", _first_line(cls)]
        for name, (cls, form) in FORMS.items()
    ]
    return _table(["test id", "example module", "form reported", "how the block is written"], rows)


def models_section() -> str:
    from moe_fx.hf_models import ARCHITECTURES

    rows = [
        [
            f"`{name}`",
            f"`{arch.config}` / `{arch.model}`",
            str(arch.moe_blocks),
            f"no: {arch.refused}" if arch.refused else "yes",
            arch.notes,
        ]
        for name, arch in ARCHITECTURES.items()
    ]
    return _table(["`--hf` name", "transformers config / model", "MoE blocks", "rewritten", "notes"], rows)


def _date(path: Path, meta: dict) -> str:
    """When the numbers were measured: meta["date"], a YYYYmmdd stamp in the file name, else the date of
    the commit that added the file (stable once committed)."""
    if meta.get("date"):
        return f"measured {meta['date']}"
    found = re.search(r"(\d{4})(\d{2})(\d{2})-\d{6}", path.name)
    if found:
        return "measured " + "-".join(found.groups())
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%as", "-1", "--", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"committed {added}" if added else "date not recorded"


def _us(us: float | None, floor: float) -> str:
    if us is None:
        return ""
    if math.isnan(us):
        return "fail"
    return f"{us:.0f}/{us / floor:.2f}"


def _layer_results(path: Path) -> dict | None:
    """A bench/layer.py result ({"meta", "rows"}), or None for the other files in bench/results."""
    data = json.loads(path.read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    return data if isinstance(rows, list) and rows and "floor_us" in rows[0] and "meta" in data else None


def results_section() -> str:
    found = [(p, d) for p in sorted(RESULTS.glob("*.json")) if (d := _layer_results(p)) is not None]
    if not found:
        return (
            "_No benchmark results are checked in yet._ Run `python bench/layer.py --out bench/results` on a GPU, "
            "commit the JSON file it writes, then `python docs/generate.py`."
        )
    parts = []
    for path, data in found:
        meta, rows = data["meta"], data["rows"]
        variants = meta["variants"]
        parts.append(
            f"### `bench/results/{path.name}`\n\n"
            f"{meta['device']}, {_date(path, meta)}; torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}; "
            f"run with `--tune`: {meta.get('tuned', False)}. µs / ratio to the floor; `fail`: could not run."
        )
        table = [
            [r["shape"], str(r["T"]), *(_us(r["us"].get(v), _floor(r, v)) for v in variants), f"{r['floor_us']:.0f}"]
            for r in rows
        ]
        parts.append(_table(["shape", "T", *variants, "floor"], table))
        graphed = [r for r in rows if r.get("graph_us")]
        if graphed:
            gvars = list(dict.fromkeys(v for r in graphed for v in r["graph_us"]))
            gtable = [
                [r["shape"], str(r["T"]), *(_us(r["graph_us"].get(v), _floor(r, v)) for v in gvars)]
                + [f"{r['floor_us']:.0f}"]
                for r in graphed
            ]
            parts.append("CUDA-graph replays:\n\n" + _table(["shape", "T", *gvars, "floor"], gtable))
        quantised = list(dict.fromkeys(v for r in rows for v in r.get("speedup_vs_bf16", {})))
        if quantised:
            qtable = [
                [r["shape"], str(r["T"])]
                + [f"{r['speedup_vs_bf16'][v]:.2f}× ({r['quant_floor_us'][v]:.0f})" for v in quantised]
                for r in rows
            ]
            parts.append(
                "Quantised variants: speedup over `moe_fx_triton` (bf16), CUDA-graph times where both have one, and "
                "(in parentheses) the variant's own floor in µs, at its one-byte weights and its matmul rate; the "
                "cells above divide by that floor:\n\n" + _table(["shape", "T", *quantised], qtable)
            )
    return "\n\n".join(parts)


# The issues' targets (#4: moe_fx bf16 over the floor, CUDA graphs at T=1; #5: fp8's speedup over bf16), per T
BF16_TARGET = {1: 1.5, 16: 1.15, 128: 1.15, 1024: 1.15, 8192: 1.3}
FP8_TARGET = {1: 1.7, 16: 1.7, 128: 1.7, 8192: 1.5}
PEERS = ("hf_eager", "hf_gmm", "hf_gmm_compiled", "sort_gmm")
STANDING_DEVICE = "H100"


def _rewrite_variants(meta: dict, shape: str, T: int, mode: str) -> list[str]:
    """The variants of a bench/layer.py file that time what the rewrite runs now (mode "triton" or "fp8"), most
    faithful first. Since 2026-12-07 layer.py's `moe_fx_<mode>` is that (meta "moe_fx_variants": "rewrite"); before
    it `moe_fx_<mode>_routed` (one routed_experts node) was, and `moe_fx_<mode>_reduce` (route, dispatch and
    experts summing the rows) too wherever that node runs those three ops: above the routing kernel's tokens, and
    at decode where the shipped H100 entry is not fused. Older files' `moe_fx_<mode>` ran a combine node."""
    if meta.get("moe_fx_variants") == "rewrite":
        return [f"moe_fx_{mode}"]
    from moe_fx.lowering.triton import decode

    reduce_runs = T > decode.MAX_TOKENS or not _fused_h100_entry(shape, T, mode)
    return [f"moe_fx_{mode}_routed"] + ([f"moe_fx_{mode}_reduce"] if reduce_runs else [])


@functools.cache
def _fused_h100_entry(shape: str, T: int, mode: str) -> bool:
    """Whether the H100 entry moe_fx ships for bench/layer.py's `shape` at T (mode "triton" or a quant mode) is
    fused: then routed_experts routes in its kernel at decode."""
    import torch

    from moe_fx.lowering.triton import tuning

    E, K, D, F = _bench_shapes()[shape]
    head, tail = tuning._key_ends(E, D, F, K, True, torch.bfloat16, T, "none" if mode == "triton" else mode)
    return tuning._read(tuning.PACKAGED).get(f"{head}NVIDIA_H100_80GB_HBM3{tail}", {}).get("fused", False)


@functools.cache
def _bench_shapes() -> dict[str, tuple[int, int, int, int]]:
    """bench/layer.py's SHAPES (name -> E, K, D, F), read from its source once (it imports triton)."""
    tree = ast.parse((ROOT / "bench" / "layer.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SHAPES")
    return ast.literal_eval(node.value)


def _added_times(folder: Path) -> dict[str, float]:
    """{file name: when git added it (seconds)} for the files under `folder`, from one `git log`. A renamed file
    counts as added under its new name (without `--no-renames` the log reads it as a rename, not an add)."""
    log = subprocess.run(["git", "log", "--no-renames", "--diff-filter=A", "--format=@%at", "--name-only", "--", "."],
                         cwd=folder, capture_output=True, text=True, check=False).stdout  # fmt: skip
    added, stamp = {}, 0.0
    for line in log.splitlines():
        if line.startswith("@"):
            stamp = float(line[1:])
        elif line:
            added.setdefault(Path(line).name, stamp)  # the log runs newest first: the first is the last add
    return added


def _best(row: dict, variant: str) -> float | None:
    """A variant's time in a row: its CUDA-graph replay where it has one, else the eager call's; None if not timed."""
    us = row.get("graph_us", {}).get(variant, row["us"].get(variant))
    return None if us is None or math.isnan(us) else us


def standing_cells(found: list[tuple[Path, dict]]) -> dict[tuple[str, int], dict]:
    """{(shape, T): the cell's latest numbers} over `found` (oldest first): moe_fx bf16's µs, floor and file, the
    fastest peer's µs and name (its latest timing), fp8's µs and its speedup over bf16 in the latest file that
    timed both."""
    cells: dict[tuple[str, int], dict] = {}
    for path, data in found:
        for row in data["rows"]:
            cell = cells.setdefault((row["shape"], row["T"]), {"peers": {}})
            T, meta = row["T"], data["meta"]
            bf16, fp8 = (next((us for v in _rewrite_variants(meta, row["shape"], T, mode) if (us := _best(row, v))),
                              None) for mode in ("triton", "fp8"))  # fmt: skip
            if bf16:
                cell.update(bf16=bf16, floor=row["floor_us"], bf16_file=path.name)
            if fp8:
                cell.update(fp8=fp8, fp8_file=path.name)
            if bf16 and fp8:
                cell.update(speedup=bf16 / fp8, speedup_file=path.name)
            cell["peers"].update({v: us for v in PEERS if (us := _best(row, v))})
    return cells


def standing_section() -> str:
    found = [(p, d) for p in RESULTS.glob("*.json")
             if (d := _layer_results(p)) is not None and STANDING_DEVICE in d["meta"]["device"]]  # fmt: skip
    added = _added_times(RESULTS)  # a file not yet committed is the newest run
    cells = standing_cells(sorted(found, key=lambda pd: (added.get(pd[0].name, math.inf), pd[0].name)))
    rows, files = [], {}

    def ref(name: str) -> str:  # the file's number in the list under the table
        return f"[{files.setdefault(name, len(files) + 1)}]"

    for shape in ("mixtral", "qwen3", "gptoss", "deepseek"):
        for T in sorted(BF16_TARGET):
            c = cells.get((shape, T), {"peers": {}})
            peer = min(c["peers"], key=c["peers"].get, default=None)
            cols = [shape, str(T)]
            if "bf16" in c:
                ratio = c["bf16"] / c["floor"]
                met = "met" if ratio <= BF16_TARGET[T] else "**missed**"
                cols += [f"{c['floor']:.0f}", f"{c['bf16']:.1f} {ref(c['bf16_file'])}", f"{ratio:.2f} ({met})"]
            else:
                cols += ["", "not measured", ""]
            if peer:
                faster = "faster" if "bf16" in c and c["bf16"] < c["peers"][peer] else "**not faster**"
                cols.append(f"{c['peers'][peer]:.0f} `{peer}` ({faster})")
            else:
                cols.append("not measured")
            cols.append(f"{c['fp8']:.1f} {ref(c['fp8_file'])}" if "fp8" in c else "not measured")
            if "speedup" in c:
                target = FP8_TARGET.get(T)
                met = "" if target is None else " (met)" if c["speedup"] >= target else " (**missed**)"
                cols.append(f"{c['speedup']:.2f}×{met} {ref(c['speedup_file'])}")
            else:
                cols.append("")
            rows.append(cols)
    head = ["shape", "T", "floor µs", "moe_fx bf16 µs", "/ floor (target)", "fastest peer µs", "moe_fx fp8 µs",
            "fp8 / bf16 (target)"]  # fmt: skip
    sources = "\n".join(f"- [{n}] `bench/results/{name}`" for name, n in files.items())
    return (
        f"The latest {STANDING_DEVICE} measurement of each cell (CUDA-graph replays where timed, T ≤ 1024), of what "
        "the rewrite runs now, from the `bench/layer.py` files below: cells of one row may come from different runs "
        "(numbered). A ratio divides by the floor of its own run (ceilings measured in that run); fp8 / bf16 is from "
        "the latest run that timed both. Targets: issue #4 (bf16 over the floor, and faster than every peer), issue "
        "#5 (fp8 over bf16).\n\n" + _table(head, rows) + "\n\n" + sources
    )


def _floor(row: dict, variant: str) -> float:
    """A variant's floor: its own for a quantised variant (one-byte weights), else the bf16 floor."""
    return row.get("quant_floor_us", {}).get(variant, row["floor_us"])


def quant_notes_section() -> str:
    """The quantised-lowering section of bench/NOTES.md (measured table, targets, predicted vs measured)."""
    notes = (ROOT / "bench" / "NOTES.md").read_text()
    start = notes.index(QUANT_NOTES_HEADING)
    end = notes.find("\n## ", start + len(QUANT_NOTES_HEADING))
    body = notes[start + len(QUANT_NOTES_HEADING) : None if end < 0 else end].strip()
    title = QUANT_NOTES_HEADING.removeprefix("## ")
    return f"From `bench/NOTES.md`, section *{title}* (paths relative to bench/):\n\n{body}"


QUANT_NOTES_HEADING = "## Quantised: fp8, fp8_block, int8 (issue #5)"


def ep_section() -> str:
    """The latest NCCL run of bench/ep.py (bench/results/*-ep.json)."""
    runs = sorted(RESULTS.glob("*-ep.json"))
    if not runs:
        return "_Not yet measured._ Run `torchrun --nproc-per-node 2 bench/ep.py --json bench/results/<gpu>-ep.json`."
    path = runs[-1]
    data = json.loads(path.read_text())
    meta = data["meta"]
    head = (
        f"### `bench/results/{path.name}`\n\n{meta['world']}× {meta['device']}, {meta['backend']}, "
        f"torch {meta['torch']}, {meta['dtype']}, median of {meta['reps']} after a barrier, slowest rank. "
        "T: tokens per rank; bytes: sent by "
        "one rank in dispatch + combine; vs a2a: dispatch+combine time over one plain `all_to_all_single` of the "
        "same bytes (target ≤ 1.2)."
    )
    cols = ["shape", "layout", "quant", "T", "disp+comb µs", "bytes", "GB/s", "a2a µs", "vs a2a", "layer µs"]
    table = [
        [r["shape"], r["layout"], r["quant"], str(r["T"]), f"{r['dispatch_combine_us']:.0f}", str(r["bytes"]),
         f"{r['GBps']:.2f}", f"{r['plain_a2a_us']:.0f}", f"{r['vs_a2a']:.2f}", f"{r['layer_us']:.0f}"]
        for r in data["rows"]
    ]  # fmt: skip
    return head + "\n\n" + _table(cols, table)


def hf_models_section() -> str:
    """The latest GPU run of bench/hf_models.py (a --tiny run is a check, not a measurement)."""
    runs = [p for p in sorted(RESULTS.glob("hf_models-*.json")) if not json.loads(p.read_text())["meta"]["tiny"]]
    if not runs:
        return (
            "_Not yet measured._ Run `python bench/hf_models.py --out bench/results` on a GPU, commit the JSON file "
            "it writes, then `python docs/generate.py`."
        )
    path = runs[-1]
    data = json.loads(path.read_text())
    meta, rows, variants = data["meta"], data["rows"], data["meta"]["variants"]

    def cell(row, v, key):
        us = row[key].get(v)
        if us is None:
            return ""
        return "fail" if math.isnan(us) else f"{us:.0f}"

    def graph_cell(row, v):
        if row["graph_us"].get(v):
            return f" ({cell(row, v, 'graph_us')})"
        return " (fail)" if v in row.get("graph_failed", {}) else ""

    head = (
        f"### `bench/results/{path.name}`\n\n{meta['device']}, {_date(path, meta)}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}; {meta['layers']} decoder layer, bf16. µs per forward (median); "
        "CUDA-graph replays in parentheses; `fail`: could not run. rel err: moe_fx's logits vs `hf_eager`'s."
    )
    table = [
        [
            r["model"],
            str(r["T"]),
            *(cell(r, v, "us") + graph_cell(r, v) for v in variants),
            str(r.get("rewritten", "")),
            f"{r['err']['moe_fx']:.1e}" if "moe_fx" in r["err"] else "",
        ]
        for r in rows
    ]
    return head + "\n\n" + _table(["model", "T", *variants, "blocks rewritten", "rel err"], table)


def transformers4_section() -> str:
    from moe_fx.hf_models import ARCHITECTURES, TRANSFORMERS_4

    rows = []
    for name in TRANSFORMERS_4:
        arch = ARCHITECTURES[name]
        reason = arch.refused
        rewritten = f"by `apply` only: {arch.apply_only_4x}" if arch.apply_only_4x else "yes"
        rows.append([f"`{name}`", f"`{arch.model}`", f"no: {reason}" if reason else rewritten])
    return _table(["`--hf` name", "model", "rewritten on transformers 4.57"], rows)


def images() -> list[Path]:
    """Redraw docs/img: block 1 of the demo model before/after (graphviz) and the HTML report (chromium)."""
    import torch
    import torch.nn as nn

    import moe_fx
    from moe_fx import examples

    class DemoWithSampler(nn.Module):
        """The demo model and a top-k sampling head: a near-miss moe_fx must leave alone."""

        def __init__(self):
            super().__init__()
            self.body, self.lm_head = examples.TwoFormModel(), nn.Linear(64, 50)

        def forward(self, x):
            h = self.body(x)
            probs, ids = self.lm_head(h).softmax(dim=-1).topk(5, dim=-1)
            return h, probs, ids

    torch.manual_seed(0)
    report = moe_fx.explain(DemoWithSampler().eval(), torch.randn(2, 8, 64))
    img = DOCS / "img"
    written = [report.draw(which, block=1).save(img / f"block_{which}.png") for which in ("before", "after")]
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no chromium: docs/img/report.png not redrawn", file=sys.stderr)
        return written
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(f"<html><body style='font-family:sans-serif;margin:12px'>{report._repr_html_()}</body></html>")
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars"]
        shot = img / "report.png"
        cmd = [browser, *flags, f"--screenshot={shot}", "--window-size=1100,270", page.as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        written.append(shot)
    return written


SECTIONS = {
    "architecture.md": {"codemap": codemap_section, "contract": contract_section},
    "user_guide.md": {
        "options": options_section,
        "forms": forms_section,
        "models": models_section,
        "transformers4": transformers4_section,
    },
    "performance.md": {
        "standing": standing_section,
        "results": results_section,
        "quant_notes": quant_notes_section,
        "hf_models": hf_models_section,
        "ep": ep_section,
    },  # fmt: skip
}


def render(text: str, sections: dict) -> str:
    """`text` with every generated section replaced by its fresh content."""
    for name, make in sections.items():
        begin, end = f"<!-- generated:{name} -->", f"<!-- end generated:{name} -->"
        if begin not in text or end not in text:
            raise ValueError(f"moe_fx docs: the markers {begin} ... {end} are missing")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{make()}\n{end}{tail}"
    return text


def stale() -> list[str]:
    """The docs whose generated sections differ from what the code and tests say now."""
    return [name for name, sections in SECTIONS.items() if _read(name) != render(_read(name), sections)]


def _read(name: str) -> str:
    return (DOCS / name).read_text()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="regenerate the generated sections of docs/*.md")
    parser.add_argument("--check", action="store_true", help="only report stale docs (exit 1 if any)")
    parser.add_argument("--images", action="store_true", help="also redraw docs/img (needs dot and chromium)")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        for name in names:
            print(f"docs/{name} is stale: run python docs/generate.py", file=sys.stderr)
        return 1 if names else 0
    for name, sections in SECTIONS.items():
        (DOCS / name).write_text(render(_read(name), sections))
    for path in images() if args.images else ():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
