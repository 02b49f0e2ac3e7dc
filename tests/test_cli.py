"""`python -m moe_fx inspect`, run as a user would (a subprocess), and its errors."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_fx
from moe_fx import hf_models
from moe_fx.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "moe_fx", *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=300
    )


def test_inspect_hf_model_with_html_pictures_and_torch_logs(tmp_path):
    pytest.importorskip("transformers")
    done = run_cli(
        "inspect", "--hf", "mixtral", "--html", "report.html", "--draw", "pictures", cwd=tmp_path, TORCH_LOGS="+moe_fx"
    )
    assert done.stdout.startswith("moe_fx: 2 MoE block(s) matched, 0 rejected"), done.stdout + done.stderr
    assert re.search(r"^  0  model\.layers\.0\.mlp\s+hf_grouped_mm\s+softmax→top2→renorm", done.stdout, re.M)
    # TORCH_LOGS="+moe_fx" turns on the moe_fx logger at debug level: every lowering choice is logged
    assert "moe_fx: model.layers.1.mlp experts -> reference (highest priority" in done.stderr
    html = (tmp_path / "report.html").read_text()
    assert "model.layers.1.mlp" in html and "<table>" in html
    if shutil.which("dot") is None:
        assert done.returncode == 2 and "moe_fx: drawing a graph needs graphviz" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    svgs = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert svgs == ["block0_after.svg", "block0_before.svg", "block1_after.svg", "block1_before.svg"]
    assert "moe_fx::experts" in (tmp_path / "pictures" / "block1_after.svg").read_text()


def test_inspect_module_factory_apply_and_print_graph(capsys):
    main(["inspect", "--module", "moe_fx.examples:LoopMoE", "--shape", "6,32", "--print-graph"])  # in-process: faster
    out = capsys.readouterr().out
    assert "1 MoE block(s) matched" in out and "expert_loop" in out
    err = float(re.search(r"\|moe_fx - eager\| / \|eager\| = (\S+)", out).group(1))
    assert err < 1e-5
    assert "Annotation: {'moe_fx': 'experts [reference]', 'spec': 'E=4 F=48 silu_gated'}" in out


def test_hf_names_come_from_the_architecture_table(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--hf", "no_such_model"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no_such_model'" in err
    assert all(name in err for name in hf_models.ARCHITECTURES), err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--module", "moe_fx.examples"], "moe_fx: --module 'moe_fx.examples' must look like pkg.mod:factory"),
        (["--module", "moe_fx.examples:NoSuch"], "moe_fx: module 'moe_fx.examples' has no attribute 'NoSuch'"),
        (["--module", "moe_fx.examples:LoopMoE"], "moe_fx: LoopMoE needs example inputs"),
        (["--module", "moe_fx.examples:LoopMoE", "--shape", "4x32"], "moe_fx: --shape '4x32' must be comma-separated"),
    ],
    ids=["no_factory", "missing_attribute", "no_inputs", "bad_shape"],
)
def test_inspect_errors_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's error; tests/test_cuda.py tunes on a GPU")
def test_tune_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--hf", "mixtral", "--tokens", "1", "16"])
    assert exit_.value.code == 2
    assert "moe_fx: tune times the Triton GEMMs on a CUDA GPU" in capsys.readouterr().err


def test_tune_prints_each_best_config_and_the_wrong_ones_it_skipped(capsys, monkeypatch, tmp_path):
    """The tune command prints each cache key's best, and each candidate `tune` refused as wrong on this GPU."""
    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "cache.json"))
    result = {"best": 12.5, "config": {"up": "u", "down": "d"}, "failed": {
        "up 16x32x128 w4 s4 | down 16x64x128 w4 s4": "wrong output: a row's rel err 0.9 (at most 0.06)",
        "up 128x256x64 w8 s4 | down 128x256x64 w8 s3": "OutOfResources: out of resource: shared memory"},
        "wrong": ["up 16x32x128 w4 s4 | down 16x64x128 w4 s4"]}  # fmt: skip
    monkeypatch.setattr(moe_fx, "tune", lambda *a, **kw: {"E8-D64-key-T1": result})
    main(["tune", "--module", "moe_fx.examples:LoopMoE", "--tokens", "1"])
    out = capsys.readouterr().out
    assert "E8-D64-key-T1: 12.5 µs" in out
    assert "skipped up 16x32x128 w4 s4 | down 16x64x128 w4 s4: wrong output: a row's rel err 0.9" in out
    assert "OutOfResources" not in out
