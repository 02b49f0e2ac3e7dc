"""Registration and selection of the Triton and vendor lowerings; the JSON tuning cache."""

import json
import logging
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

from moe_fx.lowering import registry
from moe_fx.lowering import triton as triton_lowering
from moe_fx.lowering.triton import tuner, tuning
from moe_fx.spec import ExpertsSpec, MoESpec, QuantSpec, RouterSpec
from tests.lowering.triton.conftest import DEVICE

SPEC = MoESpec(ExpertsSpec(8, 64, 96, dtype="bfloat16"), 2, router=RouterSpec(2, renormalize=True))


def test_cuda_picks_triton_for_every_op():
    for op in registry.OPS:
        sel = registry.select(op, "cuda", SPEC)
        assert sel.chosen.name == "triton", op
        assert "highest priority (20)" in sel.reason


def test_unsupported_specs_fall_back_with_reasons():
    modes = "('fp8', 'fp8_block', 'int8', 'int4_weight')"
    assert triton_lowering.supports_quant("w4a8") == f"quant='w4a8' is not implemented by triton (it runs {modes})"
    groups = SPEC.replace(router=RouterSpec(2, scoring="sigmoid", n_group=3, topk_group=1))
    sel = registry.select("route", "cuda", groups)
    assert sel.chosen.name == "reference" and sel.rejected == (("triton", "experts (8) not divisible by n_group (3)"),)


def test_token_capacity_routes_on_the_reference_and_the_rest_stays_triton():
    """Capacity is counted by the reference route only; Triton dispatch, experts and combine take the dropped
    picks (after every group, zeros); grouped_mm cannot (rows past its last group are left unwritten)."""
    capped = SPEC.replace(router=RouterSpec(2, capacity=4))
    sel = registry.select("route", "cuda", capped)
    assert sel.chosen.name == "reference"
    assert dict(sel.rejected)["triton"] == "token capacity (4) is not implemented by triton route"
    for op in ("quantize_dispatch", "experts", "combine"):
        assert registry.select(op, "cuda", capped).chosen.name == "triton", op
    assert "token capacity" in registry.lookup("experts", "grouped_mm").supports(capped)


@pytest.mark.parametrize("mode,capability,chosen", [("fp8", (9, 0), "triton"), ("fp8_block", (9, 0), "triton"),
                                                    ("fp8_block", (8, 6), "reference"),
                                                    ("fp8", (8, 6), "reference"), ("int8", (8, 0), "triton"),
                                                    ("int8", (7, 5), "reference"), ("int4_weight", (8, 0), "triton"),
                                                    ("int4_weight", (7, 5), "reference")])  # fmt: skip
def test_quantised_specs_need_the_tensor_cores_of_their_mode(monkeypatch, mode, capability, chosen):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    spec = SPEC.replace(quant=QuantSpec(mode))
    for op in ("quantize_dispatch", "experts"):
        sel = registry.select(op, "cuda", spec)
        assert sel.chosen.name == chosen
        if chosen == "reference":
            need, cores = ("8.9", "fp8") if mode.startswith("fp8") else ("8.0", mode.replace("int4_weight", "bf16"))
            have = f"{capability[0]}.{capability[1]}"
            assert dict(sel.rejected)["triton"] == (
                f"quant={mode!r} needs compute capability >= {need} ({cores} tensor cores), this device has {have}"
            )


def test_quantised_specs_without_cuda_name_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sel = registry.select("experts", "cuda", SPEC.replace(quant=QuantSpec("int8")))
    assert dict(sel.rejected)["triton"] == "quant='int8' needs a CUDA device, none is available"


def test_vendor_grouped_mm_is_a_real_choice():
    names = [e.name for e in registry.candidates("experts", "cuda", "single")]
    assert names[:2] == ["triton", "grouped_mm"]
    fp32 = SPEC.replace(experts=ExpertsSpec(8, 64, 96, dtype="float32"))
    with pytest.raises(ValueError, match="'grouped_mm' cannot run experts for this block: torch._grouped_mm runs"):
        registry.select("experts", "cuda", fp32, force="grouped_mm")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="grouped_mm' cannot run experts for this block: no CUDA device"):
            registry.select("experts", "cuda", SPEC, force="grouped_mm")


def test_import_registers_without_touching_the_gpu():
    code = "import torch, moe_fx; from moe_fx.lowering import registry; "
    code += "assert registry.lookup('experts', 'triton'); assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tuning_cache_is_json_per_t_bucket(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    shape = (8, 64, 96, 2, True, torch.bfloat16)
    tuned = tuning.ExpertsConfig(tuning.GemmConfig(32, 64, 64, 4, 4, 2), tuning.GemmConfig(16, 32, 128, 1, 4, 5))
    tuning.store(tuning.key(*shape, "cpu", 16), tuned, {"best": 1.0})
    assert '"block_m": 32' in (tmp_path / "tuning.json").read_text()
    assert tuning.choose(*shape, torch.device("cpu"), 13 * 2) == tuned  # T=13 is in the T=16 bucket
    untuned = tuning.choose(*shape, torch.device("cpu"), 8192 * 2)
    assert untuned == tuning.default_config(8192 * 2 / 8, torch.bfloat16) != tuned  # never reused at another T
    (tmp_path / "tuning.json").write_text("{not json")
    tuning._lookup.cache_clear()
    tuning._choose.cache_clear()
    assert tuning.choose(*shape, torch.device("cpu"), 26) == tuning.default_config(26 / 8, torch.bfloat16)


def test_a_fused_entry_reads_back_fused(tmp_path, monkeypatch):
    """A tuned fused config (the down GEMM in the up tile's epilogue) is stored with "fused" and chosen as such;
    entries without the field (every one tuned before it) read as two GEMMs."""
    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    shape = (8, 64, 96, 2, True, torch.bfloat16)
    gemm = tuning.GemmConfig(16, 32, 128, 8, 4, 4, swap_ab=True)
    fused = tuning.ExpertsConfig(gemm, tuning.GemmConfig(16, 256, 128), fused=True)
    tuning.store(tuning.key(*shape, "cpu", 1), fused, {"best": 1.0})
    tuning.store(tuning.key(*shape, "cpu", 2), tuning.ExpertsConfig(gemm, gemm), {"best": 1.0})
    assert '"fused": true' in (tmp_path / "tuning.json").read_text()
    assert tuning.choose(*shape, torch.device("cpu"), 2) == fused
    assert not tuning.choose(*shape, torch.device("cpu"), 4).fused
    assert tuning.describe(fused) == "up 16x32x128 w4 s4 swap | fused down 256-wide"


def test_tuned_entry_of_a_device_with_the_same_capability_stands_in(tmp_path, monkeypatch):
    """An H200 with no entry of its own takes the H100's (both sm90), never an sm80 device's; its own wins."""
    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    names = {"h100": "NVIDIA_H100_80GB_HBM3", "h200": "NVIDIA_H200", "a100": "NVIDIA_A100"}
    caps = {"h100": [9, 0], "h200": [9, 0], "a100": [8, 0]}
    device = {"now": "h200"}
    monkeypatch.setattr(tuning, "device_name", lambda d: names[device["now"]])
    monkeypatch.setattr(tuning, "capability", lambda d: caps[device["now"]])
    monkeypatch.setattr(tuning, "sm_count", lambda d: None)  # the untuned default as is, on a GPU too
    shape = (8, 64, 96, 2, True, torch.bfloat16)
    fp8_h100 = tuning.ExpertsConfig(tuning.GemmConfig(16, 64, 256), tuning.GemmConfig(16, 64, 256))
    tuning.store(tuning.key(*shape, names["h100"], 16, "fp8"), fp8_h100, {"best": 1.0}, caps["h100"])
    assert tuning.choose(*shape, torch.device("cuda"), 16 * 2, "fp8") == fp8_h100
    untuned = tuning.default_config(16 * 2 / 8, torch.bfloat16)
    assert tuning.choose(*shape, torch.device("cuda"), 16 * 2) == untuned  # "…-bfloat16-" heads fp8 keys too
    h100 = tuning.ExpertsConfig(tuning.GemmConfig(32, 64, 64), tuning.GemmConfig(16, 32, 128))
    tuning.store(tuning.key(*shape, names["h100"], 16), h100, {"best": 1.0}, caps["h100"])
    cuda = torch.device("cuda")
    assert tuning.choose(*shape, cuda, 16 * 2) == h100
    assert tuning.choose(*shape, cuda, 1024 * 2) == tuning.default_config(1024 * 2 / 8, torch.bfloat16)  # other T
    device["now"] = "a100"
    tuning._choose.cache_clear()  # choose() caches per torch.device: here one name stands for several GPUs
    assert tuning.choose(*shape, cuda, 16 * 2) == tuning.default_config(16 * 2 / 8, torch.bfloat16)
    device["now"] = "h200"
    tuning._choose.cache_clear()
    own = tuning.ExpertsConfig(tuning.GemmConfig(64, 64, 64), tuning.GemmConfig(64, 64, 64))
    tuning.store(tuning.key(*shape, names["h200"], 16), own, {"best": 1.0}, caps["h200"])
    assert tuning.choose(*shape, cuda, 16 * 2) == own


def test_int8_runs_fp8_entries_where_it_has_none(tmp_path, monkeypatch):
    """int8 (no shipped entries) takes the same shape's fp8 entry, the same one-byte tiles; its own entry wins;
    the report says whose entries they are; bf16 never takes them."""
    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "PACKAGED", tmp_path / "shipped.json")
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "device_name", lambda d: "NVIDIA_H100_80GB_HBM3")
    monkeypatch.setattr(tuning, "capability", lambda d: [9, 0])
    monkeypatch.setattr(tuning, "sm_count", lambda d: None)
    shape, cuda = (8, 64, 96, 2, True, torch.bfloat16), torch.device("cuda")
    fp8 = tuning.ExpertsConfig(tuning.GemmConfig(16, 64, 256, swap_ab=True), tuning.GemmConfig(16, 512, 128), True)
    tuning.store(tuning.key(*shape, "NVIDIA_H100_80GB_HBM3", 1, "fp8"), fp8, {"best": 1.0}, [9, 0])
    assert tuning.choose(*shape, cuda, 2, "int8") == fp8
    assert tuning.choose(*shape, cuda, 2) == tuning.default_config(2 / 8, torch.bfloat16)
    assert tuning.tuned_buckets(*shape, cuda, "int8") == {1: "NVIDIA_H100_80GB_HBM3, fp8's entry"}
    note = tuning.tiles_note(*shape, cuda, "int8")
    assert note.startswith("Triton tiles tuned for T-buckets 1 (fp8 entries, this GPU)")
    own = tuning.ExpertsConfig(tuning.GemmConfig(16, 32, 256), tuning.GemmConfig(16, 64, 256))
    tuning.store(tuning.key(*shape, "NVIDIA_H100_80GB_HBM3", 1, "int8"), own, {"best": 1.0}, [9, 0])
    tuning._choose.cache_clear()
    assert tuning.choose(*shape, cuda, 2, "int8") == own
    assert tuning.tuned_buckets(*shape, cuda, "int8") == {1: "NVIDIA_H100_80GB_HBM3"}


def test_tiles_note_names_the_tuned_buckets_and_whose_entries_they_are(tmp_path, monkeypatch):
    """The report's line: this GPU's own buckets, a same-capability device's stand-ins, never another quant
    mode's (an fp8 key shares the bf16 head), and what untuned means."""
    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "PACKAGED", tmp_path / "shipped.json")
    monkeypatch.setattr(tuning, "device_name", lambda d: "NVIDIA_H200")
    monkeypatch.setattr(tuning, "capability", lambda d: [9, 0])
    shape, cuda = (8, 64, 96, 2, True, torch.bfloat16), torch.device("cuda")
    assert tuning.tiles_note(*shape, cuda) == (
        "Triton tiles untuned on NVIDIA_H200: every T runs the defaults; moe_fx.tune(model, x) tunes them"
    )
    c = tuning.ExpertsConfig(tuning.GemmConfig(16, 64, 128), tuning.GemmConfig(16, 64, 128))
    h100 = "NVIDIA_H100_80GB_HBM3"
    for device, T, quant, cap in [("NVIDIA_H200", 1, "none", [9, 0]), ("NVIDIA_H200", 16, "none", [9, 0]),
                                  (h100, 16, "none", [9, 0]),  # the H200's own wins
                                  (h100, 1024, "none", [9, 0]), ("NVIDIA_A100", 8192, "none", [8, 0]),
                                  ("NVIDIA_H200", 128, "fp8", [9, 0])]:  # fmt: skip
        tuning.store(tuning.key(*shape, device, T, quant), c, {"best": 1.0}, cap)
    assert tuning.tuned_buckets(*shape, cuda) == {1: "NVIDIA_H200", 16: "NVIDIA_H200", 1024: "NVIDIA_H100_80GB_HBM3"}
    assert tuning.tuned_buckets(*shape, cuda, "fp8") == {128: "NVIDIA_H200"}
    assert tuning.tiles_note(*shape, cuda) == (
        "Triton tiles tuned for T-buckets 1, 16 (this GPU); 1024 (stand-in: NVIDIA_H100_80GB_HBM3, same capability); "
        "other T run the defaults (moe_fx.tune tunes them)"
    )
    tuning.store(tuning.key(*shape, "NVIDIA_H200", 1), replace(c, fused=True), {"best": 1.0}, [9, 0])
    assert tuning.tiles_note(*shape, cuda).endswith(
        "(moe_fx.tune tunes them); T-buckets 1: one fused kernel (where experts sums the rows)"
    )


def test_shipped_entries_name_their_capability():
    entries = json.loads(tuning.PACKAGED.read_text())
    assert entries and all(e["capability"] == [9, 0] for e in entries.values())


def test_shipped_fused_entries_run_fused_with_their_modes_block_width():
    """A fused entry (set by hand from measurements, bench/NOTES.md) is for a mode that runs fused, a decode tile,
    and w2's column blocks of its mode's width: an entry the experts op would not run as written is an error."""
    from moe_fx.lowering.triton.grouped_gemm import QUANT_CODES

    entries = json.loads(tuning.PACKAGED.read_text())
    fused = {key: tuning.entry_config(e) for key, e in entries.items() if e.get("fused")}
    assert fused  # Qwen3 and GPT-OSS at T=1, bf16 and fp8 (H100)
    for key, config in fused.items():
        quant = next((q for q in QUANT_CODES if f"-{q}-" in key), "none")
        assert tuning.runs_fused(quant) and config.up.block_m <= tuner.FUSED_MAX_BLOCK_M, key
        assert config.down.block_n == tuning.FUSED_BLOCK_D[quant], key


def test_tuning_key_names_the_quant_mode_and_fp8_block_configs_conform(monkeypatch):
    shape = (8, 64, 96, 2, True, torch.bfloat16, "cpu", 16)
    assert tuning.key(*shape) == "E8-D64-F96-K2-gated-bfloat16-cpu-T16"
    assert tuning.key(*shape, "fp8_block") == "E8-D64-F96-K2-gated-bfloat16-fp8_block-cpu-T16"
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    for rows in (1, 50, 1000):
        c = tuning.default_config(rows, torch.bfloat16, "fp8_block")
        assert c.up.block_n == 128 and c.up.block_k <= 128 and c.down.block_k <= 128
    wide = tuning.ExpertsConfig(tuning.GemmConfig(16, 64, 256), tuning.GemmConfig(16, 64, 256))
    assert tuning.conform(wide, "fp8") == wide
    assert tuning.conform(wide, "fp8_block") == tuning.ExpertsConfig(
        tuning.GemmConfig(16, 128, 128), tuning.GemmConfig(16, 64, 128)
    )


def test_untuned_decode_narrows_its_n_tiles_until_the_sms_are_busy(tmp_path, monkeypatch):
    """GPT-OSS at T=1 (4 rows on 4 of 32 experts, F = D = 2880) has 4·23 = 92 working programs per GEMM at
    BLOCK_N=128: a 132-SM GPU takes BLOCK_N=64 (180). Prefill and tuned entries stay as they are."""
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    E, D, F, K = 32, 2880, 2880, 4
    decode = tuning.default_config(4 / E, torch.bfloat16)
    assert decode.up.block_n == decode.down.block_n == 128
    # bf16's up GEMM swaps its operands at decode (measured faster on an H200), int4_weight's does not (mixed)
    assert decode.up.swap_ab and not tuning.default_config(4 / E, torch.bfloat16, "int4_weight").up.swap_ab
    # the one-byte modes' decode tiles stay unswapped (fp8's swapped tile is a tuning candidate; fp8_block never
    # swaps: its swapped rescale was wrong on an H100)
    swapped = {q: tuning.default_config(4 / E, torch.bfloat16, q) for q in ("fp8", "int8", "fp8_block")}
    assert {q: (c.up.swap_ab, c.down.swap_ab) for q, c in swapped.items()} == dict.fromkeys(swapped, (False, False))
    forced = tuning.ExpertsConfig(*(replace(c, swap_ab=True) for c in (decode.up, decode.down)))
    assert not tuning.conform(forced, "fp8_block").up.swap_ab and not tuning.conform(forced, "fp8_block").down.swap_ab
    spread = tuning.spread(decode, E, D, F, 4, sms=132)
    assert (spread.up.block_n, spread.down.block_n) == (64, 64)
    assert spread == tuning.ExpertsConfig(replace(decode.up, block_n=64), replace(decode.down, block_n=64))
    assert tuning.spread(decode, E, D, F, 4, sms=80) == decode  # 92 programs already fill 80 SMs
    assert tuning.spread(tuning.default_config(8 / 128, torch.bfloat16), 128, 2048, 768, 8, 132).up.block_n == 32
    prefill = tuning.default_config(8192 * K / E, torch.bfloat16)
    assert tuning.spread(prefill, E, D, F, 8192 * K, sms=132) == prefill
    # bf16 prefill tiles run persistent TMA programs (measured faster on an H100); int4's and fp8's do not (untimed,
    # mixed)
    assert prefill.up.persistent and prefill.down.persistent and prefill.up.tma
    for quant in ("int4_weight", "fp8"):
        assert not tuning.default_config(8192 * K / E, torch.bfloat16, quant).up.persistent
    # Mixtral at T=1 (2 experts, D=4096: 128 down programs at BLOCK_N=64): a swapped fp8 down tile keeps 64 rows
    # (wgmma's), its gated up tile may go to 32 columns (64 weight rows); unswapped tiles narrow to 32
    unswapped_fp8 = tuning.default_config(2 / 8, torch.bfloat16, "fp8")
    fp8 = tuning.ExpertsConfig(*(replace(c, swap_ab=True) for c in (unswapped_fp8.up, unswapped_fp8.down)))
    narrowed = tuning.spread(fp8, 8, 4096, 14336, 2, sms=132)
    assert (narrowed.up.block_n, narrowed.down.block_n) == (64, 64)  # 2·224 up programs: no narrowing
    assert tuning.spread(fp8, 8, 4096, 1024, 2, sms=132).up.block_n == 32  # 2·16 up programs: 64 weight rows
    assert tuning.spread(fp8, 8, 4096, 1024, 2, sms=132, gated=False).up.block_n == 64
    unswapped = tuning.default_config(2 / 8, torch.bfloat16, "int8")
    assert tuning.spread(unswapped, 8, 4096, 14336, 2, sms=132).down.block_n == 32

    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "device_name", lambda d: "SOME_GPU")
    monkeypatch.setattr(tuning, "capability", lambda d: [8, 6])  # no shipped entry stands in
    monkeypatch.setattr(tuning, "sm_count", lambda d: 132)
    tuning._choose.cache_clear()
    cuda = torch.device("cuda")
    assert tuning.choose(E, D, F, K, True, torch.bfloat16, cuda, 4) == spread
    fp8_block = tuning.choose(E, D, F, K, True, torch.bfloat16, cuda, 4, "fp8_block")
    assert fp8_block.up.block_n == 128 and fp8_block.down.block_n == 64  # conformed: one 128-wide group per tile
    tuned = tuning.ExpertsConfig(tuning.GemmConfig(16, 128, 128), tuning.GemmConfig(16, 128, 128))
    tuning.store(tuning.key(E, D, F, K, True, torch.bfloat16, "SOME_GPU", 1), tuned, {"best": 1.0}, [8, 6])
    assert tuning.choose(E, D, F, K, True, torch.bfloat16, cuda, 4) == tuned
    tuning._choose.cache_clear()


def test_confirm_ranks_by_median_of_rotated_rounds():
    """tuner.confirm times each config once per round, each round in an order rotated by one, and keeps the
    lowest median: a GPU that slows down as it runs (later timings longer) does not decide the pick."""
    drift = iter(range(100))
    speed = {"a": 10.0, "b": 9.0, "c": 11.0}  # "b" is the fastest
    order = []

    def time_one(c):
        order.append(c)
        return speed[c] + 0.5 * next(drift)  # every timing 0.5 µs slower than the one before

    best, medians = tuner.confirm(["a", "b", "c"], time_one, rounds=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert best == "b" and set(medians) == {"a", "b", "c"}
    assert medians["b"] == 9.0 + 0.5 * 3  # b ran at positions 1, 3, 8: median 3


@pytest.mark.parametrize("dtype,capability,reduces", [("bfloat16", (9, 0), True), ("bfloat16", (8, 0), False),
                                                      ("float16", (8, 0), True),
                                                      ("float32", (7, 5), True)])  # fmt: skip
def test_the_sum_in_experts_needs_native_atomics_of_the_dtype(monkeypatch, dtype, capability, reduces):
    """bf16 atomic adds are native from sm90 (a compare-and-swap loop per element before): Triton's experts does
    combine's sum there and for fp16/fp32 everywhere; elsewhere the block keeps its combine node."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    spec = SPEC.replace(experts=replace(SPEC.experts, dtype=dtype))
    assert registry.select("experts", "cuda", spec).chosen.reduces_for(spec) is reduces


@pytest.fixture
def h200_cache(tmp_path, monkeypatch):
    """`choose` as on an H200 (sm90, SM count not asked), reading the returned cache file and no shipped entries;
    in the interpreter the kernels still run on the CPU."""
    cache = tmp_path / "tuning.json"
    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(cache))
    monkeypatch.setattr(tuning, "PACKAGED", tmp_path / "shipped.json")
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "device_name", lambda d: "NVIDIA_H200")
    monkeypatch.setattr(tuning, "capability", lambda d: [9, 0])
    monkeypatch.setattr(tuning, "sm_count", lambda d: None)
    return cache


def test_an_entry_this_version_cannot_read_is_skipped_with_a_warning(h200_cache, caplog):
    """A cache entry written by another moe_fx version (a GemmConfig field it no longer has, a missing GEMM) is
    not this version's config: `choose` warns, names the entry, and takes the next one (the shipped entry, a
    stand-in, the defaults) instead of failing every call of the model."""
    shape, cuda = (8, 64, 96, 2, True, torch.bfloat16), torch.device("cuda")
    good = tuning.ExpertsConfig(tuning.GemmConfig(32, 64, 64), tuning.GemmConfig(16, 32, 128))
    tuning.store(tuning.key(*shape, "NVIDIA_H100_80GB_HBM3", 16), good, {"best": 1.0}, [9, 0])  # a stand-in
    stale, broken = tuning.key(*shape, "NVIDIA_H200", 16), tuning.key(*shape, "NVIDIA_H200", 1024)
    data = json.loads(h200_cache.read_text())
    data[stale] = {"up": {**asdict(good.up), "half_tails": True}, "down": asdict(good.down), "capability": [9, 0]}
    data[broken] = {"down": asdict(good.down), "capability": [9, 0]}
    h200_cache.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="moe_fx"):
        assert tuning.choose(*shape, cuda, 16 * 2) == good
        assert tuning.choose(*shape, cuda, 1024 * 2) == tuning.default_config(1024 * 2 / 8, torch.bfloat16)
        assert tuning.tuned_buckets(*shape, cuda) == {16: "NVIDIA_H100_80GB_HBM3"}
    text = caplog.text
    assert f"moe_fx: ignoring tuning entry {stale}" in text and "half_tails" in text, text
    assert f"moe_fx: ignoring tuning entry {broken}" in text and "'up'" in text, text


def test_a_cache_that_is_not_an_object_of_entries_is_ignored_with_a_warning(h200_cache, caplog):
    h200_cache.write_text("[1, 2]")
    with caplog.at_level(logging.WARNING, logger="moe_fx"):
        config = tuning.choose(8, 64, 96, 2, True, torch.bfloat16, torch.device("cuda"), 7 * 2)
    assert config == tuning.default_config(7 * 2 / 8, torch.bfloat16)
    assert "expected a JSON object of entries, got list" in caplog.text


def test_a_tuned_config_that_does_not_fit_gives_way_to_the_defaults(h200_cache, monkeypatch, caplog):
    """A tuned entry this GPU and Triton can't compile (out of shared memory: tuned under another Triton version)
    runs the defaults instead, with one warning; the result is right, and later calls go to the defaults directly.
    The defaults failing the same way, or a config given by the caller, raise as before."""
    from triton.runtime.errors import OutOfResources

    from moe_fx.lowering.triton import grouped_gemm

    monkeypatch.setattr(tuning, "_UNFIT", set())
    E, D, F, K, T = 4, 32, 48, 2, 5
    tuned = tuning.ExpertsConfig(tuning.GemmConfig(16, 32, 32), tuning.GemmConfig(16, 32, 32))
    tuning.store(tuning.key(E, D, F, K, True, torch.float32, "NVIDIA_H200", T), tuned, {"best": 1.0}, [9, 0])
    refused = []
    launch = grouped_gemm.launch

    def launch_unless_tuned(kernel, grid, *args, **meta):
        if meta["BLOCK_N"] == 32:  # the tuned tiles: out of shared memory "on this GPU"
            refused.append(meta["BLOCK_N"])
            raise OutOfResources(300000, 232448, "shared memory")
        return launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(grouped_gemm, "launch", launch_unless_tuned)
    weights = tuner.random_weights(E, D, F, "silu_gated", torch.float32, DEVICE)
    run = tuner.experts_call(T, K, "silu_gated", torch.float32, weights)
    with caplog.at_level(logging.WARNING, logger="moe_fx"):
        outs = [run(), run()]  # config=None: the experts choose, as the lowering does
    assert refused == [32], refused  # tried once, then the defaults directly
    assert "do not fit this GPU" in caplog.text and caplog.text.count("do not fit") == 1, caplog.text
    assert all(tuner.row_error(out, run.reference()) < tuner.AGREEMENT[torch.float32] for out in outs)
    assert tuning.choose(E, D, F, K, True, torch.float32, torch.device(DEVICE), T * K) != tuned
    # the same tiles over 2-byte elements take less shared memory: their entry still stands
    tuning.store(tuning.key(E, D, F, K, True, torch.float16, "NVIDIA_H200", T), tuned, {"best": 1.0}, [9, 0])
    assert tuning.choose(E, D, F, K, True, torch.float16, torch.device(DEVICE), T * K) == tuned
    with pytest.raises(OutOfResources):
        run(tuned)  # a config given by the caller (tune) is its to handle
    monkeypatch.setattr(grouped_gemm, "launch", lambda *a, **kw: launch_unless_tuned(*a, **{**kw, "BLOCK_N": 32}))
    with pytest.raises(OutOfResources):
        run()  # the defaults do not fit either: nothing to fall back to
