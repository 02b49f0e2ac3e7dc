"""Block sizes for the grouped GEMMs: defaults by rows per expert, tuned values from a JSON cache.

A key names everything a choice depends on: (E, D, F, K, gated, dtype, device, T-bucket). The bucket
is T rounded up to a power of two, so a value tuned at T=16 is never reused at T=8192: an untuned
bucket falls back to the defaults, which follow the average rows per expert (T*K/E).

The cache is JSON (never pickle), at $MOE_FX_TUNING_CACHE or ~/.cache/moe_fx/triton_tuning.json;
`tuner.tune` fills it, one bucket at a time, with a progress bar. `tuned.json` beside this module ships the
entries tuned for the four benchmark shapes on an H100; the user's cache wins over it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import triton

from moe_fx.lowering.triton.sizes import cdiv, next_power_of_2

log = logging.getLogger("moe_fx")


@dataclass(frozen=True)
class GemmConfig:
    """One GEMM's tile shape and launch parameters."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # TMA descriptor loads where they fit (0.89-0.97x pointer time at T >= 1024 on an H200)
    # the weight tile is the dot's first operand (acc[N, M] = w[N, K] · a[M, K]ᵀ): wgmma's 64-row side spans the
    # weights' N, a decode tile's few rows its narrow side (16-row tiles run mma.sync otherwise)
    swap_ab: bool = False
    # two programs per SM, each taking every grid-th tile in one flattened tile-and-K loop: the next tile's first
    # loads are in flight during this one's last K-steps and epilogue (bf16 T=8192 on an H100: 0.86-0.92x the
    # time of the same TMA tiles; T=1024 0.97-1.02x; fp8 0.94-1.09x)
    persistent: bool = False


@dataclass(frozen=True)
class ExpertsConfig:
    """Configs of the two GEMMs of `experts`: up (gather + w13 + activation) and down (w2).

    fused: where experts sums each token's rows (`reduce`) and the operands are unquantised or fp8 / int8 (per
    token and channel), one kernel: each up tile's activations, an F-slice of its rows (quantised per row of the
    slice under fp8 / int8), go on through w2's F-slice in its epilogue (the down GEMM split over F,
    down.block_n wide column blocks), fp32 atomics into a sum the last program casts."""

    up: GemmConfig
    down: GemmConfig
    fused: bool = False


PACKAGED = Path(__file__).with_name("tuned.json")  # tuned on the lent H100 by bench/layer.py --tune


def cache_path() -> Path:
    default = Path.home() / ".cache" / "moe_fx" / "triton_tuning.json"
    return Path(os.environ.get("MOE_FX_TUNING_CACHE", default))


def t_bucket(T: int) -> int:
    return next_power_of_2(max(T, 1))


def _key_ends(E, D, F, K, gated, dtype, T, quant) -> tuple[str, str]:
    """A cache key is head + device name + tail."""
    kind = "gated" if gated else "plain"
    q = "" if quant == "none" else f"-{quant}"
    return f"E{E}-D{D}-F{F}-K{K}-{kind}-{str(dtype).removeprefix('torch.')}{q}-", f"-T{t_bucket(T)}"


def key(E: int, D: int, F: int, K: int, gated: bool, dtype: torch.dtype, device: str, T: int, quant: str = "none"):
    """The cache key; `dtype` is the model's (the output's) dtype, a quant mode other than "none" is appended."""
    head, tail = _key_ends(E, D, F, K, gated, dtype, T, quant)
    return head + device + tail


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).replace(" ", "_")


@functools.lru_cache(maxsize=16)
def capability(device: torch.device) -> list[int] | None:
    """[major, minor] of a CUDA device (stored with each tuned entry), None elsewhere."""
    return list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device, None elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_atomics(dtype: torch.dtype) -> bool:
    """Whether this process's GPU adds `dtype` atomically in L2, which the experts' sum of each token's rows
    (`experts(reduce=True)`) needs to pay: bf16 from sm90 (`atom.add.noftz.bf16`; a compare-and-swap loop per
    element before), fp16 and fp32 on every GPU Triton runs on."""
    if dtype != torch.bfloat16:
        return True
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def conform(config: ExpertsConfig, quant: str) -> ExpertsConfig:
    """Constraints on a config: K-tiles never straddle a 128-wide scale block (BLOCK_K <= 128) under fp8_block
    and int4_weight, and fp8_block's up N-tile is one 128-column activation group (quantised in its epilogue),
    its down N-tile at most two 128-column weight blocks. fp8_block never swaps its operands: the swapped rescale
    gave wrong results on an H100 (2026-12-05, bench/NOTES.md) while it passed in the interpreter."""
    if quant not in ("fp8_block", "int4_weight"):
        return config
    up, down = (replace(c, block_k=min(c.block_k, 128)) for c in (config.up, config.down))
    if quant == "fp8_block":
        up, down = replace(up, block_n=128, swap_ab=False), replace(down, block_n=min(down.block_n, 256), swap_ab=False)
    return ExpertsConfig(up, down)


def default_config(rows_per_expert: float, dtype: torch.dtype, quant: str = "none") -> ExpertsConfig:
    """Untuned choice, from the winners of tuning four model shapes on an H100 (bench/NOTES.md):
    16-row tiles and wide N for decode (bf16's up GEMM with swapped operands, from an H200's
    `bench/gemm_paths.py`),
    64-row tiles in between, 128-row tiles for prefill. Quantised operands are one byte: their K-tiles are
    twice as deep for the same shared memory."""
    if interpreting():  # small tiles keep the interpreter fast; tl.dot needs >= 16 (32 for fp8)
        c = GemmConfig(16, 16, 16, 1, 4, 1) if quant == "none" else GemmConfig(16, 32, 32, 1, 4, 1)
        return conform(ExpertsConfig(c, c), quant)
    if quant in ("fp8", "fp8_block", "int8"):  # int4_weight's activations keep their dtype: the defaults below
        if rows_per_expert <= 16:  # unswapped: the swapped fp8 tile (e4m3 wgmma) is a tuning candidate, untimed
            up = down = GemmConfig(16, 64, 256, 8, 4, 4)
        elif rows_per_expert <= 96:
            up, down = GemmConfig(64, 128, 128, 8, 4, 4), GemmConfig(64, 128, 128, 8, 4, 4)
        else:
            up, down = GemmConfig(128, 128, 128, 8, 8, 3, True), GemmConfig(128, 256, 128, 8, 8, 3, True)
        return conform(ExpertsConfig(up, down), quant)
    if rows_per_expert <= 16:  # bf16's up GEMM swapped: 0.88-1.02x on an H200 at T = 1, 16 (int4 mixed: not)
        up, down = GemmConfig(16, 128, 128, 8, 4, 3, swap_ab=quant == "none"), GemmConfig(16, 128, 128, 8, 4, 3)
    elif rows_per_expert <= 96:
        up, down = GemmConfig(64, 64, 64, 8, 4, 4), GemmConfig(64, 128, 64, 8, 4, 4)
    else:  # bf16 persistent: 0.86-0.92x the time at T=8192 on an H100, 0.97-1.02x at T=1024 (int4: untimed)
        up, down = (GemmConfig(128, n, 64, 8, 8, 3, tma=True, persistent=quant == "none") for n in (128, 256))
    if dtype.itemsize > 2:  # fp32 tiles take twice the shared memory
        up, down = (replace(c, block_n=min(c.block_n, 64), block_k=32) for c in (up, down))
    return conform(ExpertsConfig(up, down), quant)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError) as err:
        log.warning("moe_fx: ignoring unreadable tuning cache %s: %s", path, err)
        return {}
    if not isinstance(data, dict):
        log.warning("moe_fx: ignoring tuning cache %s: expected a JSON object of entries, got %s", path,
                    type(data).__name__)  # fmt: skip
        return {}
    return data


@functools.lru_cache(maxsize=4096)
def _lookup(path: str, head: str, device: str, tail: str, cap: tuple[int, ...] | None) -> tuple | None:
    """(ExpertsConfig, the device it was tuned on) of the entry tuned on this device (the user's cache first,
    then the entries shipped with moe_fx); else of one tuned on another device of the same compute capability
    (an H100's for an H200: the same SMs), which beats the defaults. The stand-in's key differs in its device
    name alone: a bf16 head is a prefix of its fp8 keys' heads too, and an fp8 entry (256-deep K-tiles) is out
    of shared memory in bf16."""
    caches = (_read(Path(path)), _read(PACKAGED))
    own = head + device + tail
    found = [(own, c[own]) for c in caches if own in c]

    def stands_in(k: str, e) -> bool:
        return key_device(k, head, tail) is not None and isinstance(e, dict) and tuple(e.get("capability", ())) == cap

    if cap is not None:
        found += [(k, e) for c in caches for k, e in sorted(c.items()) if stands_in(k, e)]
    for k, entry in found:  # the first entry this version can read
        config = _readable_config(k, entry)
        if config is not None:
            if k != own:
                log.debug("moe_fx: no tuned entry %s; taking %s (sm%d%d)", own, k, *cap)
            return config, key_device(k, head, tail)
    return None


# the modes whose entries a mode runs, in order: int8 has none of its own shipped and takes fp8's, the same
# one-byte tiles (an H100's int8 and e4m3 tensor cores peak alike; bench/NOTES.md, 2026-12-07)
ENTRY_MODES = {"int8": ("int8", "fp8")}


def _entry_lookup(E, D, F, K, gated, dtype, device, T, quant) -> tuple | None:
    """(ExpertsConfig, the device it was tuned on, its mode) of the first of `quant`'s ENTRY_MODES with an entry
    (`_lookup`'s) at T's bucket on `device`."""
    cap = capability(device)
    for mode in ENTRY_MODES.get(quant, (quant,)):
        head, tail = _key_ends(E, D, F, K, gated, dtype, T, mode)
        found = _lookup(str(cache_path()), head, device_name(device), tail, tuple(cap) if cap else None)
        if found is not None:
            return (*found, mode)
    return None


def _readable_config(key: str, entry) -> ExpertsConfig | None:
    """`entry_config(entry)`, or None with a warning where this version of moe_fx can't read it (written by
    another version: a field it no longer has, a GEMM missing): a tuned config only makes a shape faster, so
    the next entry or the defaults run instead of every call failing."""
    try:
        return entry_config(entry)
    except (TypeError, KeyError, ValueError) as err:
        log.warning("moe_fx: ignoring tuning entry %s: %s: %s; expected \"up\" and \"down\" with the fields %s "
                    "(re-tune the shape or delete the entry)", key, type(err).__name__, err,
                    [f.name for f in fields(GemmConfig)])  # fmt: skip
        return None


def key_device(key: str, head: str, tail: str) -> str | None:
    """The device name of `key` when it is head + a device + tail, else None (a device name has no "-": a bf16
    head is a prefix of its fp8 keys too, whose middle is "fp8-NVIDIA_H200")."""
    device = key[len(head) : len(key) - len(tail)]
    return device if key.startswith(head) and key.endswith(tail) and "-" not in device else None


def entry_config(entry: dict) -> ExpertsConfig:
    """The ExpertsConfig of a tuned entry (or of `tuner.tune`'s "config"): its "up" and "down" GemmConfig fields."""
    return ExpertsConfig(GemmConfig(**entry["up"]), GemmConfig(**entry["down"]), entry.get("fused", False))


def tuned_buckets(E: int, D: int, F: int, K: int, gated: bool, dtype: torch.dtype, device: torch.device,
                  quant: str = "none") -> dict[int, str]:  # fmt: skip
    """{T-bucket: the device its entry was tuned on} for each bucket `choose` takes a tuned entry in on `device`
    (its own, else a same-capability stand-in; "<device>, fp8's entry" where int8 takes fp8's, `ENTRY_MODES`);
    every other bucket runs the defaults."""
    return {
        T: on if mode == quant else f"{on}, {mode}'s entry"
        for T, (_, on, mode) in _tuned_entries(E, D, F, K, gated, dtype, device, quant).items()
    }


def _tuned_entries(E, D, F, K, gated, dtype, device, quant) -> dict[int, tuple]:
    """{T-bucket: (ExpertsConfig, the device it was tuned on, its mode)} of `tuned_buckets`."""
    buckets, caches = set(), (_read(cache_path()), _read(PACKAGED))
    for mode in ENTRY_MODES.get(quant, (quant,)):
        head, _ = _key_ends(E, D, F, K, gated, dtype, 1, mode)
        for c in caches:
            for k in c:
                other, _, T = k[len(head) :].rpartition("-T")
                if k.startswith(head) and "-" not in other and T.isdigit():
                    buckets.add(int(T))
    found = {T: _entry_lookup(E, D, F, K, gated, dtype, device, T, quant) for T in sorted(buckets)}
    return {T: hit for T, hit in found.items() if hit is not None}


def tiles_note(E: int, D: int, F: int, K: int, gated: bool, dtype: torch.dtype, device: torch.device,
               quant: str = "none") -> str:  # fmt: skip
    """One line for the report: which T-buckets of this experts shape run tuned tiles on `device`, and where
    their entries come from; which of them run the experts as one fused kernel."""
    name = device_name(device)
    by_source: dict[tuple[str, str], list[int]] = {}
    entries = _tuned_entries(E, D, F, K, gated, dtype, device, quant)
    for T, (_, tuned_on, mode) in entries.items():
        by_source.setdefault((tuned_on, mode), []).append(T)
    if not by_source:
        return f"Triton tiles untuned on {name}: every T runs the defaults; moe_fx.tune(model, x) tunes them"
    parts = [
        f"{', '.join(map(str, Ts))} ({'' if mode == quant else f'{mode} entries, '}"
        f"{'this GPU' if on == name else f'stand-in: {on}, same capability'})"
        for (on, mode), Ts in by_source.items()
    ]
    note = f"Triton tiles tuned for T-buckets {'; '.join(parts)}; other T run the defaults (moe_fx.tune tunes them)"
    fused = [str(T) for T, (config, _, _) in entries.items() if config.fused]
    return note + (f"; T-buckets {', '.join(fused)}: one fused kernel (where experts sums the rows)" if fused else "")


def store(cache_key: str, config: ExpertsConfig, timings_us: dict[str, float], cap: list[int] | None = None) -> None:
    """Write one tuned entry (atomically: a temporary file, then rename), with the compute capability it was
    tuned on."""
    path = cache_path()
    data = _read(path)
    data[cache_key] = {"up": asdict(config.up), "down": asdict(config.down), "us": timings_us, "capability": cap}
    if config.fused:
        data[cache_key]["fused"] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
    _lookup.cache_clear()
    _choose.cache_clear()


# tuned configs this process's GPU and Triton could not compile (`unfit`), each with the other things that size
# its tiles in shared memory: gated (a 2·BLOCK_N weight tile), the dtype and the quant mode (bytes per element)
_UNFIT: set[tuple[ExpertsConfig, bool, torch.dtype, str]] = set()


def unfit(config: ExpertsConfig, err: Exception, E: int, D: int, F: int, K: int, gated: bool, dtype: torch.dtype,
          device: torch.device, R: int, quant: str = "none") -> ExpertsConfig:  # fmt: skip
    """`choose`'s config for these arguments once the tuned `config` is known not to fit this GPU with this
    Triton (`err`: out of shared memory or registers; an entry tuned under another Triton version, whose
    kernels take more, or on another GPU of the same capability): from now on the untuned default, with a
    warning (for the shapes with this gating, dtype and quant mode: those size the tiles in shared memory).
    `config` itself where it was the default already (the caller raises then)."""
    _UNFIT.add((config, gated, dtype, quant))
    _choose.cache_clear()
    fallback = choose(E, D, F, K, gated, dtype, device, R, quant)
    if fallback != config:
        log.warning("moe_fx: the tuned Triton tiles %s do not fit this GPU with Triton %s (%s); running the "
                    "defaults %s instead (moe_fx.tune re-tunes the shape)", describe(config),
                    triton.__version__, err, describe(fallback))  # fmt: skip
    return fallback


def choose(E: int, D: int, F: int, K: int, gated: bool, dtype: torch.dtype, device: torch.device, R: int,
           quant: str = "none"):  # fmt: skip
    """The ExpertsConfig for R = T*K routed rows: tuned if the cache has this T-bucket, else the default."""
    return _choose(E, D, F, K, gated, dtype, device, R, quant, os.environ.get("MOE_FX_TUNING_CACHE"), interpreting())


@functools.lru_cache(maxsize=4096)  # per-call host time matters at decode: look each shape up once
def _choose(E, D, F, K, gated, dtype, device, R, quant, _cache_env, interpret) -> ExpertsConfig:
    tuned = None if interpret else _entry_lookup(E, D, F, K, gated, dtype, device, R // max(K, 1), quant)
    if tuned is not None and (tuned[0], gated, dtype, quant) not in _UNFIT:
        return tuned[0]
    config = default_config(R / max(E, 1), dtype, quant)
    sms = None if interpret else sm_count(device)
    return conform(spread(config, E, D, F, R, sms, gated), quant) if sms else config


def spread(config: ExpertsConfig, E: int, D: int, F: int, R: int, sms: int, gated: bool = True) -> ExpertsConfig:
    """Narrower N-tiles (down to 32) while a GEMM would have fewer real programs than the GPU has SMs.

    At decode every hit expert owns one M-tile, so the up GEMM runs min(E, R)·cdiv(F, BLOCK_N) programs that
    do work: GPT-OSS at T=1 (4 experts, F=2880) has 90 at BLOCK_N=128 on a 132-SM GPU, and each streams its
    share of the weights alone. Halving BLOCK_N doubles the programs streaming the same bytes. A swapped tile
    keeps at least 64 weight rows (2·BLOCK_N for a gated up GEMM): the rows wgmma's instruction spans; below
    them its dot runs `mma.sync` (and one-byte operands are converted to 16 bits for it)."""

    def narrow(c: GemmConfig, N: int, rows_per_column: int) -> GemmConfig:
        m_tiles = max(cdiv(R, c.block_m), min(E, R))  # a lower bound on the M-tiles that do work
        floor = max(32, 64 // rows_per_column) if c.swap_ab else 32
        block_n = c.block_n
        while block_n > floor and m_tiles * cdiv(N, block_n) < sms:
            block_n //= 2
        return replace(c, block_n=block_n)

    return ExpertsConfig(narrow(config.up, F, 2 if gated else 1), narrow(config.down, D, 1))


def routes(T: int, quant: str, reduce: bool) -> bool:
    """Whether a block's step of T tokens may run as `routed_experts` (`fuse_route`, on by default): the rows
    summed in experts, the activations unquantised or quantised per token (a mode that runs fused), T within the
    router GEMV's range; it does where its config is fused."""
    from moe_fx.lowering.triton import decode

    return reduce and runs_fused(quant) and 0 < T <= decode.MAX_TOKENS


# A fused config's w2 column blocks (down.block_n) per quant mode: as many bytes per block for one-byte weights as
# for two-byte ones, or more. Each program's loop over D holds a few blocks in flight, and at decode that, not the
# weight bytes, sets its time: fp8 with 128-wide blocks ran as long as bf16 (Qwen3 T=1: 27.4 against 30.9 µs);
# 512-wide ran Qwen3's routed fp8 step 28.9 µs against 32.9 and GPT-OSS's 50.7 against 58.1 (bench/NOTES.md,
# 2026-12-07). bf16: 128 beat 256 in both shapes (2026-12-06). Its modes are those a fused config runs in.
FUSED_BLOCK_D = {"none": 128, "fp8": 512, "int8": 512}


def runs_fused(quant: str) -> bool:
    """Whether a fused config runs fused under `quant`: unquantised, or activations per token with weights per
    channel, whose h the up epilogue quantises per row of its F-slice (fp8_block's 128-wide groups and
    int4_weight's unpacking are not fused)."""
    return quant in FUSED_BLOCK_D


def describe(config: ExpertsConfig) -> str:
    """One line per config pair, e.g. "up 128x128x64 w8 s3 tma | down 128x256x64 w8 s3 tma persistent"."""
    if config.fused:
        return f"{_describe('up', config.up)} | fused down {config.down.block_n}-wide"
    return " | ".join(_describe(name, c) for name, c in (("up", config.up), ("down", config.down)))


def _describe(name: str, c: GemmConfig) -> str:
    return (
        f"{name} {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}{' tma' if c.tma else ''}"
        f"{' swap' if c.swap_ab else ''}{' persistent' if c.persistent else ''}"
    )
