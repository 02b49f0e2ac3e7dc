"""Vendor lowerings: library kernels behind the registry. Each registers only when its dependency imports."""

from moe_fx.lowering.vendor import grouped_mm  # noqa: F401  (registers when torch._grouped_mm exists)
