"""Expert weights quantised once, at rewrite time, in the canonical layout the lowerings read.

    w13 [E, 2F, D] (gate/up as the model orders them; separate w1/w3 concatenated), w2 [E, D, F]
    -> (w13_q, w13_scale, w2_q, w2_scale) in the format of `moe_fx/lowering/quant.py` (w2_q in column blocks
    for the modes of `quant.W2_BLOCKED_MODES`)

The quantised tensors are cached on the model's first expert weight, per quant mode: a recompile (a new
input shape) reuses them. They remember the version counters of the weights they were made from; the
rewritten graph's caller runs `refresh` before each call, so weights changed in place since
(`load_state_dict`, an optimizer step under no_grad) are quantised again, into the same buffers (CUDA
graphs keep their addresses), instead of being served stale. The check reads one version counter per
source tensor: two per block for models that store experts as 3-D parameters, 3·E for per-expert modules.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from moe_fx.lowering.quant import block_columns, quantize_weight, stored_w2
from moe_fx.passes.experts import ExpertsBinding
from moe_fx.passes.weights import stack_parts

_CACHE_ATTR = "_moe_fx_quantised"
GRAPH_ATTR = "_moe_fx_quantised"  # on a rewritten GraphModule: the QuantisedExperts its buffers belong to


def _quantise(b: ExpertsBinding, mode: str) -> tuple[torch.Tensor, ...]:
    """(w13_q, w13_scale, w2_q, w2_scale), w2_q as [E, D, F]."""
    w13 = b.w13 if b.w3 is None else torch.cat([b.w13, b.w3], dim=2 if b.spec.w13_transposed else 1)
    w13_EHD = w13.transpose(1, 2) if b.spec.w13_transposed else w13
    w2_EDF = b.w2.transpose(1, 2) if b.spec.w2_transposed else b.w2
    return (*quantize_weight(w13_EHD, mode), *quantize_weight(w2_EDF, mode))


class QuantisedExperts:
    """(w13_q, w13_scale, w2_q, w2_scale) of one block, and the source tensors they follow."""

    def __init__(self, binding: ExpertsBinding, mode: str):
        self.binding, self.mode = binding, mode
        self.sources = [t for f in (*binding.w13_parts, binding.w2_family) for t in f.tensors]
        self.versions = self._versions()
        w13_q, w13_scale, w2_q, w2_scale = _quantise(binding, mode)
        self.tensors = (w13_q, w13_scale, stored_w2(w2_q, mode), w2_scale)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self.sources)

    def refresh(self) -> None:
        """Quantise again, in place, if a source weight changed since."""
        versions = self._versions()
        if versions == self.versions:
            return
        b = self.binding  # per-expert weights were copied into a stack when matched: stack them afresh
        h_dim = 2 if b.spec.w13_transposed else 1
        if b.w3 is None:
            b.w13 = stack_parts(b.w13_parts, h_dim)
        else:
            b.w13, b.w3 = (f.materialize() for f in b.w13_parts)
        b.w2 = stack_parts([b.w2_family], 1)
        with torch.no_grad():
            for buffer, fresh in zip(self.tensors, _quantise(b, self.mode)):
                buffer.copy_(block_columns(fresh, buffer.shape[3]) if buffer.dim() > fresh.dim() else fresh)
        self.versions = versions


class QuantisedShard:
    """This rank's experts (`select`, e.g. `Shard.experts_of`) of a block's quantised weights `full` under
    expert parallelism. Views follow `full` by themselves; copies (a non-contiguous placement) are taken
    again when `full` changed (re-quantised by `quantised.refresh`, or the model's own quantised weights
    updated in place)."""

    def __init__(self, full: tuple[torch.Tensor, ...], select, quantised: QuantisedExperts | None):
        self.full, self.select, self.quantised = full, select, quantised
        self.tensors = tuple(select(t) for t in full)
        self.versions = self._versions()

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self.full)

    def refresh(self) -> None:
        if self.quantised is not None:
            self.quantised.refresh()
        versions = self._versions()
        if versions == self.versions:
            return
        with torch.no_grad():
            for local, t in zip(self.tensors, self.full):
                if local._base is None:  # a copy, not a view
                    local.copy_(self.select(t))
        self.versions = versions


def quantised_experts(b: ExpertsBinding, mode: str) -> QuantisedExperts:
    """The block's quantised weights: cached on its first source tensor, refreshed if the weights changed."""
    owner = b.w13_parts[0].tensors[0]
    cache = owner.__dict__.setdefault(_CACHE_ATTR, {})
    key = (mode, tuple(id(t) for f in (*b.w13_parts, b.w2_family) for t in f.tensors))
    if key not in cache:
        cache[key] = QuantisedExperts(b, mode)
    cache[key].refresh()
    return cache[key]


def refresh(gm: fx.GraphModule) -> None:
    """Re-quantise any of gm's blocks whose source weights changed in place (call before running gm)."""
    for q in getattr(gm, GRAPH_ATTR, ()):
        q.refresh()
