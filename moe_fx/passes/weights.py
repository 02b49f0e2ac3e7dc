"""Expert weights as the matchers find them: per-expert families or stacked 3-D parameters.

A `Family` is one role's weights for all E experts: either one stacked leaf [E, ...] (used as is),
one leaf stored flat as [E·m, n] (DBRX's [E·F, D]: the family is its [E, m, n] view), or E per-expert
leaves (`experts.0.w1.weight` … `experts.7.w1.weight`) found by their module paths.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx


def _source_name(node: fx.Node) -> str | None:
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    return source.name() if callable(source.name) else source.name


# The root a Dynamo source starts from: the module itself (`L['self']`), or the first argument of a decorated
# forward `wrapper(*args, **kwargs)` (`L['args'][0]`: transformers' `deprecate_kwarg`), or any other local.
_ROOT = re.compile(r"^L\['[^']*'\](\[\d+\])?\.?")


def user_path(source_name: str) -> str:
    """A Dynamo source name or nn_module_stack path -> the dotted path under the root module
    (`L['args'][0]._modules['layers']._modules['0'].mlp` -> `layers.0.mlp`)."""
    path = re.sub(r"\.?_(modules|parameters|buffers)\['([^']*)'\]", r".\2", source_name)
    return _ROOT.sub("", path).strip(".")


def leaf_name(node: fx.Node) -> str:
    """The user-facing path of a weight leaf (`experts.0.w1.weight`), from its Dynamo source or name."""
    name = _source_name(node)
    if name is not None:
        return user_path(name)
    name = str(node.target) if node.op == "get_attr" else node.name
    name = re.sub(r"^(l_self_|L__self___|L_self_)", "", name)
    return re.sub(r"_(modules|parameters|buffers)_", ".", name).rstrip("_")


def is_weight(node: fx.Node, value) -> bool:
    """A parameter or buffer leaf, as opposed to an activation input."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder" or not isinstance(value, torch.Tensor):
        return False
    raw = _source_name(node) or node.name
    return isinstance(value, torch.nn.Parameter) or any(k in raw for k in ("_buffers", "_parameters"))


@dataclass
class Family:
    name: str  # e.g. "experts.*.w1.weight" or "w1"
    nodes: list[fx.Node]
    tensors: list[torch.Tensor]
    stacked: bool
    prequant: object = None  # dequantised from 1-byte weights: a passes.prequant.PreQuantised, or why it is not one
    # the leaf tensors[0] is a view of: stored flat as [E·m, n] (DBRX), or holding more than E experts of which
    # the first E have weights (LongCat's gate_up_proj also covers its zero-computation experts)
    source: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """[E, ...] shape of the stacked family."""
        if self.stacked:
            return tuple(self.tensors[0].shape)
        return (len(self.tensors), *self.tensors[0].shape)

    def materialize(self) -> torch.Tensor:
        return self.tensors[0] if self.stacked else torch.stack([t.detach() for t in self.tensors])


def group_families(
    leaves: list[tuple[fx.Node, torch.Tensor]], num_experts: int, views: bool = False
) -> tuple[list[Family], list[str]]:
    """Group weight leaves into per-expert families. Returns (families, names of leaves that fit none).

    A family is E leaves whose names differ in exactly one number, running 0..E-1 (`experts.3.w1.weight`),
    one stacked leaf whose leading dim is E, or, with `views`, a view of one leaf: a 2-D leaf whose leading dim
    is a multiple m >= 2 of E (stored flat, viewed [E, m, n]), or a stacked leaf with more than E experts (its
    first E). The caller tries views only when some leaf is not per-expert otherwise.
    """
    named = [(re.split(r"(\d+)", leaf_name(n)), n, t) for n, t in leaves]
    groups: dict[tuple, list[tuple[int, fx.Node, torch.Tensor]]] = {}
    for parts, node, tensor in named:
        for pos in range(1, len(parts), 2):
            key = (tuple("*" if i == pos else p for i, p in enumerate(parts)), tuple(tensor.shape), tensor.dtype)
            groups.setdefault(key, []).append((int(parts[pos]), node, tensor))
    families, placed = [], set()
    for (skeleton, _, _), members in groups.items():
        members = sorted(members, key=lambda m: m[0])
        if [m[0] for m in members] != list(range(num_experts)):
            continue
        if any(m[1] in placed for m in members):
            continue
        placed |= {m[1] for m in members}
        families.append(Family("".join(skeleton), [m[1] for m in members], [m[2] for m in members], stacked=False))
    leftovers = []
    for _, node, tensor in named:
        if node in placed:
            continue
        if tensor.dim() in (2, 3) and tensor.shape[0] == num_experts:
            families.append(Family(leaf_name(node), [node], [tensor], stacked=True))
        elif views and tensor.dim() == 2 and tensor.shape[0] % num_experts == 0 and tensor.shape[0] > num_experts:
            as_3d = tensor.view(num_experts, tensor.shape[0] // num_experts, tensor.shape[1])
            families.append(Family(leaf_name(node), [node], [as_3d], stacked=True, source=tensor))
        elif views and tensor.dim() in (2, 3) and tensor.shape[0] > num_experts:
            families.append(Family(leaf_name(node), [node], [tensor[:num_experts]], stacked=True, source=tensor))
        else:
            leftovers.append(leaf_name(node))
    return families, leftovers


# Stacked tensors moe_fx made, by storage: a recompile finds the per-expert parameters already
# rebound as views into one of these and reuses it instead of stacking a second copy.
_STACKS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_STACKS_LOCK = threading.Lock()  # `apply` in one thread may rewrite while Dynamo compiles in another


def remember_stack(tensor: torch.Tensor) -> None:
    with _STACKS_LOCK:
        _STACKS[tensor.untyped_storage().data_ptr()] = tensor


def _layout(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()


def existing_stack(parts: list[Family], dim: int) -> torch.Tensor | None:
    """The stacked tensor `parts` already live in (concatenated along `dim`), if moe_fx made one."""
    with _STACKS_LOCK:
        stack = _STACKS.get(parts[0].tensors[0].untyped_storage().data_ptr())
    if stack is None:
        return None
    offset = 0
    for family in parts:
        size = family.shape[dim]
        if offset + size > stack.shape[dim]:
            return None
        block = stack.narrow(dim, offset, size)
        offset += size
        expected = [block] if family.stacked else list(block.unbind(0))
        if len(expected) != len(family.tensors):
            return None
        if any(_layout(t) != _layout(v) for t, v in zip(family.tensors, expected)):
            return None
    return stack if offset == stack.shape[dim] else None


def stack_parts(parts: list[Family], dim: int) -> torch.Tensor:
    """parts concatenated along `dim` of the stacked [E, ...] shape: reused, used as is, or copied once."""
    if len(parts) == 1 and parts[0].stacked:
        return parts[0].tensors[0]
    found = existing_stack(parts, dim)
    if found is not None:
        return found
    return torch.cat([p.materialize() for p in parts], dim) if len(parts) > 1 else parts[0].materialize()


def keep_current(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> str | None:
    """Keep a rewritten graph reading the model's weights after they were replaced.

    `pairs`: (the parameter as the model holds it now, the tensor the rewritten graph reads for it: its
    view of a stacked tensor, or the parameter object the graph captured). In-place updates
    (`load_state_dict`, an optimizer step) reach the graph by themselves; a replaced parameter
    (`load_state_dict(assign=True)`, `p.data = ...`) is copied into the graph's tensor once and becomes
    a view of it again. Returns a reason when a parameter's shape, dtype or device changed (no copy).
    """
    for current, target in pairs:
        if current.data_ptr() == target.data_ptr():
            continue
        if (current.shape, current.dtype, current.device) != (target.shape, target.dtype, target.device):
            return (
                f"a weight changed to {tuple(current.shape)} {current.dtype} on {current.device} since the "
                f"rewrite ({tuple(target.shape)} {target.dtype} on {target.device})"
            )
        with torch.no_grad():
            target.copy_(current)
        current.data = target.data
    return None
