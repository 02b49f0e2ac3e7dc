"""The host-side size helpers agree with Triton's own."""

import triton

from moe_fx.lowering.triton.sizes import cdiv, next_power_of_2


def test_next_power_of_2_matches_triton():
    for n in [*range(0, 2100), 2**20 - 1, 2**20, 2**20 + 1, 2**31 + 5]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_matches_triton():
    for a in range(0, 600, 7):
        for b in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
