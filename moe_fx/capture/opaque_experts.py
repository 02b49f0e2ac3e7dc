"""Capture experts modules whose forward never reaches a Dynamo graph, as one opaque op.

An experts module takes the HF experts contract, `forward(self, hidden_states, top_k_index,
top_k_weights)` -> a tensor of hidden_states' shape: the tokens, each one's top-k expert ids, and their
routing weights. Written as a loop over the experts hit (`nonzero()`, `.item()`, `if numel() == 0`),
as DBRX's and LongCat-Flash's are, its body graph-breaks, so the router's top-k and the combine never
meet in one graph and no MoE block can be found.

While moe_fx captures (`backend.capture_config`: `torch.compile(backend="moe_fx")` tracing, `apply`,
`explain`), such a module's forward is traced as one call of `moe_fx::opaque_experts`, which runs the
module's own forward on real tensors and takes the module's parameters as inputs. The graph then holds
router → top-k → opaque experts → the rest; the matcher treats the op like any experts region: it
finds the expert weight families among those parameters and identifies the experts by probing the
op (the original loop) with random tokens and routings, and rewrites the block or leaves it with a
reason. A block left alone keeps the op, which is the original forward: outputs do not change.

The classes are found among the loaded `nn.Module` subclasses by their forward's signature, once per
class; HF experts decorated with `@use_experts_implementation` are left to `moe_fx.capture.hf_experts`. The
patch acts only while some thread captures and Dynamo is tracing; otherwise it calls the original.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import weakref

import torch
import torch.nn as nn

from moe_fx.capture.switch import CaptureSwitch

CONTRACT = ("self", "hidden_states", "top_k_index", "top_k_weights")
_checked: set[type] = set()
_originals: dict[type, object] = {}
# module id -> module, for the op's real implementation (filled from gc on first use of an id)
_modules: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def _module(module_id: int) -> nn.Module:
    """The live experts module with this id. Dynamo traces the forward symbolically, so nothing records
    the module then; the first lookup of an unknown id records every live instance of the patched classes
    (one walk of the collector's objects for a whole model)."""
    module = _modules.get(module_id)
    if module is None:
        for obj in gc.get_objects():
            if type(obj) in _originals:
                _modules[id(obj)] = obj
        module = _modules.get(module_id)
    if module is None:
        raise RuntimeError(f"moe_fx: opaque_experts: the experts module (id {module_id}) no longer exists")
    return module


# the loop syncs with the host (`nonzero()`, `.item()`): a CUDA graph cannot hold it, so Inductor leaves a graph
# that keeps the op (a block left untouched) out of CUDA graphs instead of failing the capture
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("moe_fx::opaque_experts", mutates_args=(), tags=_TAGS)
def opaque_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights: list[torch.Tensor],
    module_id: int,
) -> torch.Tensor:
    """The experts module's own forward (its loop) on hidden_states [..., D], top_k_index [T, K] and
    top_k_weights [T, K]. `weights` are its parameters: graph inputs the matcher groups into expert weight
    families; a probe that passes other tensors runs the module with those in place of its own."""
    module = _module(module_id)
    own = list(module.named_parameters())
    if len(weights) != len(own):
        raise ValueError(f"moe_fx: opaque_experts: got {len(weights)} weights, the module holds {len(own)}")
    with torch.no_grad(), _parameters_swapped(module, [(name, w) for (name, p), w in zip(own, weights) if w is not p]):
        out = _originals[type(module)](module, hidden_states, top_k_index, top_k_weights)
    if not isinstance(out, torch.Tensor) or out.shape != hidden_states.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(
            f"moe_fx: {type(module).__name__}.forward returned {got}, expected a tensor of hidden_states' "
            f"shape {tuple(hidden_states.shape)} (the experts contract)"
        )
    inputs = (hidden_states, top_k_index, top_k_weights, *weights)
    aliased = any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs)
    return out.clone() if aliased else out


@contextlib.contextmanager
def _parameters_swapped(module: nn.Module, swaps: list[tuple[str, torch.Tensor]]):
    """The module's parameters `name` replaced by the given tensors (a probe's), restored after."""
    saved = []
    try:
        for name, tensor in swaps:
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = tensor
        yield
    finally:
        for owner, leaf, param in reversed(saved):
            owner._parameters[leaf] = param


@opaque_experts.register_fake
def _(hidden_states, top_k_index, top_k_weights, weights, module_id):
    return torch.empty_like(hidden_states)


def has_contract(forward) -> bool:
    """An undecorated forward(self, hidden_states, top_k_index, top_k_weights)."""
    if hasattr(forward, "__wrapped__") or not callable(forward):
        return False
    try:
        names = tuple(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return False
    return names == CONTRACT


def _subclasses(root: type) -> set[type]:
    found, stack = set(), [root]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


_pending: list[type] = []  # nn.Module subclasses defined since the last _install


def _note_subclass(cls, **kwargs):
    super(nn.Module, cls).__init_subclass__(**kwargs)
    _pending.append(cls)


def _install() -> None:
    """Patch the forward of every experts-contract class (under SWITCH.lock). The first call walks the loaded
    nn.Module subclasses and hooks `nn.Module.__init_subclass__`; later calls see only classes defined
    since, so a compiled model's every call (which enters the capture context) costs nothing here."""
    if not _checked:
        nn.Module.__init_subclass__ = classmethod(_note_subclass)
        classes = _subclasses(nn.Module)
    else:
        classes = set(_pending)
    _pending.clear()
    for cls in classes - _checked:
        _checked.add(cls)
        forward = vars(cls).get("forward")
        if forward is None or not has_contract(forward):
            continue
        _originals[cls] = forward
        cls.forward = _traced_as_opaque(forward)


def _traced_as_opaque(original):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        if SWITCH.active and torch.compiler.is_compiling():
            weights = list(self.parameters())
            return torch.ops.moe_fx.opaque_experts(hidden_states, top_k_index, top_k_weights, weights, id(self))
        return original(self, hidden_states, top_k_index, top_k_weights)

    forward.__doc__ = original.__doc__
    forward.moe_fx_original = original
    return forward


SWITCH = CaptureSwitch(_install)
# Within the context, Dynamo traces experts-contract modules' forwards as `moe_fx::opaque_experts`.
opaque_loop_experts = SWITCH.on
