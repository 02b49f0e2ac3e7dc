"""The bf16 int4 unpack's inline PTX (`gemm_tiles._UNPACK_INT4_BF16`) runs only on a GPU; here its text runs
through a model of each PTX instruction it uses (the semantics of the PTX ISA: prmt's byte selectors, lop3's
truth table, packed bf16 fma), on every byte value in every position of the 32-bit register, against the int4
format of `quant.unpack_int4`. The GPU tests run the same unpack through the kernels
(`test_triton_experts_quant.py::test_int4_every_byte_value`)."""

import struct

import pytest
import torch

from moe_fx.lowering import quant
from moe_fx.lowering.triton import gemm_tiles

MASK = 0xFFFFFFFF


def prmt(a: int, b: int, c: int) -> int:
    """Byte permute: byte i of the result is byte (c's nibble i & 7) of {b, a} (a's bytes 0-3, b's 4-7); a
    selector with bit 3 set replicates that byte's sign bit instead."""
    pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> 4 * i) & 0xF
        byte = pool[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """Bitwise three-input function: bit k is lut's bit (a_k·4 + b_k·2 + c_k)."""
    out = 0
    for k in range(32):
        idx = ((a >> k) & 1) << 2 | ((b >> k) & 1) << 1 | (c >> k) & 1
        out |= ((lut >> idx) & 1) << k
    return out


def bf16(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def bf16_bits(value: float) -> int:
    return torch.tensor([value], dtype=torch.float64).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF


def fma_bf16x2(a: int, b: int, c: int) -> int:
    """Two bf16 a·b + c, each rounded once to bf16 (the operands here keep every product and sum exact)."""
    halves = [bf16_bits(bf16(a >> s) * bf16(b >> s) + bf16(c >> s)) for s in (0, 16)]
    return halves[0] | halves[1] << 16


INSTRUCTIONS = {
    "mov.b32": lambda a: a,
    "prmt.b32": prmt,
    "shr.u32": lambda a, n: a >> n,
    "lop3.b32": lop3,
    "fma.rn.bf16x2": fma_bf16x2,
    "xor.b32": lambda a, b: a ^ b,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
}


def run_ptx(text: str, registers: dict) -> dict:
    """Run PTX text (one instruction per line, `.reg` declarations, braces) on registers {"$4": word, ...}."""
    regs = dict(registers)
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dest, *sources = (t.strip() for t in rest.split(","))
        assert op in INSTRUCTIONS, f"no model of {op}"
        values = [regs[t] if t in regs else int(t, 0) for t in sources]
        regs[dest] = INSTRUCTIONS[op](*values) & MASK
    return regs


@pytest.mark.parametrize("position", range(4))
def test_every_byte_value_in_every_position(position):
    text = gemm_tiles._UNPACK_INT4_BF16.value
    rng = torch.Generator().manual_seed(position)
    for value in range(256):
        word = torch.randint(0, 256, (4,), generator=rng)
        word[position] = value
        regs = run_ptx(text, {"$4": sum(int(b) << 8 * i for i, b in enumerate(word))})
        q = quant.unpack_int4(word.to(torch.uint8).view(4, 1), 2).tolist()  # [[low, high]] per byte
        # $0, $1: the low nibbles of bytes (0, 1), (2, 3), as bf16 pairs (element 0 in the low half); $2, $3 the high
        got = [bf16(regs[f"${r}"] >> s) for r in range(4) for s in (0, 16)]
        want = [q[0][0], q[1][0], q[2][0], q[3][0], q[0][1], q[1][1], q[2][1], q[3][1]]
        assert got == want, (value, position, got, want)


def test_model_of_the_instructions():
    """The model itself, on cases worked by hand from the PTX ISA's definitions."""
    assert prmt(0x44332211, 0x88776655, 0x4140) == 0x55225511  # bytes: a.0, b.0, a.1, b.0
    assert prmt(0x000000F0, 0, 0x0008) == 0xF0F0F0FF  # selector 8: byte 0's sign, replicated; 0: byte 0
    assert lop3(0xF0, 0xCC, 0xAA, 0x6A) == 0x6A
    assert fma_bf16x2(0x43014300, 0x3F803F80, 0xC308C308) == bf16_bits(-8.0) | bf16_bits(-7.0) << 16  # 128, 129 - 136
