"""Compile-time cost of `options={"verify": True}`: python -m bench.verify_cost [--repeats N] [--threads N].

Compiles the demo model (`examples.TwoFormModel`) and a tiny HF Mixtral with the moe_fx backend
(inner="eager", so only moe_fx's own work is timed), verification on and off, alternating, from a
fresh Dynamo each time; prints the median wall time of each and the cost of verification.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_fx import examples, hf_models


def _compile_seconds(model, inputs, verify: bool) -> float:
    torch._dynamo.reset()
    start = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend="moe_fx", options={"inner": "eager", "verify": verify})(*inputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # on a shared 2-core box, OpenMP spinning swamps tiny ops
    cases = {
        "TwoFormModel (2 blocks, T=2x16)": (examples.TwoFormModel().eval(), (torch.randn(2, 16, 64),)),
        "tiny HF Mixtral (2 blocks, T=2x16)": (hf_models.build("mixtral"), (torch.randint(0, 128, (2, 16)),)),
    }
    for name, (model, inputs) in cases.items():
        _compile_seconds(model, inputs, True)  # warm-up: imports, first-compile caches
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for verify in (False, True):
                times[verify].append(_compile_seconds(model, inputs, verify))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name}: verify off {off:.2f} s, on {on:.2f} s, cost {on - off:+.2f} s ({(on - off) / off:+.0%})")


if __name__ == "__main__":
    main()
