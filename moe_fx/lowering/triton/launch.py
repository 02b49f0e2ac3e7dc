"""Launch a Triton kernel with a short host path: `launch(kernel, grid, *args, **meta)` = `kernel[grid](...)`.

`kernel[grid](...)` spends most of its host time before the launch proper: it binds the arguments to the
signature, specialises each one (dtype, 16-byte alignment, int range, == 1), turns the specialisation and
the options into a cache key, then calls the compiled kernel's C launcher; about 1 µs per argument on an
H200 host, 60-80 µs for the experts' GEMMs. `launch` computes the same properties of the runtime arguments
directly, keys its own cache on them and on `meta` (the constexprs and launch options, passed by name), and
calls the launcher itself. A miss takes Triton's own path, which compiles (or finds) the kernel; the compiled
kernel is then cached under the key.

The key refines Triton's specialisation, so a hit never runs a kernel compiled for other properties. The
short path is off in the interpreter, while launch hooks are set (profilers see every launch), for an
argument of a type it does not know, and for a Triton whose compiled kernels lack the launcher it calls
(the long path is taken, never a guess; a launcher that refuses the arguments is logged once and
the kernel goes back to Triton's path).
"""

from __future__ import annotations

import logging

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from moe_fx.lowering.triton.tuning import interpreting

log = logging.getLogger("moe_fx")
_I32 = range(-(2**31), 2**31)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_cache: dict = {}
stats = {"short": 0, "long": 0}  # launches by path (tests check the short one runs)


def _arg_key(a):
    """What Triton specialises a runtime argument on, or None for a type this path does not handle."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return bool, a
    if isinstance(a, int):
        return a in _I32, a == 1, a % 16 == 0, a >= 2**63
    if isinstance(a, float):
        return float
    if isinstance(a, TensorDescriptor):  # Triton specialises a descriptor on its dtype and block
        # (and, from Triton 3.7, on its tf32 rounding: the attribute is absent before)
        return TensorDescriptor, a.base.dtype, tuple(a.block_shape), a.padding, getattr(a, "round_f32_to_tf32", None)
    return None


def _runtime():
    """(driver, knobs) of this Triton, or None where the short path does not apply."""
    if interpreting() or not torch.cuda.is_available():
        return None
    try:
        from triton import knobs
        from triton.runtime import driver
    except ImportError:  # a Triton before knobs (3.4)
        return None
    return driver, knobs


_RUNTIME = _runtime()


def _hooked(hook) -> bool:
    """Whether a launch hook is set: a callable, or a HookChain (Triton >= 3.5) with calls in it."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _constexpr_tail(kernel, n_args: int, meta: dict):
    """The values of the parameters after the n_args positional ones, in signature order, when they are all
    constexprs (fixed by `meta`, part of the key); None otherwise."""
    try:
        params = list(kernel.signature.parameters.values())
        constexpr = [p.is_constexpr for p in kernel.params]
    except AttributeError:
        return None
    tail = []
    for i, p in enumerate(params[n_args:], start=n_args):
        if not constexpr[i]:
            return None
        tail.append(meta[p.name] if p.name in meta else p.default)
    if any(name not in kernel.signature.parameters and name not in _OPTIONS for name in meta):
        return None
    return tuple(tail)


def launch(kernel, grid: tuple, *args, **meta):
    """kernel[grid](*args, **meta), through the cached launcher when it can."""
    if _RUNTIME is None:
        return kernel[grid](*args, **meta)
    driver, knobs = _RUNTIME
    if _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
        return kernel[grid](*args, **meta)
    arg_keys = tuple(map(_arg_key, args))
    device = driver.active.get_current_device()
    key = (kernel, device, arg_keys, tuple(meta.items()))
    hit = _cache.get(key)
    if hit is None:
        stats["long"] += 1
        compiled = kernel[grid](*args, **meta)
        tail = _constexpr_tail(kernel, len(args), meta)
        usable = None not in arg_keys and tail is not None and hasattr(compiled, "packed_metadata")
        _cache[key] = (compiled, tail) if usable else False
        return compiled
    if hit is False:
        return kernel[grid](*args, **meta)
    compiled, tail = hit
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = driver.active.get_current_stream(device)
    try:
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args,
                     *tail)  # fmt: skip
    except TypeError as err:  # this Triton's launcher takes other arguments (checked before any launch)
        log.warning("moe_fx: the short launch path does not fit this Triton (%s); %s takes Triton's path", err,
                    getattr(kernel, "__name__", kernel))  # fmt: skip
        _cache[key] = False
        return kernel[grid](*args, **meta)
    stats["short"] += 1
    return compiled
