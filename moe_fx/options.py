"""The options every entry point takes (`torch.compile(..., options=)`, `apply`, `explain`).

Every key is validated: an unknown key, a value of the wrong type or outside its choices, or a forced
lowering that is not registered is a `moe_fx:` ValueError naming the value and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_fx.lowering import registry
from moe_fx.lowering.distributed.placement import EP_LAYOUTS
from moe_fx.lowering.registry import OPS
from moe_fx.spec import LAYOUTS, QUANT_MODES

INNER = ("inductor", "eager")
PARALLEL_LAYOUTS = tuple(lay for lay in LAYOUTS if lay != "single")
VALID_KEYS = {
    "inner": f"one of {INNER}: the compiler that receives the rewritten graph (torch.compile only)",
    "lowerings": f"a dict op -> lowering name forcing a registry entry; ops: {OPS}",
    "quant": f"one of {QUANT_MODES}",
    "layout": f"one of {LAYOUTS}",
    "group": f"a torch.distributed ProcessGroup or 1-D DeviceMesh for layouts {PARALLEL_LAYOUTS} (default WORLD)",
    "expert_placement": f"a sequence of E ranks, the rank holding each expert, for layouts {EP_LAYOUTS} "
    "(default: contiguous blocks of E / world size)",
    "max_tokens_per_rank": "an int > 0, layout 'ep_alltoall' only: the most tokens any rank sends in one call; "
    "dispatch and combine then exchange fixed-size buffers with no host sync (CUDA-graph capturable decode), "
    "and a call with more tokens is a moe_fx error (default: exact, data-dependent exchanges)",
    "allow_reference_fallback": "bool: let a quantised block run on the (slow, emulating) reference lowering on a GPU "
    "that no native lowering serves (default False: a moe_fx error names the device capability)",
    "keep_original_weights": "bool (default True): with quant, False frees the model's unquantised expert weights "
    "once they are quantised (moe_fx.apply only; they become empty tensors in state_dict)",
    "verify": "a bool (default True): run each rewritten block against the original once at compile time "
    "and leave it untouched on a mismatch",
    "overlap_shared": "a bool (default True): under layout 'ep_alltoall' (exact exchanges), run each block's "
    "shared expert (work that needs neither the routed path nor the exchanged rows) while its rows travel",
    "fuse_combine": "a bool (default True): on one device, let an experts lowering that can (Triton's) do combine's "
    "weighted sum in its down GEMM's epilogue, with atomic adds in the model's dtype: no combine node and no "
    "[T*K, D] round trip through memory, but the sum's order (and so its last bits) varies from run to run; "
    "False keeps the combine node (a fixed order, fp32 accumulation), as torch.use_deterministic_algorithms(True) "
    "does",
    "fuse_route": "a bool (default True): where combine's sum is in experts "
    "(fuse_combine), let an experts lowering that can (Triton's) also route and dispatch its own rows at decode: one "
    "`moe_fx::routed_experts` node in place of route, quantize_dispatch and experts, which runs as two kernels (the "
    "router's GEMV, then one kernel whose programs each route their pick) at the few tokens where the experts' "
    "tiles are fused, and as the three ops elsewhere",
}
BOOLS = ("allow_reference_fallback", "keep_original_weights", "verify", "overlap_shared", "fuse_combine", "fuse_route")


@dataclass(frozen=True)
class Options:
    inner: str = "inductor"
    lowerings: dict[str, str] = field(default_factory=dict)
    quant: str = "none"
    layout: str = "single"
    allow_reference_fallback: bool = False
    keep_original_weights: bool = True
    verify: bool = True
    group: Any = None  # ProcessGroup | DeviceMesh | None (WORLD); resolved at rewrite time
    expert_placement: tuple[int, ...] | None = None
    max_tokens_per_rank: int = 0
    overlap_shared: bool = True
    fuse_combine: bool = True
    fuse_route: bool = True


def _placement(value) -> tuple[int, ...]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(r, int) and r >= 0 for r in value):
        raise ValueError(f"moe_fx: option expert_placement={value!r} must be a sequence of ranks (ints >= 0)")
    return tuple(value)


def _check_lowerings(lowerings) -> dict[str, str]:
    if not isinstance(lowerings, dict) or any(op not in OPS for op in lowerings):
        raise ValueError(f"moe_fx: option lowerings={lowerings!r} must be a dict keyed by ops {OPS}")
    for op, name in lowerings.items():
        if not isinstance(name, str):
            raise ValueError(f"moe_fx: option lowerings[{op!r}]={name!r} must be a lowering name (str)")
        known = registry.names(op)
        if name not in known:
            raise ValueError(f"moe_fx: option lowerings[{op!r}]={name!r} is not a registered lowering; known: {known}")
    return dict(lowerings)


def parse_options(options: dict[str, Any] | None) -> Options:
    """Validate a user's options dict; unknown keys and bad values raise a `moe_fx:` ValueError."""
    if options is None:
        return Options()
    if isinstance(options, Options):
        return options
    if not isinstance(options, dict):
        raise ValueError(f"moe_fx: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(VALID_KEYS), key=str)
    if unknown:
        valid = "; ".join(f"{k}: {v}" for k, v in VALID_KEYS.items())
        raise ValueError(f"moe_fx: unknown option(s) {unknown}; valid options are {valid}")
    choices = {"inner": INNER, "quant": QUANT_MODES, "layout": LAYOUTS}
    for key, allowed in choices.items():
        if key in options and options[key] not in allowed:
            raise ValueError(f"moe_fx: option {key}={options[key]!r} is not one of {allowed}")
    for key in BOOLS:
        if key in options and not isinstance(options[key], bool):
            raise ValueError(f"moe_fx: option {key}={options[key]!r} must be a bool (True or False)")
    lowerings = _check_lowerings(options.get("lowerings", {}))
    layout = options.get("layout", "single")
    if options.get("group") is not None and layout not in PARALLEL_LAYOUTS:
        raise ValueError(f"moe_fx: option group is only used by layouts {PARALLEL_LAYOUTS}, but layout={layout!r}")
    placement = options.get("expert_placement")
    if placement is not None:
        if layout not in EP_LAYOUTS:
            raise ValueError(
                f"moe_fx: option expert_placement is only used by layouts {EP_LAYOUTS}, but layout={layout!r}"
            )
        placement = _placement(placement)
    bound = options.get("max_tokens_per_rank", 0)
    if "max_tokens_per_rank" in options:
        if isinstance(bound, bool) or not isinstance(bound, int) or bound <= 0:
            raise ValueError(f"moe_fx: option max_tokens_per_rank={bound!r} must be an int > 0")
        if layout != "ep_alltoall":
            raise ValueError(f"moe_fx: option max_tokens_per_rank bounds layout 'ep_alltoall', but layout={layout!r}")
    return Options(**{**options, "lowerings": lowerings, "expert_placement": placement, "max_tokens_per_rank": bound})
