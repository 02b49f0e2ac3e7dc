"""Triton lowering tests run on CUDA when there is one, else on CPU tensors under the interpreter."""

from dataclasses import replace

import pytest
import torch

from moe_fx.lowering import triton as triton_lowering
from moe_fx.lowering.triton import grouped_gemm, tuning

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's tl.dot is wrong on bf16 (it is tested on the GPU); fp32 on the GPU runs IEEE dots.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def _poisoned(poison_outputs, monkeypatch):
    """Every Triton test runs with NaN-poisoned outputs (tests/conftest.py). The poison is deterministic mode's
    fill, and in that mode the experts op sums a token's rows in order in place of the atomics these tests check
    (`sums_in_order`); tests/passes/test_rewrite.py tests that path."""
    monkeypatch.setattr(triton_lowering, "sums_in_order", lambda: False)


PATH_FIELDS = {"tma": "tma", "swap": "swap_ab", "persistent": "persistent"}  # a GEMM path -> its GemmConfig field


@pytest.fixture(params=["pointers", "tma", "swap", "persistent"])
def gemm_path(request, monkeypatch):
    """Runs a test four times: the GEMMs' operands loaded through pointers, through TMA descriptors (every
    chosen config with tma=True), with the dots' operands swapped (swap_ab=True), then with persistent
    programs (persistent=True: in the interpreter 3 programs, each taking every third tile); a run fails
    unless at least one GEMM it launched took its path (and, for "pointers", none took another)."""
    path = request.param
    fields = {f: False for f in PATH_FIELDS.values()} if path == "pointers" else {PATH_FIELDS[path]: True}
    choose = tuning._choose.__wrapped__

    def on_path(*args):  # "pointers" turns off what a default or tuned config may turn on (swapped decode tiles)
        c = choose(*args)
        return tuning.ExpertsConfig(*(replace(g, **fields) for g in (c.up, c.down)))

    monkeypatch.setattr(tuning, "_choose", on_path)
    before = grouped_gemm.loads.copy()
    yield path
    launched = grouped_gemm.loads - before
    took = [set(key.split("/")[1].split("+")) for key in launched.elements()]
    if took:  # a test skipped before its first GEMM launched nothing
        if path == "pointers":
            assert all(t == {"pointers"} for t in took), f"{path}: launches {dict(launched)}"
        else:
            assert any(path in t for t in took), f"{path}: launches {dict(launched)}"
