"""passes/experts.py: which bias belongs to which expert weight (by name, never by shape alone)."""

import pytest
import torch

from moe_fx.passes.experts import _bias_for
from moe_fx.passes.weights import Family


def family(name: str, *shape: int) -> Family:
    return Family(name, [], [torch.randn(*shape)], True)


@pytest.mark.parametrize(
    "weight,bias",
    [("experts.*.w1.weight", "experts.*.w1.bias"), ("experts.gate_up_proj", "experts.gate_up_proj_bias"),
     ("parameters_w1", "parameters_b1"), ("w_gate", "b_gate"), ("mlp.weight2", "mlp.bias2"), ("w13", "b13")],
)  # fmt: skip
def test_a_bias_pairs_with_its_weight_by_name(weight, bias):
    others = [family("parameters_b9", 4, 8), family("down_bias", 4, 16)]
    assert _bias_for(family(weight, 4, 8, 16), [*others, family(bias, 4, 8)]).name == bias


def test_equal_shapes_alone_pair_nothing():
    """Zero-initialised biases of one shape give every pairing the same output: a pairing the names do not
    give is never guessed (the block is then refused, not rewritten with b3 as w1's bias)."""
    w1 = family("w1", 4, 8, 8)
    assert _bias_for(w1, [family("b3", 4, 8), family("bias_a", 4, 8)]) is None
    two = [family("mlp.b1", 4, 8), family("mlp.bias1", 4, 8)]
    assert _bias_for(family("mlp.w1", 4, 8, 8), two) is None  # two biases fit the name: neither is taken
