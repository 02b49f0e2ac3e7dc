"""Zeroed scratch memory that outlives a call: the kernel that uses it leaves it zero again.

A kernel that adds into fp32 sums, or counts its programs done, needs zeros first. Allocating them per call
costs a fill kernel before it (~1 µs at decode, where the whole layer is ~40). `zeroed(numel, device)`
instead hands out the first numel int32 words of a buffer that was zeroed once, on the promise that the
kernel's last program writes zeros back over what it used (`grouped_gemm._cast_when_last`).

One buffer per (device, stream): kernels on one stream run one after another, so a buffer is never used by
two at once. Two streams get two buffers. A CUDA graph keeps the buffer of the stream it was captured on
and replays on whatever stream it is given: graphs that share a capture stream and are replayed at the same
time on two streams would share one buffer (never done by `torch.compile`, whose graphs replay in order).

The buffer is allocated from a side stream, so that a CUDA-graph memory pool bound to the caller's stream
(`torch.compile(mode="reduce-overhead")` warms up inside one) never holds it; under stream capture nothing
is allocated and the caller takes per-call zeros (`None`). A buffer outgrown is kept: graphs captured
before still point at it.
"""

from __future__ import annotations

import threading

import torch

_LOCK = threading.Lock()
_BUFFERS: dict[tuple, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []
MIN_WORDS = 1 << 14  # 64 KB: a decode step of up to 8 tokens × 2048 wide in one buffer


def _key(device: torch.device) -> tuple:
    if device.type == "cuda":  # the raw stream handle, as Inductor's generated code reads it (no Stream object)
        index = torch.cuda.current_device() if device.index is None else device.index
        return device.type, index, torch._C._cuda_getCurrentRawStream(index)
    return device.type, device.index, threading.get_ident()  # the interpreter: one buffer per thread


def zeroed(numel: int, device: torch.device) -> torch.Tensor | None:
    """numel int32 zeros that the caller's kernel must leave zero, or None under CUDA stream capture before
    this stream has a buffer large enough (then allocate zeros for the call)."""
    key = _key(device)
    with _LOCK:
        buf = _BUFFERS.get(key)
        if buf is not None and buf.numel() >= numel:
            return buf[:numel]
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        words = max(MIN_WORDS, 2 * numel)
        if device.type == "cuda":
            caller, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
            with torch.cuda.stream(side):
                fresh = torch.zeros((words,), dtype=torch.int32, device=device)
            caller.wait_stream(side)
        else:
            fresh = torch.zeros((words,), dtype=torch.int32, device=device)
        if buf is not None:
            _OUTGROWN.append(buf)
        _BUFFERS[key] = fresh
        return fresh[:numel]
