"""Graph breaks where Dynamo, under moe_fx's capture flags, would fail the whole compile.

`backend.CAPTURE_FLAGS` (`capture_dynamic_output_shape_ops`, `capture_scalar_outputs`) let Dynamo trace
the loop forms whole, but they also send it down paths it does not finish. DeepSeek-V3's reference
inference code counts tokens per expert with `torch.bincount(ids, minlength=E).tolist()`: bincount's
length depends on the data, and Dynamo's `tolist` iterates the tensor in Python, which raises
`GuardOnDataDependentSymNode` (torch 2.11-2.13) and fails the compile; without the flags Dynamo breaks
the graph at bincount and runs on.

While a moe_fx capture runs (`capture_config`), `.tolist()` of a tensor whose size depends on the data is
a graph break instead, and so is `if n:` on such a size (`if idx.numel():`, which failed the same way): the
model compiles as it would under any other backend, and the block shows in moe_fx's report as split by that
break (a block in two graphs cannot be rewritten). Where this Dynamo lacks
the method patched, nothing is patched.
"""

from __future__ import annotations

import functools

import torch

from moe_fx.capture.switch import CaptureSwitch

_installed: list = []


def _unbacked_size(tensor) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return isinstance(tensor, torch.Tensor) and bool(free_unbacked_symbols(tensor.shape))


def _install() -> None:
    if _installed:
        return
    _installed.append(True)
    _install_jump_guard()
    try:
        from torch._dynamo.exc import unimplemented
        from torch._dynamo.variables.tensor import TensorVariable
    except ImportError:  # another Dynamo layout: no patch
        return
    original = getattr(TensorVariable, "method_tolist", None)
    if original is None:
        return

    @functools.wraps(original)
    def method_tolist(self, *args, **kwargs):  # (self, tx) on torch 2.13, (self) on older Dynamo
        if SWITCH.active and _unbacked_size(self.as_proxy().node.meta.get("example_value")):
            _graph_break(unimplemented, f"call_method {self} tolist")
        return original(self, *args, **kwargs)

    TensorVariable.method_tolist = method_tolist


def _install_jump_guard() -> None:
    """`if n:` on an int whose value depends on data (`if idx.numel():` under the capture flags): Dynamo 2.13 guards
    on `n != 0` with `guard_bool`, whose GuardOnDataDependentSymNode nothing catches there, and the compile fails;
    it catches a UserError there and breaks the graph, as it does for `if n > 0:`. While moe_fx captures, the
    first becomes the second."""
    try:
        from torch._dynamo import symbolic_convert
        from torch._dynamo.exc import UserError, UserErrorType
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    except ImportError:
        return
    original = getattr(symbolic_convert, "guard_bool", None)
    if original is None:
        return

    @functools.wraps(original)
    def guard_bool(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except GuardOnDataDependentSymNode as err:
            if not SWITCH.active:
                raise
            raise UserError(
                UserErrorType.ANTI_PATTERN, f"moe_fx: a branch on data-dependent truthiness: {err}"
            ) from err

    symbolic_convert.guard_bool = guard_bool


def _graph_break(unimplemented, context: str) -> None:
    explanation = (
        "moe_fx: tolist() of a data-dependent size: the tensor's length depends on its data (e.g. torch.bincount); "
        "Dynamo cannot iterate it under moe_fx's capture flags, so the graph breaks here"
    )
    hint = "A loop that skips experts without tokens (`if counts[i] == 0: continue`) can drop the skip."
    try:
        unimplemented(gb_type="moe_fx: tolist() of a data-dependent size", context=context, explanation=explanation,
                      hints=[hint])  # fmt: skip
    except TypeError:  # an older Dynamo, whose unimplemented takes the message alone
        unimplemented(explanation)


SWITCH = CaptureSwitch(_install)
# Within the context, `.tolist()` of a data-dependent size breaks the graph instead of failing the compile.
breaks_on_unbacked_tolist = SWITCH.on
