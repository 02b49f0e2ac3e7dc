"""The bench scripts as modules, for the tests of tests/bench."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def load(name: str):
    """bench/<name>.py as a module, with bench/ on sys.path while it loads (its sibling imports, as when it runs
    as a script)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def run_compiled(*args: str, timeout: int = 300) -> str:
    """stdout of `python *args` at the repository root with Triton compiling its kernels (the tests' own are
    interpreted: TRITON_INTERPRET is dropped), asserting it exits 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
