"""Grid and block sizes on the host, in plain Python.

Triton's `triton.cdiv` and `triton.next_power_of_2` are constexpr functions (3.9 here), ~2 µs a call on the
host, and a launcher made up to five of them per call (`bench/host_overhead.py --bodies`, bench/NOTES.md).
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as `triton.next_power_of_2` (which gives 0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
