"""bench/decode_chain.py: every variant it times computes what it says, on the CPU (Triton under the interpreter,
fp16: its bf16 dots are wrong); the timing needs a GPU and is not run here."""

import torch

from tests.bench.scripts import load
from tests.conftest import TOLERANCE, fuse_every_config, rel_err
from tests.lowering.triton.conftest import DEVICE


def test_the_chain_and_the_routed_kernel_compute_one_layer(monkeypatch):
    fuse_every_config(monkeypatch)  # the routed variant runs with fused configs only
    bench = load("decode_chain")
    monkeypatch.setitem(bench.SHAPES, "tiny", (8, 2, 64, 32))
    fns = bench.variants("tiny", 3, DEVICE, torch.float16)
    assert list(fns) == list(bench.VARIANTS)
    outs = {name: fn() for name, fn in fns.items()}
    for name in ("routed", "no_route_sort", "experts"):  # the same routing (one set of inputs): the same layer
        assert rel_err(outs[name].cpu(), outs["chain"].cpu()) < TOLERANCE[torch.float16], name
    assert not outs["fill"].any()
    weights, ids = outs["route"]
    assert ids.shape == (3, 2) and outs["dispatch"][3].shape == (6,)
