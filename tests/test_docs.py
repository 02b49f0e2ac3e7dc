"""The docs stay true: generated sections fresh, the architecture page's code runs, the notebook executes."""

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOK = DOCS / "examples" / "inspect_moe.ipynb"


def _generate():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_sections_are_fresh():
    assert _generate().stale() == [], "generated docs are stale: run python docs/generate.py and commit"


def test_generated_sections_name_every_tested_model_and_form():
    from moe_fx.hf_models import ARCHITECTURES
    from tests.passes.test_match import FORMS

    guide = (DOCS / "user_guide.md").read_text()
    for name in [*ARCHITECTURES, *FORMS]:
        assert f"| `{name}` |" in guide, name


def test_results_section_renders_bench_json(tmp_path, monkeypatch):
    generate = _generate()
    row = {"shape": "mixtral", "T": 16, "floor_us": 500.0, "hit_experts": 8, "err": {}}
    rows = [
        {**row, "us": {"hf_gmm": 1000.0, "moe_fx_triton": 600.0}, "graph_us": {"moe_fx_triton": 550.0}},
        {**row, "T": 1024, "us": {"hf_gmm": 2000.0, "moe_fx_triton": float("nan")}, "graph_us": {}},
    ]
    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "tuned": False}
    meta["variants"] = ["hf_gmm", "moe_fx_triton"]
    (tmp_path / "layer-20261123-170102.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    (tmp_path / "tuning.json").write_text(json.dumps({"E8-D64": {"up": {"block_m": 64}}}))  # not a layer result
    monkeypatch.setattr(generate, "RESULTS", tmp_path)
    text = generate.results_section()
    assert "NVIDIA H100 80GB HBM3, measured 2026-11-23; torch 2.11.0" in text and "tuning.json" not in text
    assert "| shape | T | hf_gmm | moe_fx_triton | floor |" in text
    assert "| mixtral | 16 | 1000/2.00 | 600/1.20 | 500 |" in text
    assert "| mixtral | 1024 | 2000/4.00 | fail | 500 |" in text
    assert "CUDA-graph replays:" in text and "| mixtral | 16 | 550/1.10 | 500 |" in text


def test_standing_takes_each_cells_latest_timing_of_what_the_rewrite_runs(tmp_path, monkeypatch):
    """performance.md's standing table: per cell the latest timing of the variants that run what the rewrite does
    (a file of layer.py's "rewrite" variants: moe_fx_<mode>; an older file: _routed, and _reduce wherever the
    routed node runs the three ops: not at Qwen3 T=1, whose H100 entry is fused), the fastest peer, and fp8 over
    bf16 from the latest file that timed both; another device's files are left out."""
    generate = _generate()
    monkeypatch.setattr(generate, "RESULTS", tmp_path)
    meta = {"device": "NVIDIA H100 80GB HBM3", "variants": []}

    def row(shape, T, us, graph_us=None):
        return {"shape": shape, "T": T, "floor_us": 100.0, "us": us, "graph_us": graph_us or {}, "err": {}}

    old = [  # the combine-node moe_fx_triton of an older file is not the rewrite's
        row("mixtral", 16, {"moe_fx_triton": 90.0, "moe_fx_triton_reduce": 130.0, "moe_fx_fp8_reduce": 65.0,
                            "hf_gmm": 300.0, "hf_gmm_compiled": 200.0}),
        row("mixtral", 1, {"moe_fx_triton_reduce": 120.0}),  # Mixtral's T=1 entry is not fused: the chain runs
        row("qwen3", 1, {"moe_fx_triton_reduce": 60.0}),  # Qwen3's is: the routed kernel runs, not timed here
        row("qwen3", 8192, {"moe_fx_triton_routed": 170.0, "moe_fx_fp8_reduce": 100.0}),
    ]  # fmt: skip
    new = [row("mixtral", 16, {"moe_fx_triton": 150.0}, {"moe_fx_triton": 110.0, "sort_gmm": 180.0})]
    (tmp_path / "a-older.json").write_text(json.dumps({"meta": meta, "rows": old}))
    (tmp_path / "b-newer.json").write_text(json.dumps({"meta": {**meta, "moe_fx_variants": "rewrite"}, "rows": new}))
    h200 = {"meta": {**meta, "device": "NVIDIA H200"}, "rows": [row("mixtral", 16, {"moe_fx_triton_reduce": 1.0})]}
    (tmp_path / "c-h200.json").write_text(json.dumps(h200))
    found = [(p, generate._layer_results(p)) for p in sorted(tmp_path.glob("[ab]-*.json"))]
    cells = generate.standing_cells(found)
    mixtral16 = cells[("mixtral", 16)]
    assert (mixtral16["bf16"], mixtral16["bf16_file"], mixtral16["fp8"]) == (110.0, "b-newer.json", 65.0)
    assert mixtral16["speedup"] == 2.0 and mixtral16["speedup_file"] == "a-older.json"  # 130 / 65
    assert mixtral16["peers"] == {"hf_gmm": 300.0, "hf_gmm_compiled": 200.0, "sort_gmm": 180.0}
    assert cells[("mixtral", 1)]["bf16"] == 120.0 and "bf16" not in cells[("qwen3", 1)]
    assert cells[("qwen3", 8192)]["speedup"] == 1.7
    text = generate.standing_section()
    mixtral16_row = (
        "| mixtral | 16 | 100 | 110.0 [2] | 1.10 (met) | 180 `sort_gmm` (faster) | 65.0 [1] | 2.00× (met) [1] |"
    )
    assert mixtral16_row in text
    assert "| qwen3 | 8192 | 100 | 170.0 [1] | 1.70 (**missed**) |" in text and "1.70× (met) [1]" in text
    assert "| qwen3 | 1 |  | not measured |  | not measured | not measured |  |" in text
    assert "[1] `bench/results/a-older.json`" in text and "c-h200.json" not in text


def test_added_times_count_a_renamed_file_as_added_under_its_new_name(tmp_path):
    """A renamed result file gets its rename's time: missing, it would sort as the newest (not yet committed) run
    and its timings would stand in the table over later files' (as a renamed 2026-12-05 decode file's did)."""
    import subprocess

    def git(*args, when="2026-12-01T00:00:00"):
        env = {"GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when, "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, env=env,
                       check=True, capture_output=True)  # fmt: skip

    git("init", "-q")
    (tmp_path / "layer-old.json").write_text('{"rows": [1, 2, 3, 4, 5, 6, 7, 8]}')
    git("add", ".")
    git("commit", "-qm", "a")
    git("mv", "layer-old.json", "h100-layer-kept.json")
    (tmp_path / "h100-layer-later.json").write_text("{}")
    git("add", ".")
    git("commit", "-qm", "b", when="2026-12-02T00:00:00")
    added = _generate()._added_times(tmp_path)
    assert set(added) == {"layer-old.json", "h100-layer-kept.json", "h100-layer-later.json"}
    assert added["h100-layer-kept.json"] == added["h100-layer-later.json"] > added["layer-old.json"]


def test_hf_models_section_renders_the_latest_gpu_run(tmp_path, monkeypatch):
    generate = _generate()
    monkeypatch.setattr(generate, "RESULTS", tmp_path)
    assert "_Not yet measured._" in generate.hf_models_section()
    meta = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23", "torch": "2.11.0", "transformers": "5.17.0"}
    meta |= {"variants": ["hf_gmm", "moe_fx"], "layers": 1, "tiny": False}
    row = {"model": "mixtral", "T": 2048, "us": {"hf_gmm": 900.0, "moe_fx": float("nan")}, "graph_us": {}}
    rows = [
        {**row, "rewritten": 1, "err": {"moe_fx": 1.5e-3}},
        {**row, "T": 1, "us": {"hf_gmm": 90.0, "moe_fx": 40.0}, "graph_us": {"moe_fx": 30.0}, "err": {}},
    ]
    (tmp_path / "hf_models-20261123-170102.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    tiny = {"meta": {**meta, "tiny": True, "device": "cpu"}, "rows": rows}
    (tmp_path / "hf_models-20261124-000000.json").write_text(json.dumps(tiny))  # a check, never shown
    text = generate.hf_models_section()
    assert "NVIDIA H100 80GB HBM3, measured 2026-11-23; torch 2.11.0, transformers 5.17.0" in text
    assert "| model | T | hf_gmm | moe_fx | blocks rewritten | rel err |" in text
    assert "| mixtral | 2048 | 900 | fail | 1 | 1.5e-03 |" in text
    assert "| mixtral | 1 | 90 | 40 (30) |  |  |" in text


def test_architecture_lowering_example_runs():
    from moe_fx.lowering.registry import candidates, unregister_lowering

    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "architecture.md").read_text(), re.S)
    assert len(blocks) == 3
    try:
        exec(compile("\n".join(blocks), "docs/architecture.md", "exec"), {"__name__": "docs_example"})
    finally:
        unregister_lowering("experts", device="cpu", name="gathered_bmm")
    assert "gathered_bmm" not in [e.name for e in candidates("experts", "cpu", "single")]


def test_docs_pictures_exist():
    for page in DOCS.glob("*.md"):
        for ref in re.findall(r"\]\((img/[^)]+)\)", page.read_text()):
            path = DOCS / ref
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{page.name} shows {ref}, not a PNG file"


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_executes_on_cpu():
    import nbclient
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(html) == 2 and "expert_loop" in html[0] and "hf_grouped_mm" in html[1]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    errors = [float(e) for e in re.findall(r"‖moe_fx − eager‖ / ‖eager‖.* = (\S+)", text)]
    assert len(errors) == 2 and max(errors) < 1e-5, text
    assert "Annotation: {'moe_fx': 'experts [" in text
    pictures = [o for o in outputs if "image/svg+xml" in o.get("data", {})]
    assert len(pictures) == 2 or "graphviz's `dot` is not installed" in text
