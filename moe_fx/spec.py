"""The description of one MoE block that every lowering receives.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

`MoESpec` is frozen and hashable: it goes into node meta, registry `supports` checks and caches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SCORINGS = ("softmax", "sigmoid", "none")
ROUTER_ORDERS = ("score_then_topk", "topk_then_score")
ACTIVATIONS = (
    "silu_gated",  # silu(gate) * up
    "gelu_gated",  # gelu(gate) * up
    "gelu_tanh_gated",  # gelu(gate, approximate="tanh") * up
    "clamped_swiglu",  # GPT-OSS: clamp, gate * sigmoid(alpha * gate) * (up + 1)
    "clamped_silu_gated",  # DeepSeek-V4, HY-V4, GLM-5-Next: silu(clamp(gate, max=limit)) * clamp(up, -limit, limit)
    "relu",  # non-gated
    "gelu",
    "gelu_tanh",
    "silu",
    "relu2",  # relu(h) ** 2 (squared ReLU: Nemotron-H)
)
GATED_ACTIVATIONS = ("silu_gated", "gelu_gated", "gelu_tanh_gated", "clamped_swiglu", "clamped_silu_gated")
# the clamped activations clamp the gate at max=limit and the up projection at min=-limit, max=limit
CLAMPED_ACTIVATIONS = ("clamped_swiglu", "clamped_silu_gated")
GATE_UP_LAYOUTS = ("concat", "interleaved", "up_first", "separate")
WEIGHT_PLACEMENTS = ("output", "input")
QUANT_MODES = ("none", "fp8", "fp8_block", "int8", "int4_weight")
LAYOUTS = ("single", "ep_alltoall", "ep_allgather", "tp")


def _check(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"moe_fx: {name}={value!r} is not one of {allowed}")


@dataclass(frozen=True)
class RouterSpec:
    """How router logits [T, E] become (weights_TK fp32, ids_TK int32).

    score_then_topk: w, ids = topk(score(logits + bias?)); w gathered from the unbiased scores.
    topk_then_score: v, ids = topk(logits); w = score(v) (softmax over the K picked).
    n_group/topk_group: group-limited top-k (DeepSeek-V3): groups ranked by the sum of their
    top `group_score_topk` scores, experts outside the `topk_group` best groups are masked: their
    selection value becomes `group_fill` (0.0 in transformers' DeepSeek-V3, -inf in DeepSeek's own
    inference code; the two differ once a bias makes kept experts' values negative).
    capacity: the most (token, slot) picks one expert takes per capacity group (0: no limit; Switch,
    NLLB-MoE). Picks are admitted first choices first, then in token order; a pick past capacity is
    dropped (id -1, weight 0) and contributes nothing. A group is one row of logits [G, S, E] (the
    sequence, for a router that counts per sequence) or all T tokens of logits [T, E].
    """

    k: int
    scoring: str = "softmax"
    order: str = "score_then_topk"
    renormalize: bool = False
    has_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score_topk: int = 2
    group_fill: float = 0.0
    scale: float = 1.0
    score_dtype: str = "float32"  # the dtype the original router's scores are rounded to before top-k
    capacity: int = 0

    def __post_init__(self):
        _check(self.scoring, SCORINGS, "scoring")
        _check(self.score_dtype, ("float32", "bfloat16", "float16"), "score_dtype")
        _check(self.order, ROUTER_ORDERS, "order")
        if self.k < 1:
            raise ValueError(f"moe_fx: router k ({self.k}) must be >= 1")
        if self.capacity < 0:
            raise ValueError(f"moe_fx: router capacity ({self.capacity}) must be >= 0 (0: no limit)")

    def summary(self) -> str:
        parts = [f"{self.scoring}", f"top{self.k}"]
        if self.order == "topk_then_score":
            parts = [f"top{self.k}", self.scoring]
        if self.has_bias:
            parts.insert(1, "+bias")
        if self.n_group > 1:
            rest = f" (others {self.group_fill:g})" if self.group_fill != 0.0 else ""
            parts.append(f"groups {self.topk_group}/{self.n_group}{rest}")
        if self.renormalize:
            parts.append("renorm")
        if self.scale != 1.0:
            parts.append(f"x{self.scale:g}")
        if self.score_dtype != "float32":
            parts.append(f"{self.score_dtype} scores")
        if self.capacity:
            parts.append(f"capacity {self.capacity}")
        return "→".join(parts)


@dataclass(frozen=True)
class ExpertsSpec:
    """The experts' MLP. Canonical weights: w13 [E, 2F, D] (or [E, F, D] non-gated), w2 [E, D, F].

    `w13_transposed` / `w2_transposed` mark [E, D, 2F] / [E, F, D] storage (GPT-OSS).
    `identity_experts` Z: the router also picks among Z zero-computation experts, ids E..E+Z-1, whose output
    is the token itself (LongCat-Flash); `passes/identity_experts.py` says how the rewrite computes them.
    """

    num_experts: int
    hidden: int  # D
    ffn: int  # F
    activation: str = "silu_gated"
    gate_up: str = "concat"
    w13_transposed: bool = False
    w2_transposed: bool = False
    has_w13_bias: bool = False
    has_w2_bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0
    dtype: str = "float32"
    identity_experts: int = 0

    def __post_init__(self):
        _check(self.activation, ACTIVATIONS, "activation")
        _check(self.gate_up, GATE_UP_LAYOUTS, "gate_up")
        if self.identity_experts < 0:
            raise ValueError(f"moe_fx: identity_experts must be >= 0, got {self.identity_experts}")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    def summary(self) -> str:
        bias = "+bias" if self.has_w13_bias or self.has_w2_bias else ""
        layout = "" if not self.gated or self.gate_up == "concat" else f" {self.gate_up}"
        identity = f"+{self.identity_experts} identity" if self.identity_experts else ""
        act = f"{self.activation}(±{self.limit:g})" if self.activation in CLAMPED_ACTIVATIONS else self.activation
        return f"E={self.num_experts}{identity} D={self.hidden} F={self.ffn} {act}{layout}{bias} {self.dtype}"


@dataclass(frozen=True)
class QuantSpec:
    """The quant mode (formats in moe_fx/lowering/quant.py) and whether the unquantised weights stay alive."""

    mode: str = "none"
    keep_original_weights: bool = True

    def __post_init__(self):
        _check(self.mode, QUANT_MODES, "quant")

    def summary(self) -> str:
        """The mode and its scale layout (see moe_fx/lowering/quant.py)."""
        layout = {
            "none": "",
            "fp8": "e4m3; w per channel, a per token",
            "fp8_block": "e4m3; w 128x128 blocks, a 1x128 groups",
            "int8": "w per channel, a per token",
            "int4_weight": "w groups of 128, a unquantised",
        }[self.mode]
        return f"{self.mode} ({layout})" if layout else self.mode


@dataclass(frozen=True)
class MoESpec:
    """Router (None for an opaque router), experts, quantisation, weight placement and layout."""

    experts: ExpertsSpec
    top_k: int
    router: RouterSpec | None = None
    quant: QuantSpec = field(default_factory=QuantSpec)
    weight_placement: str = "output"
    layout: str = "single"
    max_tokens_per_rank: int = 0  # ep_alltoall: > 0 selects the fixed-size (padded) exchange

    def __post_init__(self):
        _check(self.weight_placement, WEIGHT_PLACEMENTS, "weight_placement")
        _check(self.layout, LAYOUTS, "layout")
        if self.max_tokens_per_rank and self.layout != "ep_alltoall":
            raise ValueError(
                f"moe_fx: max_tokens_per_rank={self.max_tokens_per_rank} bounds the ep_alltoall exchange, "
                f"but layout={self.layout!r}"
            )

    def replace(self, **changes) -> MoESpec:
        return dataclasses.replace(self, **changes)

    def routed_drops(self) -> str | None:
        """Why some routed picks reach no expert (token capacity, zero-computation experts), or None."""
        if self.router is not None and self.router.capacity:
            return f"token capacity ({self.router.capacity}, dropped picks)"
        if self.experts.identity_experts:
            return f"{self.experts.identity_experts} zero-computation experts (their picks skip the experts)"
        return None

    def dropped_picks(self) -> str | None:
        """Why dispatch leaves rows past the last expert's group (only lowerings that handle them take this
        spec): the routed drops, or the unused rows of the padded ep_alltoall exchange; None otherwise."""
        drops = self.routed_drops()
        if drops is None and self.max_tokens_per_rank:
            return f"the padded exchange's unused rows (max_tokens_per_rank={self.max_tokens_per_rank})"
        return drops

    def summary(self) -> str:
        router = self.router.summary() if self.router else f"opaque top{self.top_k}"
        weight = " weight@input" if self.weight_placement == "input" else ""
        quant = f" | {self.quant.summary()}" if self.quant.mode != "none" else ""
        return f"{router} | {self.experts.summary()}{weight}{quant}"
