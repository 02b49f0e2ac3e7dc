"""bench/ptx_stats.py compiles the experts' kernels for sm90 on a machine without a GPU: a 16-row decode tile
reaches Hopper's wgmma only with the dot's operands swapped (it runs Ampere's mma.sync otherwise), and the int4
unpack has no int-to-float conversion; `--sass` reads the cubin (registers, occupancy, the main loop's SASS). Run
in a subprocess: the tests' kernels are interpreted, not compiled."""

import json
import re

import pytest

from tests.bench.scripts import BENCH, run_compiled


@pytest.mark.parametrize("quant", ["none", "int4_weight"])
@pytest.mark.parametrize("swap", [False, True])
def test_decode_tile_reaches_wgmma_when_swapped(quant, swap):
    out = ptx_stats("--quant", quant, "--tile", "16", "64", "128", "4", "3", *["--swap"] * swap)
    lines = [line for line in out.splitlines() if " sm90 " in line]
    assert [line.split()[0] for line in lines] == ["_up_kernel", "_down_kernel"], out.stdout
    for line in lines:
        count = {name: int(n) for name, n in re.findall(r"(wgmma|mma\.sync|int->float cvt) (\d+)", line)}
        assert (count["wgmma"] > 0) == swap and (count["mma.sync"] > 0) == (not swap), line
        assert count["int->float cvt"] == 0, line


@pytest.mark.parametrize(
    "quant,swap,mma",
    [("int4_weight", False, "HMMA"), ("fp8", True, "QGMMA"), ("fp8", False, "HMMA")],
)  # fmt: skip
def test_sass_reads_registers_occupancy_and_the_main_loop(quant, swap, mma):
    """The main loop is found by its MMAs (Hopper's wgmma is HGMMA / QGMMA / IGMMA in SASS); fp8 operands reach
    e4m3 wgmma swapped, and a 16-row fp8 tile's mma.sync takes them converted to 16 bits (F2FP)."""
    out = ptx_stats(
        "--quant", quant, "--tile", "16", "64", "128", "4", "3", "--sass", "--top", "100", *["--swap"] * swap
    )
    sass = re.findall(
        r"sass: (\d+) registers, (\d+) B shared, (\d+) blocks per SM, (\d+) B stack; "
        r"main loop (\d+) instructions per warp: (.*)",
        out,
    )
    assert len(sass) == 2, out  # up, down
    for regs, shared, blocks, stack, loop, mix in sass:
        assert 0 < int(regs) <= 255 and int(shared) > 0 and 1 <= int(blocks) <= 32 and int(loop) > 0, out
        assert int(stack) == 0, out  # no decode tile spills
        ops = dict(re.findall(r"(\w+) (\d+)", mix))
        assert mma in ops, mix
        if quant == "fp8":  # the activations reach the down GEMM in fp8 too
            assert ("F2FP" in ops) == (not swap), mix


def ptx_stats(*args: str) -> str:
    return run_compiled(str(BENCH / "ptx_stats.py"), *args)


def test_table_rows_for_a_before_and_after_diff(tmp_path):
    """--table compiles both kernels of the listed configs (filtered) and writes one row per kernel."""
    out = ptx_stats("--table", "int4_weight 16x64x128", "--json", str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["kernel"] for r in rows] == ["_up_kernel", "_down_kernel"], out
    for r in rows:
        assert r["config"] == "int4_weight 16x64x128 w4 s4" and r["loop"] > 0 and 1 <= r["blocks_per_sm"] <= 32
        assert f"| {r['config']} | {r['kernel']} | {r['regs']} |" in out


def test_a_fused_config_compiles_one_kernel_with_the_down_gemm():
    """`--fused`: the experts op is one kernel (`ExpertsConfig.fused`), its up tile's epilogue running the down
    GEMM's F-slice, so it issues more MMAs than the up kernel of the same tile alone."""
    mma = {}
    for flags in ((), ("--fused",)):
        out = ptx_stats("--tile", "16", "64", "128", "4", "4", "--tma", *flags)
        kernels = [line.split()[0] for line in out.splitlines() if " sm90 " in line]
        assert kernels == (["_up_kernel"] if flags else ["_up_kernel", "_down_kernel"]), out
        mma[flags] = int(re.search(r"mma\.sync (\d+)", out).group(1))  # the first line: the up kernel
    assert mma[("--fused",)] > mma[()]


def test_the_routing_decode_kernel_compiles_like_the_fused_one():
    """--fused --routed: Qwen3's shipped T=1 tile, each program routing its own pick (`routed_experts`), compiles
    for sm90 to one kernel with the fused kernel's shared memory and occupancy, no spills, and the route's
    reductions within each warp (a copy per warp: warp reductions, no barrier more than the fused kernel's, which
    finds its rows by the expert offsets instead) beside the same MMAs."""
    shape = ("--shape", "128", "8", "2048", "768", "--tile", "16", "64", "128", "4", "4", "--tma", "--fused", "--sass")
    stats = {}
    for routed in (False, True):
        out = ptx_stats(*shape, *["--routed"] * routed, "--top", "100")
        (line,) = [line for line in out.splitlines() if " sm90 " in line]
        (sass,) = re.findall(r"sass: (\d+) registers, (\d+) B shared, (\d+) blocks per SM, (\d+) B stack", out)
        stats[routed] = dict(line=line, sass=[int(n) for n in sass], out=out)
    fused, routed = stats[False], stats[True]
    assert fused["line"].split()[0] == routed["line"].split()[0] == "_up_kernel", routed["out"]
    assert routed["sass"][1:] == fused["sass"][1:] and routed["sass"][3] == 0, (fused["sass"], routed["sass"])
    assert re.search(r"mma\.sync (\d+)", routed["line"])[1] == re.search(r"mma\.sync (\d+)", fused["line"])[1]
    assert "redux.sync.max" in routed["out"]  # the top-k rounds: one warp reduction each

    def barriers(out):
        return int(re.search(r"bar\.sync (\d+)", out)[1])

    assert barriers(routed["out"]) <= barriers(fused["out"]), (barriers(routed["out"]), barriers(fused["out"]))
