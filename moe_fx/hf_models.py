"""Tiny HuggingFace transformers MoE models, built from configs in code with random weights.

One table, `ARCHITECTURES`, names every MoE architecture moe_fx is tested on. The tests, the demo,
`python -m moe_fx inspect --hf NAME` and the supported-models list in the docs all read it.
Nothing is downloaded: each model is `cls(config)` with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

# Sizes every tiny model shares; an architecture's own entries override them.
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@dataclass(frozen=True)
class Architecture:
    """How to build one tiny model: the config and model class names in `transformers`, and overrides."""

    config: str
    model: str
    overrides: dict = field(default_factory=dict)
    moe_blocks: int = 2  # MoE blocks the tiny model holds (all must be rewritten)
    notes: str = ""


ARCHITECTURES: dict[str, Architecture] = {
    "mixtral": Architecture(
        "MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    ),
    "qwen2_moe": Architecture(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=2,
            intermediate_size=96,
        ),
        notes="shared expert with a sigmoid gate, left as ordinary nodes",
    ),
    "olmoe": Architecture(
        "OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2)
    ),
}


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the message is the point
        raise ImportError("moe_fx: tiny HuggingFace models need transformers: pip install 'moe_fx[hf]'") from e
    return transformers


def build(name: str, experts_implementation: str | None = "grouped_mm", **overrides) -> nn.Module:
    """A tiny `name` model in eval mode with random weights. `experts_implementation`: grouped_mm |
    batched_mm | eager (None keeps the model's default)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"moe_fx: unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    transformers = _transformers()
    config = getattr(transformers, arch.config)(**{**COMMON, **arch.overrides, **overrides})
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    return getattr(transformers, arch.model)(config).eval()
