"""Zero-computation (identity) experts, LongCat-Flash's: picks of ids E..E+Z-1 return the token times its
weight. The split/add around the ops, the refusal of lowerings that take no dropped picks, and the real
LongCat-Flash model with routings that pick both kinds."""

import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters

import moe_fx
from moe_fx import hf_models
from moe_fx.backend import last_reports
from moe_fx.lowering import registry
from moe_fx.passes import identity_experts
from moe_fx.spec import ExpertsSpec, MoESpec, RouterSpec
from tests.conftest import TOLERANCE, rel_err


def test_split_drops_identity_picks_and_add_puts_them_back():
    ids = torch.tensor([[0, 9], [8, 10], [3, 1]])
    weights = torch.tensor([[0.5, 0.25], [0.125, 2.0], [1.0, 3.0]])
    kept_ids, kept_weights, identity_T1 = identity_experts.split(ids, weights, num_experts=8)
    assert kept_ids.tolist() == [[0, -1], [-1, -1], [3, 1]]
    assert kept_weights.tolist() == [[0.5, 0.0], [0.0, 0.0], [1.0, 3.0]]
    assert identity_T1.squeeze(1).tolist() == [0.25, 2.125, 0.0]
    x, out = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(identity_experts.add(out, x, identity_T1), out + x * identity_T1)


def test_identity_experts_run_on_the_lowerings_that_take_dropped_picks():
    spec = MoESpec(ExpertsSpec(8, 16, 8, identity_experts=4, dtype="bfloat16"), 2, router=RouterSpec(2))
    assert spec.experts.summary().startswith("E=8+4 identity")
    for op in ("route", "quantize_dispatch", "experts", "combine"):
        assert registry.select(op, "cuda", spec).chosen.name == "triton", op
    refused = registry.lookup("experts", "grouped_mm").supports(spec)
    assert refused == "4 zero-computation experts (their picks skip the experts) is not implemented by grouped_mm"
    for layout in ("ep_alltoall", "ep_allgather"):
        chosen = registry.select("quantize_dispatch", "cpu", spec.replace(layout=layout))
        assert chosen.chosen is None and "zero-computation experts" in chosen.reason


@functools.cache
def _longcat():
    if reason := hf_models.missing("longcat_flash"):
        pytest.skip(reason)
    model = hf_models.build("longcat_flash", "grouped_mm")
    router = next(m for m in model.modules() if type(m).__name__ == "LongcatFlashTopkRouter")
    with torch.no_grad():
        router.e_score_correction_bias.zero_()  # the example routing then picks both kinds
    return model


def _picks(model, inputs) -> torch.Tensor:
    router = next(m for m in model.modules() if type(m).__name__ == "LongcatFlashTopkRouter")
    got = []
    hook = router.register_forward_hook(lambda mod, args, out: got.append(out[2]))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return got[0]


@pytest.mark.parametrize("how", ["compile", "apply"])
def test_longcat_flash_identity_experts_rewritten(how):
    model = copy.deepcopy(_longcat())
    inputs = hf_models.example_inputs(model)
    ids = _picks(model, inputs)
    assert (ids >= 8).any() and (ids < 8).any(), ids  # the real routing takes both kinds of experts
    with torch.no_grad():
        ref = hf_models.logits(model(**inputs))
        if how == "compile":
            counters.clear()
            out = hf_models.logits(torch.compile(model, backend="moe_fx", options={"inner": "eager"})(**inputs))
            report = last_reports()[-1]
            assert counters["moe_fx"]["rewritten"] == 1, str(report)
        else:
            report = moe_fx.apply(model, **inputs)
            out = hf_models.logits(model(**inputs))
    assert len(report.matches) == 1, str(report)
    assert report.matches[0].spec.experts.identity_experts == 4
    assert rel_err(out, ref) < TOLERANCE[torch.float32]
