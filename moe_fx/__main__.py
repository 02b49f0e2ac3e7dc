"""`python -m moe_fx demo`: the README's main job.

Builds a small naive MoE model (two blocks of different forms) and a tiny HuggingFace Mixtral from a
config, rewrites both with moe_fx, and prints the match report, eager vs moe_fx error and timings.
"""

from __future__ import annotations

import argparse
import time

import torch

import moe_fx
from moe_fx import examples, hf_models


def _time(fn, *args, reps: int = 10, **kwargs) -> float:
    with torch.no_grad():
        fn(*args, **kwargs)
        start = time.perf_counter()
        for _ in range(reps):
            fn(*args, **kwargs)
    return (time.perf_counter() - start) / reps * 1e3


def _compare(name: str, model, compiled, *args) -> None:
    with torch.no_grad():
        ref, out = model(*args), compiled(*args)
    ref, out = getattr(ref, "logits", ref), getattr(out, "logits", out)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    t_eager, t_moe = _time(model, *args), _time(compiled, *args)
    print(
        f"{name}: max |moe_fx - eager| / max |eager| = {err:.2e}; "
        f"eager {t_eager:.2f} ms, moe_fx {t_moe:.2f} ms per call on {args[0].device}"
    )


def demo(inner: str) -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"moe_fx demo on {device}, torch {torch.__version__}\n")

    model = examples.TwoFormModel().eval().to(device)
    x = torch.randn(4, 16, 64, device=device)
    print("== naive model: a Python loop MoE and a gather+einsum MoE ==")
    print(moe_fx.explain(model, x))
    compiled = torch.compile(model, backend="moe_fx", options={"inner": inner})
    _compare("naive model, torch.compile(backend='moe_fx')", model, compiled, x)

    print("\n== tiny HuggingFace Mixtral (random weights, grouped_mm experts) ==")
    hf = hf_models.build("mixtral").to(device)
    ids = torch.randint(0, 128, (2, 24), device=device)
    with torch.no_grad():
        ref = hf(ids).logits
    import copy

    eager = copy.deepcopy(hf)
    print(moe_fx.apply(hf))
    with torch.no_grad():
        err = ((hf(ids).logits - ref).abs().max() / ref.abs().max()).item()
    print(
        f"HF Mixtral, moe_fx.apply: max |moe_fx - eager| / max |eager| = {err:.2e}; "
        f"eager {_time(eager, ids):.2f} ms, moe_fx {_time(hf, ids):.2f} ms per call on {device}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_fx")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="rewrite a naive MoE model and a tiny HF Mixtral; print report, error, timings")
    d.add_argument("--inner", default="inductor", choices=("inductor", "eager"), help="compiler after the rewrite")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.inner)


if __name__ == "__main__":
    main()
