"""GPU timing for tuning and the benchmarks: the median time of a call (a CUDA-graph replay at decode), the L2
emptied before each repetition.

How the L2 is emptied matters at decode. `triton.testing.do_bench` writes zeros over a 256 MB buffer: the L2
is then full of dirty lines, and the timed call, streaming its weights in, writes them back first: 8-10 µs of
every timed call on an H100, at every shape and T (`bench/flush.py`), a sixth of a Qwen3 layer at T=1. Real
layers follow layers that read far more than they write (weights, the KV cache), so the default here empties
the L2 by reading a buffer larger than it, which leaves clean lines (timed the same as leaving the L2 as the
last call left it, to 1 µs: the benchmark shapes' weights do not fit in it). "write" reproduces `do_bench`'s
emptying, "none" leaves the L2 as the last call left it.
"""

from __future__ import annotations

import functools
import statistics

import torch

FLUSHES = ("read", "write", "none")


@functools.cache
def _flush_buffer(device: int) -> torch.Tensor:
    """A buffer of 4x the L2 (at least 256 MB), one per device."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return torch.ones(max(4 * l2, 256 << 20) // 4, dtype=torch.float32, device=torch.device("cuda", device))


def empty_l2(flush: str = "read") -> None:
    """Empty the current device's L2 of what the last call left, by reading ("read") or writing ("write") a
    buffer larger than it; "none" does nothing."""
    if flush not in FLUSHES:
        raise ValueError(f"moe_fx: flush must be one of {FLUSHES}, got {flush!r}")
    if flush == "none":
        return
    buffer = _flush_buffer(torch.cuda.current_device())
    if flush == "read":
        buffer.sum()
    else:
        buffer.fill_(1.0)


def median_us(fn, flush: str = "read", warmup_ms: float = 10.0, rep_ms: float = 60.0) -> float:
    """Median µs of fn() over about rep_ms of repetitions (at least 5) after about warmup_ms of warm-up, each
    repetition timed by CUDA events around fn alone, after `empty_l2(flush)`."""
    empty_l2(flush)
    fn()
    torch.cuda.synchronize()
    probe = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    probe[0].record()
    for _ in range(5):
        empty_l2(flush)
        fn()
    probe[1].record()
    torch.cuda.synchronize()
    estimate_ms = max(probe[0].elapsed_time(probe[1]) / 5, 1e-3)  # flush included: an upper bound on fn's time
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    reps = max(5, int(rep_ms / estimate_ms))
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
    for start, end in events:
        empty_l2(flush)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) * 1e3


def graph_replay(fn):
    """`fn` run once (compiling what it launches), then captured in a CUDA graph: the graph's replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
