"""`tuner.tune` times only configs whose output agrees with the reference lowering (`tuner.agreement`)."""

import json

import pytest
import torch

from moe_fx.lowering.triton import tuner, tuning
from tests.lowering.triton.conftest import DEVICE, DTYPES

E, D, F, K, T = 4, 32, 48, 2, 9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant,reduce", [("none", False), ("fp8", True)])
def test_agreement_holds_for_right_outputs_and_not_for_a_wrong_or_unwritten_row(dtype, quant, reduce):
    """The Triton experts agree with the reference lowering on the same rows (the rows, or their weighted sums per
    token); one row changed by 10 %, or one row left unwritten (NaN under `tuner.poisoned`), does not."""
    if quant == "fp8" and dtype == torch.float32 and DEVICE == "cuda":
        pytest.skip("fp8 runs bf16/fp16 models on the GPU")
    torch.manual_seed(0)
    run = tuner.experts_call(T, K, "silu_gated", dtype, tuner.random_weights(E, D, F, "silu_gated", dtype, DEVICE,
                                                                               quant), quant, reduce)  # fmt: skip
    ref = run.reference()
    assert ref.shape == ((T, D) if reduce else (T * K, D)) and ref.dtype == dtype
    bound = tuner.agreement_bound(dtype, quant)
    assert tuner.agreement(run, None, ref) < bound / 4

    def changed(config=None):
        out = run(config)
        out[3] *= 1.1
        return out

    def unwritten(config=None):
        out = run(config)
        fresh = torch.empty_like(out)
        fresh[1:] = out[1:]
        return fresh

    assert 0.05 < tuner.agreement(changed, None, ref) < 0.2
    assert tuner.agreement(unwritten, None, ref) == float("inf")


def test_row_error_floors_near_zero_rows_and_counts_nonfinite_mismatches():
    ref = torch.tensor([[3.0, 4.0], [0.0, 0.0], [float("nan"), 1.0]])
    assert tuner.row_error(ref.clone(), ref) == 0.0
    near = ref.clone()
    near[1] = torch.tensor([0.0, 1e-6])  # a zero row compared against 1e-3 of the rows' mean norm, not itself
    assert 0 < tuner.row_error(near, ref) < 1e-3
    wrong = ref.clone()
    wrong[0] = torch.tensor([3.0, 5.0])
    assert tuner.row_error(wrong, ref) == pytest.approx(0.2)
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert tuner.row_error(nan, ref) == float("inf")


def test_tune_never_times_or_stores_a_config_that_disagrees(tmp_path, monkeypatch):
    """A candidate whose output is wrong (here made so) is listed in "failed" with its error and never stored,
    though the (fake) timer would rank it fastest; the right candidates are timed and the best is stored."""
    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "tuning.json"))
    wrong_n = 32  # the candidate of this up block_n computes wrong rows
    calls = tuner.experts_call

    def experts_call(*args, **kwargs):
        run = calls(*args, **kwargs)

        def maybe_wrong(config=None):
            out = run(config)
            if config is not None and config.up.block_n == wrong_n:
                out[0] = -out[0]
            return out

        maybe_wrong.reference = run.reference
        return maybe_wrong

    monkeypatch.setattr(tuner, "experts_call", experts_call)
    timed = []  # the fake timer ranks the wrong candidate fastest
    monkeypatch.setattr(tuner, "time_config", lambda run, c: timed.append(c) or 100.0 - c.up.block_n)
    candidates = ((16, 16, 16, 4, 1, False), (16, wrong_n, 16, 4, 1, False))
    results = tuner.tune(E, D, F, K, "silu_gated", torch.float32, [T], device=DEVICE, candidates=candidates,
                          reduce=False)  # fmt: skip
    ((key, entry),) = results.items()
    assert timed and all(c.up.block_n != wrong_n for c in timed)
    bad = {config: reason for config, reason in entry["failed"].items() if config.startswith(f"up 16x{wrong_n}x16")}
    assert bad and all(reason.startswith("wrong output: a row's rel err") for reason in bad.values()), entry
    assert sorted(entry["wrong"]) == sorted(bad)
    assert entry["config"]["up"]["block_n"] == 16
    stored = json.loads((tmp_path / "tuning.json").read_text())[key]
    assert tuning.entry_config(stored) == tuning.entry_config(entry["config"])


@pytest.mark.parametrize("dtype,quant", [(dtype, "none") for dtype in DTYPES] + [(DTYPES[-1], "fp8"),
                                                                                  (DTYPES[-1], "int8")])  # fmt: skip
def test_a_step_the_block_may_route_is_timed_as_the_layer_runs_it(dtype, quant):
    """`experts_call(routed=True)`, what `tune` times where the rewrite may emit `routed_experts`: the router's
    GEMV, then a fused config's one kernel that routes its own picks, or any other config's route, sort and
    experts; both agree with the reference lowering's sums of the same picks (fp8 / int8: the fused kernel's h
    quantised per F-slice of a row, the reference's per row). Unsummed steps, T past the GEMV's range and modes
    that do not run fused (fp8_block, int4_weight) do not route."""
    from dataclasses import replace

    from moe_fx.lowering.triton import decode, grouped_gemm

    torch.manual_seed(0)
    weights = tuner.random_weights(E, D, F, "silu_gated", dtype, DEVICE, quant)
    run = tuner.experts_call(3, K, "silu_gated", dtype, weights, quant, reduce=True, routed=True)
    ref = run.reference()
    unfused = tuning.default_config(3 * K / E, dtype, quant)
    for config, path in ((unfused, ["down", "up"]), (replace(unfused, fused=True), ["routed"])):
        before = grouped_gemm.loads.copy()
        # h's scales per F-slice against the reference's per row: a few % apart (exact: test_triton_experts_quant)
        margin = 1 if quant != "none" and config.fused else 4
        assert tuner.agreement(run, config, ref) < tuner.agreement_bound(dtype, quant) / margin, config
        assert sorted(k.split("/")[0] for k in (grouped_gemm.loads - before).elements()) == path, config
    assert all(tuning.routes(decode.MAX_TOKENS, mode, True) for mode in ("none", "fp8", "int8"))
    assert not any(tuning.routes(*a) for a in ((decode.MAX_TOKENS + 1, "none", True), (1, "fp8_block", True),
                                               (1, "int4_weight", True), (1, "none", False)))  # fmt: skip
    with pytest.raises(ValueError, match=r"moe_fx: experts_call routes .* got T=5"):
        tuner.experts_call(decode.MAX_TOKENS + 1, K, "silu_gated", dtype, weights, reduce=True, routed=True)


def test_tune_times_a_routable_step_as_routed_and_may_store_a_fused_config(tmp_path, monkeypatch):
    """At T=1 with the rows summed in experts, `tune` checks and times every candidate on the routed call (the
    fused ones route their picks in the kernel); the (fake) timer ranks a fused config fastest, and it is
    stored."""
    from moe_fx.lowering.triton import grouped_gemm

    monkeypatch.setenv("MOE_FX_TUNING_CACHE", str(tmp_path / "tuning.json"))
    routed = []
    calls = tuner.experts_call
    monkeypatch.setattr(tuner, "experts_call", lambda *a, **kw: routed.append(kw["routed"]) or calls(*a, **kw))
    monkeypatch.setattr(tuner, "time_config", lambda run, c: 1.0 if c.fused else 2.0)
    before = grouped_gemm.loads.copy()
    results = tuner.tune(E, D, F, K, "silu_gated", torch.float32, [1], device=DEVICE,
                          candidates=((16, 16, 16, 4, 1, False),), reduce=True)  # fmt: skip
    ((key, entry),) = results.items()
    assert routed == [True] and not entry["failed"], entry
    stored = json.loads((tmp_path / "tuning.json").read_text())[key]
    assert entry["config"]["fused"] and tuning.entry_config(stored).fused
    assert any(k.startswith("routed/") for k in (grouped_gemm.loads - before).elements())  # checked as it runs
