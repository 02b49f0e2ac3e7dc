"""bench/stream_ceiling.py: its streaming kernel on every load path against a float64 reference (interpreted on
the CPU; the timing needs a GPU and is not run here)."""

import pytest
import torch

from tests.bench.scripts import load
from tests.conftest import TOLERANCE, rel_err
from tests.lowering.triton.conftest import DEVICE


def reference(w_RC, x_16K, programs, path, BN):
    """float64: each program's stripe of its row chunk, x times the sum of its TMA loads, then (tma+pointers) the
    first half of that product's columns, cast as the kernel casts it, times each 64-row block of the rest."""
    R, C = w_RC.shape
    stripes, BK = C // BN, x_16K.shape[1]
    rows = R // (programs // stripes)
    out = torch.empty(programs, 16, BN, dtype=torch.float64)
    for p in range(programs):
        w = w_RC[(p // stripes) * rows : (p // stripes + 1) * rows, (p % stripes) * BN : (p % stripes + 1) * BN]
        w = w.double()
        split = {"tma": rows, "pointers": rows, "tma+pointers": rows // 2}[path]
        acc = x_16K.double() @ w[:split].reshape(-1, BK, BN).sum(0)
        if split < rows:
            h = acc[:, : BN // 2].to(w_RC.dtype).double()
            acc = acc + h @ w[split:].reshape(-1, BN // 2, BN).sum(0)
        out[p] = acc
    return out


@pytest.mark.parametrize("path", ["tma", "pointers", "tma+pointers"])
def test_streaming_kernel_against_float64(path):
    bench = load("stream_ceiling")
    dtype = torch.float16  # the interpreter's bf16 dots are wrong
    w = torch.randn(256, bench.COLS, dtype=dtype, device=DEVICE)
    x = torch.randn(16, 64, dtype=dtype, device=DEVICE)
    out = torch.full((32, 16, bench.BN), float("nan"), device=DEVICE)
    bench.stream(w, x, 32, path, 2, out=out)
    assert rel_err(out.cpu(), reference(w.cpu(), x.cpu(), 32, path, bench.BN)) < TOLERANCE[dtype]


def test_a_split_into_partial_loads_is_refused():
    bench = load("stream_ceiling")
    w, x = torch.randn(200, bench.COLS, dtype=torch.float16), torch.randn(16, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="moe_fx: 32 programs split 200 rows"):
        bench.stream(w, x, 32, "tma", 2)


def test_each_shape_streams_about_its_experts_bytes_at_96_and_192_programs():
    bench = load("stream_ceiling")
    assert bench.rows_for("qwen3") * bench.COLS * 2 == 8 * 3 * 2048 * 768 * 2  # 75.5 MB, whole loads already
    for shape, (_, K, D, F) in bench.SHAPES.items():
        rows = bench.rows_for(shape)
        assert 0.9 < rows * bench.COLS / (3 * K * D * F) <= 1, shape
        assert all(bench.splits(rows, p, BK) for p in (96, 192) for BK in (64, 128)), shape
        # a one-byte step's bytes, in whole steps of 6144 rows (25 MB): GPT-OSS's 99.5 MB stream as 88.1
        assert 0.85 < bench.rows_for(shape, weight_bytes=1) * bench.COLS * 2 / (3 * K * D * F) <= 1, shape
    assert not bench.splits(18432, 256, 128) and not bench.splits(18432, 100, 64)
