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
from moe_fx.passes.graph_view import target_name, tensor_meta
from moe_fx.passes.weights import Family, stack_parts
from moe_fx.spec import ExpertsSpec, MoESpec

GATED = ("silu_gated", "gelu_gated", "gelu_tanh_gated")
NON_GATED = ("relu", "gelu", "gelu_tanh", "silu")


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
    """Activation candidates suggested by the ops in the region."""
    gated, plain = [], []
    if "silu" in target_names or "sigmoid" in target_names:
        gated.append("silu_gated")
        plain.append("silu")
    if "gelu" in target_names:
        gated.append("gelu_tanh_gated" if approximate_tanh else "gelu_gated")
        plain.append("gelu_tanh" if approximate_tanh else "gelu")
    if "relu" in target_names:
        plain.append("relu")
    extra = {}
    if clamp_bounds and "sigmoid" in target_names:
        gated.insert(0, "clamped_swiglu")
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


def unmodelled_clamps(region, spec: ExpertsSpec) -> list[str]:
    """The clamps of floating-point values in the experts region that `spec` does not compute, described.

    The candidates are told apart on probes of tokens at the example's scale, which need not reach a clamp's
    bounds (HY-V4's experts clamp gate and up at swiglu_limit = 10, which a tiny model's never reach): a spec
    without the clamp then agrees on every probe and is wrong on the tokens that do reach it. `clamped_swiglu`
    clamps at ±limit; any other clamp of float values in the region is one no spec has. Integer clamps (expert
    ids) are left out. An opaque experts op (`moe_fx/opaque_experts.py`) hides its clamps: its probes alone
    check it."""
    found = []
    for n in region:
        if n.op not in ("call_function", "call_method") or target_name(n) not in CLAMPS:
            continue
        t = tensor_meta(n)
        bounds = _clamp_bounds(n)
        if t is None or not t.is_floating_point() or not bounds:
            continue
        numbers = all(isinstance(b, (int, float)) for b in bounds.values())
        if spec.activation == "clamped_swiglu" and numbers and {abs(b) for b in bounds.values()} == {spec.limit}:
            continue
        shown = ", ".join(f"{k}={v.name if isinstance(v, fx.Node) else v}" for k, v in bounds.items())
        found.append(f"{target_name(n)}({shown})")
    return sorted(set(found))


def _bias_for(weight: Family, biases: list[Family]) -> Family | None:
    """The bias family that belongs to `weight`, matched by module path (w1.weight <-> w1.bias)."""
    stem = re.sub(r"weight$", "", weight.name)
    for b in biases:
        if b.name in (stem + "bias", weight.name + "_bias"):
            return b
    return None


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
                    if separate and any(b13_parts):
                        continue  # separate stacked gate/up with biases: not supported yet
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
    y = ops.experts(*experts_args(spec, dispatched, b.w13, b.w3, b.w2, b.w13_bias, b.w2_bias, out_dtype, impl))
    out = ops.combine(*combine_args(spec, y, weights_TK, dispatched, impl))
    return identity.add(out, x_TD, identity_T1) if spec.experts.identity_experts else out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64, out64 = ref.double(), out.double()
    denom = ref64.norm().item()
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return float("inf")
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff
