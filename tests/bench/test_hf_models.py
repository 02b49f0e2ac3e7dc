"""bench/hf_models.py at tiny sizes on the CPU: every model builds, the run writes its JSON, moe_fx rewrites the
block and its logits match HF eager's."""

import json
from pathlib import Path

import pytest

from tests.bench.scripts import load

pytest.importorskip("transformers")


def test_every_model_builds_tiny():
    bench = load("hf_models")
    for name in bench.MODELS:
        model = bench.build(name, tiny=True, device="cpu")
        assert model.config.num_hidden_layers == 1
        assert model.config._experts_implementation == "grouped_mm"


def test_tiny_run_writes_the_table(tmp_path):
    bench = load("hf_models")
    argv = ["--tiny", "--models", "mixtral", "--variants", "hf_eager", "hf_gmm", "moe_fx", "--inner", "eager"]
    result = bench.main([*argv, "--out", str(tmp_path)])
    written = json.loads(Path(result["path"]).read_text())
    assert written["meta"]["tiny"] and written["meta"]["variants"] == ["hf_eager", "hf_gmm", "moe_fx"]
    assert [r["T"] for r in written["rows"]] == [7, 1]
    for row in written["rows"]:
        assert "failed" not in row, row
        assert row["rewritten"] == 1
        assert row["err"]["moe_fx"] < 1e-5 and row["err"]["hf_gmm"] < 1e-5
        assert all(us > 0 for us in row["us"].values())
