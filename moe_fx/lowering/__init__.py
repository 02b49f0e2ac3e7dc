"""Lowerings: the registry and the implementations it ships (importing registers them)."""

from moe_fx.lowering import reference  # noqa: F401  (registers the reference lowering)
from moe_fx.lowering.registry import register_lowering, select

__all__ = ["register_lowering", "select"]
