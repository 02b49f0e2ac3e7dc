"""`moe_fx.tune(model, *inputs)`: tune the Triton grouped GEMMs for the MoE blocks of one model.

`explain` finds the blocks; each distinct (E, D, F, K, activation, dtype, quant) that the Triton experts
lowering runs is timed per T-bucket by `lowering/triton/tuner.tune`, and the best configs go to the JSON
tuning cache (MOE_FX_TUNING_CACHE, default ~/.cache/moe_fx/triton_tuning.json) that every later call of
the Triton experts on a GPU of this name reads. Untuned shapes run `tuning.default_config`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from moe_fx.api import explain
from moe_fx.report import Report

log = logging.getLogger("moe_fx")

TOKENS = (1, 16, 128, 1024, 8192)  # one per T-bucket that decode, mixed batches and prefill land in


def tuning_shapes(report: Report) -> list[tuple[int, int, int, int, str, str, str]]:
    """The distinct (E, D, F, K, activation, dtype, quant) of the report's blocks whose experts run on the
    Triton lowering, in order of first appearance."""
    shapes = []
    for block in report.matches:
        if block.lowerings["experts"].name != "triton":
            continue
        if block.spec.layout != "single":  # the kernels would see a rank's share of E (or of F)
            raise ValueError(
                f"moe_fx: tune times the experts on one device (layout 'single'); block {block.module_path} has "
                f"layout={block.spec.layout!r}"
            )
        ex = block.spec.experts
        shape = (ex.num_experts, ex.hidden, ex.ffn, block.spec.top_k, ex.activation, ex.dtype, block.spec.quant.mode)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def _require_gpu() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("moe_fx: tune times the Triton GEMMs on a CUDA GPU, and torch.cuda.is_available() is False")


def tune(model, *args, tokens=TOKENS, options: dict[str, Any] | None = None, candidates=None, **kwargs) -> dict:
    """Tune the Triton experts of every MoE block of `model` (called on these inputs, as for `explain`) at
    each token count in `tokens`; returns {cache key: {"best": µs, "config", "timings", "failed", "wrong"}}
    (`tuner.tune`: "wrong" lists the failed candidates whose output disagreed with the reference).

    `candidates`: the (block_m, block_n, block_k, num_warps, num_stages, tma) tuples to time (default
    `tuner.CANDIDATES`, or `tuner.QUANT_CANDIDATES` under a quant mode). Needs a CUDA GPU: the model's.
    """
    _require_gpu()
    bad = [T for T in tokens if not isinstance(T, int) or T < 1]
    if bad or not tokens:
        raise ValueError(f"moe_fx: tune's tokens must be positive integers, got {tuple(tokens)}")
    report = explain(model, *args, options=options, **kwargs)
    shapes = tuning_shapes(report)
    if not shapes:
        log.warning("moe_fx: no block of %s runs the Triton experts lowering; nothing to tune:\n%s",
                    type(model).__name__, report)  # fmt: skip
        return {}
    from moe_fx.lowering.triton import tuner  # Triton is optional: moe_fx imports without it

    device = next((p.device for p in model.parameters() if p.is_cuda), torch.device("cuda"))
    # None: as the rewrite does on this GPU; it keeps combine under fuse_combine=False or deterministic algorithms
    fused = (options or {}).get("fuse_combine", True) and not torch.are_deterministic_algorithms_enabled()
    reduce = None if fused else False
    results = {}
    for E, D, F, K, activation, dtype, quant in shapes:
        log.info("moe_fx: tuning E=%d D=%d F=%d K=%d %s %s quant=%s at T=%s", E, D, F, K, activation, dtype, quant,
                 list(tokens))  # fmt: skip
        results.update(tuner.tune(E, D, F, K, activation, getattr(torch, dtype), list(tokens), device=device,
                                   quant=quant, candidates=candidates, reduce=reduce))  # fmt: skip
    return results
