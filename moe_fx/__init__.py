"""moe_fx: find naive Mixture-of-Experts blocks in any model graph and rewrite them into
route -> quantize_dispatch -> experts -> combine, lowered through a device/layout registry."""

from moe_fx import examples, ops  # noqa: F401  (ops registers the moe_fx:: custom ops)
from moe_fx.api import apply, explain
from moe_fx.autotune import tune
from moe_fx.lowering import register_lowering
from moe_fx.lowering.distributed import expert_load, reset_expert_load
from moe_fx.report import Report
from moe_fx.spec import ExpertsSpec, MoESpec, QuantSpec, RouterSpec

__all__ = [
    "ExpertsSpec",
    "MoESpec",
    "QuantSpec",
    "Report",
    "RouterSpec",
    "apply",
    "expert_load",
    "explain",
    "register_lowering",
    "reset_expert_load",
    "tune",
]
