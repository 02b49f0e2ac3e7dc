"""Expert weights the model already holds quantised: found, checked, and fed to `experts` as they are.

Legend: E experts, H output features (2F for w13, D for w2), D input features, G = 128.

    w13_q e4m3 [E, 2F, D] ─┐                                              (DeepSeek-V3 / HF FineGrainedFP8:
    w13_scale fp32 [E, 2F/G, D/G] ─┴─ dequantise (any spelling) ─▶ w13 [E, 2F, D] ─▶ experts region
                                                                                   `weight_scale_inv`)

1. the matcher cuts the region at its *dequantised* tensors: weight-only nodes (no token data upstream)
   that feed the token computation and read a 1-byte parameter (e4m3, int8). The experts are identified on
   their values exactly as for an unquantised model (`passes/experts.py`).
2. each dequantised tensor is checked against the formats of `lowering/quant.py`: one 1-byte parameter q
   and one float32 parameter s among its sources such that `dequantize_weight(q, s, mode)` equals the value
   element by element (to two roundings of its dtype), in either orientation ([E, H, D] or its transpose):

       e4m3 q [E, H, D], s [E, ceil(H/G), ceil(D/G)]  -> fp8_block   (DeepSeek-V3, HF FP8Experts)
       e4m3 q [E, H, D], s [E, H]                     -> fp8         (per output channel)
       int8 q [E, H, D], s [E, H]                     -> int8        (per output channel)

3. `quant_mode` decides per block: both w13 and w2 recognised, in one mode, stored in the canonical
   [E, H, D] orientation -> the rewrite passes q and s themselves to `experts` (the model's own storage:
   no copy, no re-quantisation) with that quant mode, activations quantised dynamically as usual; the
   dequantisation nodes leave the graph. Weights quantised in a format moe_fx does not read stay as the
   model computes them: with quant="none" the block is rewritten on the model's own dequantised tensors
   (the dequantisation stays in the graph, exact); asking for a quant mode then, or for a mode other than
   the one the weights hold, leaves the block untouched with the reason (re-quantising a dequantised copy
   would stop following the model's weights), as does a parallel layout (each rank would keep a
   dequantised copy of its shard). Recognised weights shard as views of the model's own parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.lowering.quant import BLOCK, FP8, dequantize_weight
from moe_fx.passes.graph_view import value
from moe_fx.passes.weights import Family, leaf_name

_QUANT_DTYPES = (FP8, torch.int8)


@dataclass(frozen=True)
class PreQuantised:
    """A dequantised weight recognised as `dequantize_weight(q, scale, mode)` (transposed: its [E, H, D]
    transpose)."""

    mode: str
    q_node: fx.Node
    q: torch.Tensor
    scale_node: fx.Node
    scale: torch.Tensor
    transposed: bool

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def summary(self) -> str:
        q, s = self.q, self.scale
        return (
            f"{leaf_name(self.q_node)} {str(q.dtype).removeprefix('torch.')} {list(q.shape)} + "
            f"{leaf_name(self.scale_node)} {str(s.dtype).removeprefix('torch.')} {list(s.shape)}"
        )


def _one_byte(t) -> bool:
    return isinstance(t, torch.Tensor) and t.element_size() == 1 and t.dtype != torch.bool


def frontier(finder, region: set[fx.Node]) -> tuple[list[fx.Node], str | None]:
    """The region's dequantised weights: weight-only tensors (no token data upstream) that feed the token
    computation and read a 1-byte weight. Returns (nodes in graph order, reason) — the reason when a
    dequantisation mutates a tensor in place (then none is cut, and the block is identified on its leaves)."""
    view = finder.view
    weight_only = {
        n
        for n in region
        if n not in finder.depends_on_data and isinstance(value(n), torch.Tensor) and value(n).is_floating_point()
    }
    found = []
    for n in view.sorted(weight_only):
        if all(u in weight_only or not isinstance(value(u), torch.Tensor) for u in view.users[n]):
            continue
        leaves = [s for s in view.backward([n]) if s in finder.weights]
        if any(_one_byte(v) for v in finder.leaf_values(leaves)):
            found.append(n)
    closure = view.backward(found) & region
    if any(view.mutations.get(n) for n in closure):
        return [], "the expert weights are dequantised in place (a mutation), which moe_fx does not cut"
    return found, None


def _recognise(v: torch.Tensor, sources: list[tuple[fx.Node, torch.Tensor]]) -> PreQuantised | str:
    if v.dim() != 3:
        return f"the dequantised weight is {list(v.shape)}, not a stacked [E, H, D] tensor"
    quantised = [(n, t) for n, t in sources if t.dtype in _QUANT_DTYPES]
    scales = [(n, t) for n, t in sources if t.dtype == torch.float32]
    if len(quantised) != 1:
        kinds = sorted({str(t.dtype) for _, t in sources if _one_byte(t)})
        return f"it is dequantised from {len(quantised)} e4m3/int8 parameters (1-byte sources: {kinds})"
    q_node, q = quantised[0]
    rtol = 2 * torch.finfo(v.dtype).eps  # every element, to the value's own rounding (its product, its scale's)
    for transposed in (False, True):
        target = v.transpose(1, 2) if transposed else v
        if q.shape != target.shape:
            continue
        E, H, D = q.shape
        shapes = {"fp8_block": (E, math.ceil(H / BLOCK), math.ceil(D / BLOCK)), "fp8": (E, H), "int8": (E, H)}
        modes = ("fp8_block", "fp8") if q.dtype == FP8 else ("int8",)
        for s_node, s in scales:
            for mode in modes:
                if tuple(s.shape) != shapes[mode]:
                    continue
                ref = dequantize_weight(q, s, mode, D)
                if bool(((target.double() - ref).abs() <= rtol * ref.abs()).all()):
                    return PreQuantised(mode, q_node, q, s_node, s, transposed)
    names = [f"{leaf_name(n)} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}" for n, t in sources]
    return (
        f"its sources {names} are not e4m3 with [E, H/128, D/128] or [E, H] float32 scales, nor int8 with [E, H] "
        "scales, that dequantise to it"
    )


def families(finder, nodes: list[fx.Node], values: list[torch.Tensor], num_experts: int):
    """Families of the dequantised weights (each carries its `prequant`: a PreQuantised or the reason it is
    not one), and the names of those that are not stacked [E, ...] tensors."""
    found, leftovers = [], []
    for node, v in zip(nodes, values):
        leaves = [s for s in finder.view.backward([node]) if s in finder.weights]
        sources = [(n, t) for n, t in zip(leaves, finder.leaf_values(leaves)) if isinstance(t, torch.Tensor)]
        q_name = next((leaf_name(n) for n, t in sources if _one_byte(t)), node.name)
        if v.dim() in (2, 3) and v.shape[0] == num_experts:
            found.append(Family(f"dequantised({q_name})", [node], [v], stacked=True, prequant=_recognise(v, sources)))
        else:
            leftovers.append(f"dequantised({q_name}) {list(v.shape)}")
    return found, leftovers


def quant_mode(binding, requested: str, layout: str = "single") -> tuple[str, str | None, str]:
    """(quant mode to rewrite with, reason to leave the block untouched or None, a note for the report).

    See the module docstring: pre-quantised weights are taken as they are in their own mode; the rest runs
    on the model's own dequantised weights unquantised, or is refused when a quant mode is asked for.
    """
    roles = {"w13": binding.w13_parts, "w2": [binding.w2_family]}
    marks = {role: [f.prequant for f in parts] for role, parts in roles.items()}
    if all(m is None for ms in marks.values() for m in ms):
        return requested, None, ""
    why = None
    for role, ms in marks.items():
        if len(ms) != 1:
            why = f"{role} is concatenated from {len(ms)} weights (separate gate and up): the lowerings read one"
        elif not isinstance(ms[0], PreQuantised):
            why = f"{role} is not recognised ({ms[0] or 'it is not quantised'})"
    if why is None:
        pq13, pq2 = marks["w13"][0], marks["w2"][0]
        es = binding.spec
        if pq13.mode != pq2.mode:
            why = f"w13 is {pq13.mode} but w2 is {pq2.mode}: one quant mode per block"
        elif pq13.transposed != es.w13_transposed or pq2.transposed != es.w2_transposed:
            why = "the quantised weights are stored [E, in, out]; the quantised lowerings read [E, out, in]"
        elif requested not in ("none", pq13.mode):
            why = (
                f"the weights are already quantised as {pq13.mode}; quant={requested!r} would re-quantise a "
                f"dequantised copy: leave quant unset (or pass {pq13.mode!r}) to use them as they are"
            )
        else:
            note = f"pre-quantised {pq13.mode} weights taken as they are: {pq13.summary()}; {pq2.summary()}"
            return pq13.mode, None, note
    if requested == "none" and layout == "single":
        return "none", None, f"quantised weights run as the model dequantises them: {why}"
    if requested == "none":  # a shard would be a dequantised copy, stale once the model's weights change
        return "none", f"pre-quantised expert weights cannot be sharded for layout {layout!r}: {why}", ""
    return requested, f"pre-quantised expert weights cannot be used as they are: {why}", ""


def prequantised(binding) -> tuple[PreQuantised, PreQuantised] | None:
    """(w13's, w2's) PreQuantised when the binding's weights are both taken pre-quantised."""
    parts = [*binding.w13_parts, binding.w2_family]
    if len(parts) == 2 and all(isinstance(f.prequant, PreQuantised) for f in parts):
        return parts[0].prequant, parts[1].prequant
    return None
