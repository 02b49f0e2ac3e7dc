"""Lowerings: the registry and the implementations it ships (importing registers them)."""

from moe_fx.lowering import distributed, reference  # noqa: F401  (importing registers the lowerings)
from moe_fx.lowering.registry import register_lowering, select

__all__ = ["register_lowering", "select"]
