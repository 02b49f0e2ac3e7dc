"""bench/merge_tuned.py: a GPU run's tuning cache merged into the shipped entries (replaced or added, filtered
by key, malformed entries refused)."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from moe_fx.lowering.triton import tuning

ROOT = Path(__file__).resolve().parents[2]


def entry(block_n: int, us: float, swap: bool = False) -> dict:
    c = tuning.GemmConfig(16, block_n, 128, 8, 4, 3, swap_ab=swap)
    return {"up": asdict(c), "down": asdict(c), "us": {"best": us}, "capability": [9, 0]}


def run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "merge_tuned.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_replaces_and_adds_only_matching_keys(tmp_path):
    shipped = {"E8-fp8-H200-T1": entry(64, 120.0), "E8-H200-T1": entry(128, 180.0)}
    cache = {"E8-fp8-H200-T1": entry(64, 110.0, swap=True), "E8-fp8-H200-T16": entry(32, 300.0),
             "E8-H200-T16": entry(128, 500.0)}  # fmt: skip
    into, src = tmp_path / "tuned.json", tmp_path / "cache.json"
    into.write_text(json.dumps(shipped))
    src.write_text(json.dumps(cache))
    out = run(str(src), "--into", str(into), "--match", "fp8")
    assert out.returncode == 0, out.stderr
    merged = json.loads(into.read_text())
    assert merged["E8-fp8-H200-T1"] == cache["E8-fp8-H200-T1"] and merged["E8-fp8-H200-T16"] == cache["E8-fp8-H200-T16"]
    assert merged["E8-H200-T1"] == shipped["E8-H200-T1"] and "E8-H200-T16" not in merged  # not matched
    assert (
        "replace E8-fp8-H200-T1: 120.0 µs" in out.stdout
        and "swap" in out.stdout
        and "add E8-fp8-H200-T16" in out.stdout
    )


@pytest.mark.parametrize("dry_run", [True, False])
def test_dry_run_writes_nothing_and_a_malformed_entry_is_refused(tmp_path, dry_run):
    into, src = tmp_path / "tuned.json", tmp_path / "cache.json"
    into.write_text(json.dumps({}))
    src.write_text(json.dumps({"E8-H200-T1": entry(64, 90.0)}))
    out = run(str(src), "--into", str(into), *["--dry-run"] * dry_run)
    assert out.returncode == 0 and json.loads(into.read_text()) == ({} if dry_run else {"E8-H200-T1": entry(64, 90.0)})
    src.write_text(json.dumps({"E8-H200-T2": {"up": {}}}))
    bad = run(str(src), "--into", str(into))
    assert bad.returncode != 0 and "moe_fx: tuning cache entry 'E8-H200-T2' lacks" in bad.stderr
