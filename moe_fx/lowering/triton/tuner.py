"""Tuning the grouped GEMMs' block sizes: candidate tiles, each checked against the reference lowering, then timed.

`tune` times every candidate pair of up and down GEMM configs at each T as CUDA-graph replays, re-times the
fastest in rotated rounds (`confirm`), and stores the best per T-bucket in `tuning`'s JSON cache, from which
`tuning.choose` reads it. A candidate whose output disagrees with the reference lowering (`agreement`) is
never timed: a tile this GPU and Triton compile wrong cannot win.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import warnings
from dataclasses import asdict, replace
from typing import NamedTuple

import torch

from moe_fx.lowering.quant import quantize_weight, stored_w2, w2_out_features
from moe_fx.lowering.triton import timing, tuning
from moe_fx.lowering.triton.tuning import ExpertsConfig, GemmConfig
from moe_fx.spec import GATED_ACTIVATIONS

log = logging.getLogger("moe_fx")


def _with_load_paths(candidates: tuple) -> tuple:
    """Each candidate through pointers and through TMA descriptors (the weights; a decode tile's gathered rows
    stay pointer loads), the prefill tiles (>= 64 rows) also with persistent programs on TMA, and the decode tiles
    (<= 32 rows) with the dot's operands swapped too, on either path. The 64-row persistent tiles were added for
    T=1024, where an expert of Qwen3 holds ~64 rows and one of DeepSeek ~128 (128-row tiles compute up to 2x
    and 1.5x the rows); on the H100 they won at no shape (bench/NOTES.md, twenty-eighth session)."""
    return (
        tuple((*c, False, False, False) for c in candidates)
        + tuple((*c, True, False, False) for c in candidates)
        + tuple((*c, True, False, True) for c in candidates if c[0] >= 64)
        + tuple((*c, tma, True, False) for tma in (False, True) for c in candidates if c[0] <= 32)
    )


# (block_m, block_n, block_k, num_warps, num_stages, tma, swap_ab, persistent); group_m 8. The deeper decode
# pipelines (5-8 stages, 256/512-deep K) and TMA at decode won 0-4 % on an H100 (GPT-OSS's picks use them).
CANDIDATES = _with_load_paths((
    (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (32, 64, 128, 4, 4),
    (16, 32, 128, 4, 6), (16, 64, 128, 4, 5), (16, 32, 256, 4, 4), (16, 64, 64, 4, 8),
    (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4), (128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (64, 256, 64, 8, 3),
))  # fmt: skip
# One-byte operands: deeper K-tiles for the same shared memory. The 8-warp decode tiles: as fused fp8 configs at
# T=1 they ran the routed step 2 % faster than their 4-warp twins in one H100 sweep, within 1 % in a checked rerun
# (bench/NOTES.md, 2026-12-07, twenty-third and twenty-fourth sessions).
QUANT_CANDIDATES = _with_load_paths((
    (16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 64, 256, 4, 3), (16, 128, 256, 4, 3), (16, 128, 128, 4, 4),
    (32, 128, 128, 4, 4), (16, 32, 256, 4, 6), (16, 64, 512, 4, 3), (16, 64, 256, 8, 3), (16, 128, 256, 8, 3),
    (64, 128, 128, 4, 3), (64, 128, 128, 4, 4),
    (64, 256, 128, 8, 3), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 128, 8, 4),
))  # fmt: skip


def random_weights(E: int, D: int, F: int, activation: str, dtype: torch.dtype, device, quant: str = "none"):
    """(w13_EHD, w2_EDF, scales): random expert weights of this shape, quantised under `quant` (scales holds
    w13_scale and w2_scale then; w2 in the layout the rewrite stores, `quant.stored_w2`), as `experts_call` takes
    them."""
    H = 2 * F if activation in GATED_ACTIVATIONS else F
    w13 = torch.randn(E, H, D, device=device, dtype=dtype) / D**0.5
    w2 = torch.randn(E, D, F, device=device, dtype=dtype) / F**0.5
    scales = {}
    if quant != "none":
        (w13, scales["w13_scale"]), (w2, scales["w2_scale"]) = quantize_weight(w13, quant), quantize_weight(w2, quant)
        w2 = stored_w2(w2, quant)
    return w13, w2, scales


def experts_call(T: int, K: int, activation: str, dtype: torch.dtype, weights: tuple, quant: str = "none",
                 reduce: bool = False, routed: bool = False):  # fmt: skip
    """run(config=None) -> y_RD (`reduce`: out_TD, the rows summed by experts): the Triton experts op on `weights`
    (`random_weights`) for T random tokens, each routed to K distinct experts uniformly at random, dispatched
    once. run.inputs = (x_TD, ids_TK, weights_TK), run.row_index = the dispatched rows' (t*K + k) slots (for
    combine), run.reference() = what the reference lowering computes from the same rows (`agreement`).

    `routed` (where `routes`: where the rewrite emits `routed_experts`): the tokens are routed by a random router
    (softmax, top-K, renormalised), and run(config) is the layer up to combine as that op runs it: in a fused
    config `decode.routed_experts` (the router's GEMV, then the experts kernel routing its own picks), else
    route, dispatch and the experts op. So a fused config is timed with the kernels it saves."""
    from moe_fx.lowering import reference as reference_lowering
    from moe_fx.lowering.triton import decode, route
    from moe_fx.lowering.triton.dispatch import dispatch
    from moe_fx.lowering.triton.grouped_gemm import Routing, experts
    from moe_fx.ops import rows_are_tokens

    if routed and not tuning.routes(T, quant, reduce):
        raise ValueError(f"moe_fx: experts_call routes reduced decode steps (T <= {decode.MAX_TOKENS}) unquantised "
                         f"or quantised per token, got T={T}, quant={quant!r}, reduce={reduce}")  # fmt: skip
    w13, w2, scales = weights
    E, D, device = w13.shape[0], w2_out_features(w2, False), w13.device
    x = torch.randn(T, D, device=device, dtype=dtype)
    kw = dict(w13=w13, w3=None, w2=w2, w13_bias=None, w2_bias=None, weight_at="none", activation=activation,
              gate_up="concat", w13_transposed=False, w2_transposed=False, alpha=1.702, limit=7.0,
              out_dtype=dtype)  # fmt: skip
    w_router = torch.randn(E, D, device=device, dtype=dtype) / D**0.5
    router = Routing(None, None, K, "softmax", "score_then_topk", True, 1, 1, 1, 1.0, torch.float32, 0.0)

    def route_tokens():
        r = router
        return route.route(route.project(x, w_router, None), None, K, r.scoring, r.order, r.renormalize, 1, 1, 1,
                           r.scale)  # fmt: skip

    def rows(ids, routing):
        xq, xscale, offsets, gather, row_weights, row_index, _ = dispatch(x, ids, routing, E, quant)
        return x if rows_are_tokens(quant, "single") else xq, xscale, offsets, gather, row_weights, row_index

    if routed:
        routing, ids = route_tokens()
    else:
        ids = torch.rand(T, E, device=device).argsort(dim=-1)[:, :K].to(torch.int32)
        routing = torch.rand(T, K, device=device)
    xq, xscale, offsets, gather, row_weights, row_index = rows(ids, routing)

    def run(config=None):
        if not routed:
            return experts(xq, offsets, gather, row_weights, **kw, config=config, quant=quant, xscale=xscale,
                           reduce=reduce, **scales)  # fmt: skip
        out = decode.routed_experts(x, x, w_router, None, router, kw | scales | {"quant": quant}, config)
        if out is not None:
            return out
        w, i = route_tokens()
        q, s, o, g, rw, _ = rows(i, w)
        return experts(q, o, g, rw, **kw, config=config, quant=quant, xscale=s, reduce=True, **scales)

    def reference():  # the reference lowering on the same rows; under `reduce`, its combine's weighted sum too
        y = reference_lowering.experts(xq, xscale, offsets, gather, row_weights, w13, None, w2, None, None,
                                       scales.get("w13_scale"), scales.get("w2_scale"), "none", activation, "concat",
                                       False, False, 1.702, 7.0, quant, dtype)  # fmt: skip
        return reference_lowering.combine(y, routing, row_index, None, True, "single", "") if reduce else y

    run.inputs, run.row_index, run.reference = (x, ids, routing), row_index, reference
    return run


# A candidate is timed only if its output agrees with the reference lowering's on the same rows (`agreement`):
# the largest relative error of one output row, where a miscompiled tile is O(1) however many right rows
# surround it (in the whole output's norm one wrong 128-row tile of 65536 rows is 4e-2). Two roundings to bf16
# leave ~5e-3 per row; quantised modes also round h to e4m3 (or int8) where the two may differ by one step.
AGREEMENT = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
QUANT_AGREEMENT = 0.1
WRONG_OUTPUT = "wrong output"  # how a `Disagreement`'s reason begins where the output disagreed


class Disagreement(NamedTuple):
    """Why a config may not be timed: `wrong` where its output disagreed with the reference (a tile this GPU and
    Triton compile wrong), else the error that stopped the run (out of shared memory or registers)."""

    why: str
    wrong: bool


def agreement_bound(dtype: torch.dtype, quant: str = "none") -> float:
    return AGREEMENT[dtype] if quant == "none" else max(AGREEMENT[dtype], QUANT_AGREEMENT)


def row_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows r of ‖out_r − ref_r‖ / ‖ref_r‖ in float64, a row's norm floored at 1e-3 of the rows' mean
    (rows near zero compare absolutely); inf where out has a NaN or Inf that ref has not."""
    out, ref = out.double(), ref.double()
    if not torch.equal(torch.isfinite(out), torch.isfinite(ref)):
        return float("inf")
    finite = torch.isfinite(ref)
    diff = torch.where(finite, out - ref, 0.0).norm(dim=-1)
    norm = torch.where(finite, ref, 0.0).norm(dim=-1)
    floor = 1e-3 * norm.mean().clamp_min(1e-30)
    return (diff / torch.maximum(norm, floor)).max().item() if diff.numel() else 0.0


@contextlib.contextmanager
def poisoned(quiet: bool = True):
    """Inside, torch.empty returns NaN-filled memory (deterministic mode's fill): an output element a config
    leaves unwritten shows as NaN. `quiet`: without deterministic mode's warnings about the ops around the
    kernels. The states are restored after."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        with contextlib.ExitStack() as quieted:
            if quiet:
                quieted.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = True
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def agreement(run, config, ref: torch.Tensor) -> float:
    """`row_error` of run(config), its outputs poisoned, against `ref` (run.reference())."""
    with poisoned():
        out = run(config)
    return row_error(out, ref)


def disagreement(run, config, ref: torch.Tensor, bound: float) -> Disagreement | None:
    """Why `config` may not be timed, or None where run(config) agrees with `ref` (`agreement`) within `bound`:
    a row's rel err past it, or the error that stopped the run."""
    try:
        err = agreement(run, config, ref)
    except Exception as e:
        return Disagreement(_failure(e), wrong=False)
    if err > bound:
        return Disagreement(f"{WRONG_OUTPUT}: a row's rel err {err:.3g} (at most {bound:g})", wrong=True)
    return None


def _failure(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"[:200]


def tune(E: int, D: int, F: int, K: int, activation: str, dtype: torch.dtype, Ts: list[int], device="cuda",
         quant: str = "none", candidates: tuple | None = None, reduce: bool | None = None) -> dict:  # fmt: skip
    """Time `candidates` (default CANDIDATES, or QUANT_CANDIDATES under a quant mode; conformed) for both GEMMs
    at each T (random routing), then, where experts sums the rows in a mode that runs fused (`tuned_parts`), the
    decode tiles as fused configs (`ExpertsConfig.fused`); store the best per T-bucket. `reduce`: time the down
    GEMM with the sum of each token's rows in its epilogue (`experts(reduce=True)`), by default where the rewrite
    puts it there (one GPU with `native_atomics` of the dtype; a block with `fuse_combine=False` runs the store
    the other choice times).
    At a T where the block may route its picks inside a fused kernel (`routes`), every candidate is timed as the
    layer up to combine (`experts_call(routed=True)`): the router's GEMV, then route, the sort and experts, or a
    fused config's one kernel that routes; so a fused config wins where the kernels it saves pay for it.

    The up GEMM is tuned with the default down config, then the down GEMM with the best up; after each, the
    CONFIRMED fastest pairs are timed again (`confirm`), and the best of those is kept. Each pair is run once
    first, its outputs NaN-poisoned, against the reference lowering on the same rows (`agreement`): one that
    disagrees beyond `agreement_bound` (a tile this GPU and Triton compile wrong) is not timed, and is listed
    in "failed" with its error.
    Returns {cache key: {"best": µs of the best pair, "config": it, "timings": {config: µs} of every pair
    timed once, "confirmed": {config: median µs} of the pairs timed again, "failed": {config: error} of those
    that did not run, "wrong": [config] of those among them whose output disagreed}}. Needs a GPU.
    """
    from tqdm import tqdm

    gated = activation in GATED_ACTIVATIONS
    device = torch.device(device)
    weights = random_weights(E, D, F, activation, dtype, device, quant)
    if candidates is None:
        candidates = CANDIDATES if quant == "none" else QUANT_CANDIDATES
    results = {}
    reduce = tuning.native_atomics(dtype) if reduce is None else reduce
    parts = tuned_parts(reduce, quant)
    bar = tqdm(total=len(Ts) * len(parts) * len(candidates), desc=f"moe_fx tune E{E} D{D} F{F} K{K} {quant}")
    bound = agreement_bound(dtype, quant)
    for T in Ts:
        run = experts_call(T, K, activation, dtype, weights, quant, reduce, routed=tuning.routes(T, quant, reduce))
        ref = run.reference()
        best = tuning.default_config(T * K / E, dtype, quant)
        timings, confirmed, failed, wrong = {}, {}, {}, []
        for part in parts:
            for gemm in candidate_gemms(candidates):
                config = tried_config(part, gemm, best, quant)
                if config is None or config in timings:  # not tried, or a duplicate (conform made it one)
                    bar.update()
                    continue
                failure = disagreement(run, config, ref, bound)
                if failure is None:
                    try:
                        timings[config] = time_config(run, config)
                    except Exception as err:  # e.g. its CUDA graph would not capture: skip it, say so
                        failure = Disagreement(_failure(err), wrong=False)
                if failure is not None:
                    if failure.wrong:  # a config this GPU and Triton compile wrong: never chosen
                        log.warning("moe_fx: tuning config %s is wrong here: %s against the reference lowering; "
                                    "skipped", tuning.describe(config), failure.why)  # fmt: skip
                        wrong.append(tuning.describe(config))
                    else:  # a config out of shared memory or registers
                        log.debug("moe_fx: tuning config %s failed: %s", config, failure.why)
                    failed[tuning.describe(config)] = failure.why
                bar.update()
            best, medians = confirm(sorted(timings, key=timings.get)[:CONFIRMED], functools.partial(time_config, run))
            confirmed.update(medians)
        cache_key = tuning.key(E, D, F, K, gated, dtype, tuning.device_name(device), T, quant)
        tuning.store(cache_key, best, {"best": confirmed[best]}, tuning.capability(device))
        results[cache_key] = {
            "best": confirmed[best],
            "config": asdict(best),
            "timings": {tuning.describe(c): us for c, us in timings.items()},
            "confirmed": {tuning.describe(c): us for c, us in confirmed.items()},
            "failed": failed,
            "wrong": wrong,
        }
    bar.close()
    return results


CONFIRMED, ROUNDS = 3, 3  # the fastest pairs timed again, and how many times each
FUSED_MAX_BLOCK_M = 32  # the up tiles tried as fused configs (decode)


def tuned_parts(reduce: bool, quant: str) -> tuple[str, ...]:
    """What `tune` tunes, in order: the up GEMM, the down GEMM, and where experts sums the rows in a mode that
    runs fused (unquantised, fp8, int8), fused decode configs."""
    return ("up", "down", "fused") if reduce and tuning.runs_fused(quant) else ("up", "down")


def candidate_gemms(candidates) -> list[GemmConfig]:
    """The GemmConfigs of candidate tuples (block_m, block_n, block_k, warps, stages, *loads)."""
    return [GemmConfig(m, n, k, 8, warps, stages, *loads) for m, n, k, warps, stages, *loads in candidates]


def tried_config(part: str, gemm: GemmConfig, base: ExpertsConfig, quant: str) -> ExpertsConfig | None:
    """The pair `tune` tries for `gemm` as `part` of `base` (conformed), or None where it tries none: a fused
    config is the up tile with the down GEMM in its epilogue, for decode tiles only."""
    if part != "fused":
        return tuning.conform(replace(base, **{part: gemm}), quant)
    if gemm.block_m > FUSED_MAX_BLOCK_M:
        return None
    return ExpertsConfig(gemm, replace(base.down, block_n=tuning.FUSED_BLOCK_D[quant]), fused=True)


def confirm(configs: list, time_one, rounds: int = ROUNDS) -> tuple:
    """(the config of `configs` with the lowest median time, {config: median µs}), each timed `rounds` times by
    `time_one`, each round in an order rotated by one. A GPU's clocks drift over a tuning run: in one, two
    timings of the same prefill config read 8.9 and 11.2 ms (bench/NOTES.md, seventh session), so one pass
    ranks configs by when they ran as much as by how fast they are."""
    times = {c: [] for c in configs}
    for r in range(rounds):
        shift = r % len(configs)
        for c in configs[shift:] + configs[:shift]:
            times[c].append(time_one(c))
    medians = {c: statistics.median(t) for c, t in times.items()}
    return min(medians, key=medians.get), medians


def time_config(run, config) -> float:
    """µs per CUDA-graph replay of run(config) (at decode an eager call is bound by its launch, not its kernels)."""
    replay = timing.graph_replay(lambda: run(config))
    try:
        return timing.median_us(replay)
    finally:
        del replay  # its graph's memory pool with it
