"""Identify the experts' MLP of a matched region: which weights play which role, and the activation.

Candidates come from the shapes of the weight families (gate/up/down, fused or separate, stored
transposed or not, biases by name) and from the activation ops present in the region. Each candidate
is run through the moe_fx ops with the reference lowering on the same probes as the original region;
the closest one wins if it is within the dtype's tolerance.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from moe_fx.ops import combine_args, dispatch_args, experts_args
from moe_fx.passes import identity_experts as identity
from moe_fx.passes.graph_view import is_view, target_name, tensor_meta
from moe_fx.passes.weights import Family, stack_parts
from moe_fx.spec import CLAMPED_ACTIVATIONS, ExpertsSpec, MoESpec

GATED = ("silu_gated", "gelu_gated", "gelu_tanh_gated")
NON_GATED = ("relu", "gelu", "gelu_tanh", "silu", "relu2")


@dataclass
class ExpertsBinding:
    """A candidate: the spec plus the tensors (and the families they were built from)."""

    spec: ExpertsSpec
    weight_placement: str
    w13: torch.Tensor
    w3: torch.Tensor | None
    w2: torch.Tensor
    w13_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None
    w13_parts: list[Family] = field(default_factory=list)  # concatenated along the 2F dim, in order
    w2_family: Family | None = None
    w13_bias_parts: list[Family] = field(default_factory=list)
    w2_bias_family: Family | None = None


def activation_hints(target_names: set[str], approximate_tanh: bool, clamp_bounds, sigmoid_alpha) -> dict:
    """Activation candidates suggested by the ops in the region.

    `clamp_bounds`: the numeric bounds of the region's float clamps; the clamped activations (`limit` the
    largest |bound|) come first when there are any, so a tie on probes that never reach the bounds goes to
    them, and the matcher's clamp probes (`passes/identify.py`) tell them from the unclamped ones."""
    gated, plain = [], []
    silu = "silu" in target_names or "sigmoid" in target_names
    if silu:
        gated.append("silu_gated")
        plain.append("silu")
    if "gelu" in target_names:
        gated.append("gelu_tanh_gated" if approximate_tanh else "gelu_gated")
        plain.append("gelu_tanh" if approximate_tanh else "gelu")
    if "relu" in target_names:
        plain += ["relu", "relu2"]  # relu2: relu(h) squared (`square`, `pow` or `mul`)
    extra = {}
    if clamp_bounds and silu:
        gated[:0] = ["clamped_silu_gated", "clamped_swiglu"] if "sigmoid" in target_names else ["clamped_silu_gated"]
        extra = {"limit": max(abs(b) for b in clamp_bounds), "alpha": sigmoid_alpha or 1.702}
    return {"gated": gated or list(GATED), "plain": plain or list(NON_GATED), **extra}


# clamp ops and the names of their positional bounds
CLAMPS = {"clamp": ("min", "max"), "clip": ("min", "max"), "clamp_min": ("min",), "clamp_max": ("max",)}
CLAMPS |= {f"{name}_": bounds for name, bounds in CLAMPS.items()}


def _clamp_bounds(node: fx.Node) -> dict:
    """A clamp node's bounds by name (`min`, `max`): numbers or tensor nodes; None and ±inf clamp nothing."""
    named = dict(zip(CLAMPS[target_name(node)], node.args[1:]))
    named |= {k: v for k, v in node.kwargs.items() if k in ("min", "max")}
    return {k: v for k, v in named.items() if v is not None and not (isinstance(v, float) and math.isinf(v))}


def float_clamps(region) -> list[fx.Node]:
    """The clamps of floating-point values in `region` that bound anything (None and ±inf bound nothing), in
    graph order. Integer clamps (expert ids) are left out."""
    found = []
    for n in region:
        if n.op not in ("call_function", "call_method") or target_name(n) not in CLAMPS:
            continue
        t = tensor_meta(n)
        if t is not None and t.is_floating_point() and _clamp_bounds(n):
            found.append(n)
    return sorted(found)  # fx nodes order as in their graph


def clamp_bounds(region) -> list[float]:
    """The numeric bounds of the region's float clamps (the activation hints read the limit from them)."""
    return [b for n in float_clamps(region) for b in _clamp_bounds(n).values() if isinstance(b, (int, float))]


def modelled_clamps(spec: ExpertsSpec) -> list[dict]:
    """The clamps `spec` computes, as bounds by name: the gate's max=limit and the up projection's ±limit for
    the clamped activations (`moe_fx.spec.CLAMPED_ACTIVATIONS`), none otherwise."""
    if spec.activation not in CLAMPED_ACTIVATIONS:
        return []
    return [{"max": spec.limit}, {"min": -spec.limit, "max": spec.limit}]


# products whose output a clamped activation clamps (a projection), and what may stand between the two
PROJECTIONS = {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum"}
PROJECTIONS |= {"_grouped_mm", "grouped_mm", "grouped_mm_fallback", "grouped_mm_fallback.default"}
_PASS_THROUGH = {"getitem", "to", "float", "half", "bfloat16", "type", "type_as", "contiguous", "clone"}
_PASS_THROUGH |= {"add", "__add__", "iadd", "add_"}  # a bias


def _clamps_a_projection(clamp: fx.Node, region) -> bool:
    """Whether `clamp` acts on a projection's output (slices, casts, views and bias adds between them), as
    the clamped activations' clamps do: not on an activation's output (Ling's silu(gate).clamp(max=L)) nor
    on the tokens."""
    seen, todo, projected = set(), [clamp.args[0]], False
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        name = target_name(n)
        if n not in region or n.op in ("placeholder", "get_attr"):
            continue  # a leaf: a bias (a path of the tokens alone never sets `projected`)
        if name in PROJECTIONS:
            projected = True
        elif is_view(n) or name in _PASS_THROUGH:
            todo += n.all_input_nodes
        else:
            return False
    return projected


def unmodelled_clamps(region, spec: ExpertsSpec) -> list[str]:
    """The clamps of floating-point values in the experts region that `spec` does not compute, described.

    A clamped activation (`clamped_swiglu`, `clamped_silu_gated`) clamps the gate at max=limit and the up
    projection at min=-limit, max=limit, both projections' outputs: a clamp of a projection with exactly one of
    those bound sets is the spec's; any other (another bound, another side, a tensor bound, a clamp after the
    activation) is one no spec has. Which projection each clamp acts on, and that all the spec's clamps are
    there, the matcher's clamp probes check, which reach past every bound (`passes/identify.py`); this check is
    what tells the clamps the probes cannot (silu's gate clamped at min=-50 changes nothing they see; a clamp
    after silu at L changes a value by L·σ(-L), under the tolerance for L = 10). Integer clamps (expert ids)
    are left out. An opaque experts op (`moe_fx/capture/opaque_experts.py`) hides its clamps: its probes alone check
    it."""
    modelled = modelled_clamps(spec)
    found = []
    for n in float_clamps(region):
        bounds = _clamp_bounds(n)
        numbers = all(isinstance(b, (int, float)) for b in bounds.values())
        if numbers and bounds in modelled and _clamps_a_projection(n, region):
            continue
        shown = ", ".join(f"{k}={v.name if isinstance(v, fx.Node) else v}" for k, v in bounds.items())
        found.append(f"{target_name(n)}({shown})")
    return sorted(set(found))


class ClampWatch(fx.Interpreter):
    """Runs a cut-out region (`subgraph.extract`) and keeps the lowest and highest value each of `clamps` (nodes
    of that region) was given, over every run: whether the probes reached past the clamps' bounds."""

    def __init__(self, region_fn: fx.GraphModule, clamps: list[fx.Node]):
        super().__init__(region_fn)
        self.clamps = clamps
        self.low = dict.fromkeys(clamps, math.inf)
        self.high = dict.fromkeys(clamps, -math.inf)

    def run_node(self, n):
        if n in self.low and isinstance(v := self.env.get(n.args[0]), torch.Tensor) and v.numel():
            self.low[n] = min(self.low[n], v.min().item())  # before an in-place clamp changes it
            self.high[n] = max(self.high[n], v.max().item())
        return super().run_node(n)

    def scale_to_reach(self, margin: float = 3.0) -> float | None:
        """The factor on the tokens that takes the clamp the runs so far came least close to (by their largest
        |value|) to `margin` times the largest |bound|: the clamps act on projections, so their inputs scale
        with the tokens (plus biases). Clamps that saw no value (an expert without tokens in every run) do not
        count. None when the others saw only zeros or non-finite values."""
        bounds = [abs(b) for n in self.clamps for b in _clamp_bounds(n).values() if isinstance(b, (int, float))]
        reach = min((max(-self.low[n], self.high[n]) for n in self.clamps if self.low[n] <= self.high[n]), default=0)
        return margin * max(bounds) / reach if bounds and 0 < reach < math.inf else None

    def unreached(self) -> list[str]:
        """The clamps whose runs never went past one of their numeric bounds, described."""
        found = []
        for n in self.clamps:
            bounds = {k: b for k, b in _clamp_bounds(n).items() if isinstance(b, (int, float))}
            if ("min" in bounds and not self.low[n] < bounds["min"]) or (
                "max" in bounds and not self.high[n] > bounds["max"]
            ):
                shown = ", ".join(f"{k}={v}" for k, v in bounds.items())
                seen = f"[{self.low[n]:.3g}, {self.high[n]:.3g}]" if self.low[n] <= self.high[n] else "no values"
                found.append(f"{target_name(n)}({shown}) saw {seen}")
        return found


def _role_tokens(name: str) -> list[str]:
    """A parameter's name split at "." and "_" with its weight/bias marker dropped: "parameters_w1" and
    "parameters_b1" give ["parameters", "1"], "experts.w_gate" and "experts.b_gate" ["experts", "gate"]."""
    tokens = []
    for token in re.split(r"[._]", name):
        if token in ("w", "b", "weight", "bias"):
            continue
        numbered = re.fullmatch(r"(?:w|b|weight|bias)(\d+)", token)
        tokens.append(numbered.group(1) if numbered else token)
    return tokens


def _bias_for(weight: Family, biases: list[Family]) -> Family | None:
    """The bias family that belongs to `weight`, matched by name: its module path (w1.weight <-> w1.bias),
    a `_bias` suffix (gate_up_proj <-> gate_up_proj_bias), else the same name but for the weight/bias marker
    (w1 <-> b1, w_gate <-> b_gate, weight2 <-> bias2). Never by shape alone: zero-initialised biases of equal
    shapes give every pairing the same output, so the probes could not tell a wrong one."""
    stem = re.sub(r"weight$", "", weight.name)
    for b in biases:
        if b.name in (stem + "bias", weight.name + "_bias"):
            return b
    tokens = _role_tokens(weight.name)
    same = [b for b in biases if _role_tokens(b.name) == tokens]
    return same[0] if len(same) == 1 else None


def candidates(families: list[Family], hidden: int, num_experts: int, hints: dict, identity_experts: int = 0):
    """Every binding of families to roles that the shapes allow. Yields ExpertsBinding.

    `identity_experts`: the router's picks beyond the `num_experts` the families hold return the token."""
    mats = [f for f in families if len(f.shape) == 3]
    vecs = [f for f in families if len(f.shape) == 2]
    D = hidden
    for down in mats:
        rest = [m for m in mats if m is not down]
        for t2 in (False, True):
            d_dim, f_dim = (2, 1) if t2 else (1, 2)
            if down.shape[d_dim] != D:
                continue
            F = down.shape[f_dim]
            groups = [rest] if len(rest) == 1 else list(itertools.permutations(rest)) if len(rest) == 2 else []
            for parts in groups:
                for t13 in (False, True):
                    h_dim, in_dim = (2, 1) if t13 else (1, 2)
                    if any(p.shape[in_dim] != D for p in parts):
                        continue
                    H = sum(p.shape[h_dim] for p in parts)
                    separate = len(parts) == 2 and all(p.stacked for p in parts)
                    if H == 2 * F:
                        layouts = ("concat", "interleaved", "up_first") if len(parts) == 1 else ("concat",)
                        layouts = ("separate",) if separate else layouts
                        acts = hints["gated"]
                    elif H == F and len(parts) == 1:
                        layouts, acts = ("concat",), hints["plain"]
                    else:
                        continue
                    b13_parts = [_bias_for(p, vecs) for p in parts]
                    b2 = _bias_for(down, vecs)
                    used = {id(b) for b in [*b13_parts, b2] if b is not None}
                    if len(used) != len(vecs) or (any(b13_parts) and not all(b13_parts)):
                        continue  # a bias we could not place
                    if (
                        b2 is not None
                        and b2.shape[1] != D
                        or any(b.shape[1] != p.shape[h_dim] for b, p in zip(b13_parts, parts) if b is not None)
                    ):
                        continue
                    if separate:
                        w13, w3 = parts[0].materialize(), parts[1].materialize()
                    else:
                        w13, w3 = stack_parts(list(parts), h_dim), None
                    b13 = stack_parts(b13_parts, 1) if b13_parts and all(b13_parts) else None
                    for layout, act, placement in itertools.product(layouts, acts, ("output", "input")):
                        spec = ExpertsSpec(
                            num_experts=num_experts,
                            hidden=D,
                            ffn=F,
                            activation=act,
                            gate_up=layout,
                            w13_transposed=t13,
                            w2_transposed=t2,
                            has_w13_bias=b13 is not None,
                            has_w2_bias=b2 is not None,
                            alpha=hints.get("alpha", 1.702),
                            limit=hints.get("limit", 7.0),
                            dtype=str(w13.dtype).removeprefix("torch."),
                            identity_experts=identity_experts,
                        )
                        yield ExpertsBinding(
                            spec,
                            placement,
                            w13,
                            w3,
                            stack_parts([down], 1),
                            b13,
                            stack_parts([b2], 1) if b2 else None,
                            list(parts),
                            down,
                            [b for b in b13_parts if b],
                            b2,
                        )


def run_experts(binding: ExpertsBinding, x_TD, weights_TK, ids_TK, out_dtype, impl="reference"):
    """The rewritten block on concrete tensors: dispatch -> experts -> combine (identity experts around)."""
    spec = MoESpec(binding.spec, ids_TK.shape[1], weight_placement=binding.weight_placement)
    b, ops = binding, torch.ops.moe_fx
    if spec.experts.identity_experts:
        ids_TK, weights_TK, identity_T1 = identity.split(ids_TK, weights_TK, spec.experts.num_experts)
    dispatched = ops.quantize_dispatch(*dispatch_args(spec, x_TD, ids_TK, weights_TK, impl))
    y = ops.experts(*experts_args(spec, x_TD, dispatched, b.w13, b.w3, b.w2, b.w13_bias, b.w2_bias, out_dtype, impl))
    out = ops.combine(*combine_args(spec, y, weights_TK, dispatched, impl))
    return identity.add(out, x_TD, identity_T1) if spec.experts.identity_experts else out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64, out64 = ref.double(), out.double()
    denom = ref64.norm().item()
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return float("inf")
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff
