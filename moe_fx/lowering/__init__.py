"""Lowerings: the registry and the implementations it ships (importing registers them).

The Triton lowerings register for ("cuda", "single") when triton imports; `distributed` registers the
parallel layouts' dispatch/combine; nothing here touches a GPU.
"""

import logging

from moe_fx.lowering import distributed, reference, vendor  # noqa: F401  (register their lowerings)
from moe_fx.lowering.registry import register_lowering, select

try:
    from moe_fx.lowering import triton  # noqa: F401  (registers the Triton lowerings)
except ImportError as err:  # triton is a dependency, but a broken install must not break the CPU path
    logging.getLogger("moe_fx").warning("moe_fx: Triton lowerings not registered (%s); pip install triton", err)

__all__ = ["register_lowering", "select"]
