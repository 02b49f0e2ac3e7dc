"""The torch.compile backend: found by name, scoped capture flags, Inductor after the rewrite, options."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from moe_fx import examples as ex
from tests.conftest import rel_err


def test_backend_found_by_name_in_a_fresh_process():
    code = textwrap.dedent("""
        import sys, torch
        from torch._dynamo.utils import counters
        assert "moe_fx" not in sys.modules
        from torch._dynamo import list_backends
        assert "moe_fx" in list_backends(exclude_tags=())
        import importlib; ex = importlib.import_module("moe_fx.examples")
        m = ex.LoopMoE().eval(); x = torch.randn(5, 32)
        with torch.no_grad():
            out = torch.compile(m, backend="moe_fx", options={"inner": "eager"})(x)
            assert torch.allclose(out, m(x), atol=1e-5)
        assert counters["moe_fx"]["rewritten"] == 1, dict(counters["moe_fx"])
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_capture_flags_hold_only_during_moe_fx_compiles():
    seen = []

    def spy(gm, example_inputs):
        seen.append(torch._dynamo.config.capture_dynamic_output_shape_ops)
        return gm.forward

    model = ex.LoopMoE().eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.compile(model, backend="moe_fx", options={"inner": "eager"})(x)
        assert counters["moe_fx"]["rewritten"] >= 1  # the loop was captured whole
        assert torch._dynamo.config.capture_dynamic_output_shape_ops is False
        torch._dynamo.reset()
        torch.compile(model, backend=spy)(x)
    assert seen and not any(seen)  # another backend still sees the default: a graph break at nonzero


def test_inductor_after_rewrite():
    model = ex.TwoFormModel().eval()
    x = torch.randn(2, 6, 64)
    counters.clear()
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="moe_fx")(x)
        out2 = torch.compile(model, backend="moe_fx")(x)
    assert counters["moe_fx"]["rewritten"] == 2
    assert rel_err(out, ref) < 1e-5 and rel_err(out2, ref) < 1e-5


def test_recompile_for_new_shape_reuses_stacked_weights():
    from moe_fx.passes import weights

    model = ex.LoopMoE().eval()
    compiled = torch.compile(model, backend="moe_fx", options={"inner": "eager"})
    storages = []
    with torch.no_grad():
        for T in (5, 9, 17):  # 9 recompiles with a dynamic T; 17 reuses that graph
            x = torch.randn(T, 32)
            assert rel_err(compiled(x), model(x)) < 1e-5
            storages.append(model.experts[0].w1.weight.untyped_storage().data_ptr())
    assert counters["moe_fx"]["rewritten"] == 2
    assert len(set(storages)) == 1, "the second rewrite reused the stack the parameters already live in"
    assert weights._STACKS.get(storages[0]) is not None


@pytest.mark.parametrize(
    "options, match",
    [
        ({"inner": "tvm"}, "inner='tvm' is not one of"),
        ({"fast": True}, r"unknown option\(s\) \['fast'\]; valid options are inner"),
        ({"quant": "fp4"}, "quant='fp4' is not one of"),
        ({"lowerings": {"gemm": "x"}}, "keyed by ops"),
    ],
)
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(Exception, match=match):
        with torch.no_grad():
            torch.compile(ex.LoopMoE().eval(), backend="moe_fx", options=options)(torch.randn(3, 32))
