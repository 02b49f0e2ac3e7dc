"""The command line: `python -m moe_fx demo` (the README's main job) and `python -m moe_fx inspect`.

demo: builds a small naive MoE model (two blocks of different forms) and a tiny HuggingFace Mixtral
from a config, rewrites both with moe_fx, and prints the match report, eager vs moe_fx error and timings.

inspect: prints `moe_fx.explain`'s report for one model, either a tiny HF model by name
(`--hf mixtral`, the names of `moe_fx.hf_models.ARCHITECTURES`) or any model a factory returns
(`--module pkg.mod:factory`). `--html`, `--draw` write the HTML report and before/after pictures;
`--apply` rewrites the model in place and compares it with eager; `--print-graph` prints the
rewritten graphs with their moe_fx nodes annotated.

tune: `moe_fx.tune` on the same choice of model (on a GPU): the Triton GEMMs of each of its MoE block shapes
timed per T-bucket (`--tokens`), the best configs written to the tuning cache.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import moe_fx
from moe_fx import examples, hf_models
from moe_fx.autotune import TOKENS


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
    eager = copy.deepcopy(hf)
    print(moe_fx.apply(hf))
    with torch.no_grad():
        err = ((hf(ids).logits - ref).abs().max() / ref.abs().max()).item()
    print(
        f"HF Mixtral, moe_fx.apply: max |moe_fx - eager| / max |eager| = {err:.2e}; "
        f"eager {_time(eager, ids):.2f} ms, moe_fx {_time(hf, ids):.2f} ms per call on {device}"
    )


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        msg = f"moe_fx: --shape {text!r} must be comma-separated integers, e.g. 4,32"
        raise argparse.ArgumentTypeError(msg) from None


def _from_factory(spec: str) -> tuple[nn.Module, tuple, dict]:
    """`pkg.mod:factory` -> (model, args, kwargs). The factory returns a model, or (model, args[, kwargs])."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"moe_fx: --module {spec!r} must look like pkg.mod:factory")
    factory = getattr(importlib.import_module(mod_name), attr, None)
    if factory is None:
        raise ValueError(f"moe_fx: module {mod_name!r} has no attribute {attr!r}")
    made = factory()
    if isinstance(made, tuple):
        model, args, kwargs = (*made, {}) if len(made) == 2 else made
        return model, tuple(args), dict(kwargs)
    return made, (), {}


def _inspect_inputs(args) -> tuple[nn.Module, tuple, dict]:
    if args.hf:
        model = hf_models.build(args.hf, args.experts_implementation)
        if args.shape is not None and len(args.shape) != 2:
            raise ValueError(f"moe_fx: --shape for --hf is batch,tokens (two integers), got {args.shape}")
        batch, T = args.shape or (2, 16)
        return model, (), hf_models.example_inputs(model, T, batch)
    model, inputs, kwargs = _from_factory(args.module)
    if args.shape:
        inputs = (torch.randn(args.shape),)
    return model, inputs, kwargs


def _to(value, device: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


def _model(args) -> tuple[nn.Module, tuple, dict, dict | None]:
    """(model, inputs, kwargs, options) of the command line, on its device and in its dtype."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, inputs, kwargs = _inspect_inputs(args)
    if not isinstance(model, nn.Module):
        raise ValueError(f"moe_fx: the factory must return an nn.Module, got {type(model).__name__}")
    model = model.eval().to(args.device, dtype)
    inputs = tuple(_to(a, args.device, dtype) for a in inputs)
    kwargs = {k: _to(v, args.device, dtype) for k, v in kwargs.items()}
    return model, inputs, kwargs, json.loads(args.options) if args.options else None


def tune(args) -> None:
    """Tune the Triton GEMMs of the chosen model's MoE blocks; print the best config per cache key."""
    model, inputs, kwargs, options = _model(args)
    results = moe_fx.tune(model, *inputs, tokens=tuple(args.tokens), options=options, **kwargs)
    from moe_fx.lowering.triton import tuning

    for key, r in results.items():
        print(f"{key}: {r['best']:.1f} µs  {r['config']}")
        for config in r["wrong"]:  # a tile this GPU and Triton compile wrong: say so, loudly
            print(f"  skipped {config}: {r['failed'][config]}")
    print(f"wrote {len(results)} entries to {tuning.cache_path()}")


def inspect(args) -> None:
    """Print explain's report for the chosen model; optionally write HTML/pictures, apply, print graphs."""
    model, inputs, kwargs, options = _model(args)
    report = moe_fx.explain(model, *inputs, options=options, **kwargs)
    print(report)
    if args.html:
        Path(args.html).write_text(report._repr_html_())
        print(f"wrote {args.html}")
    if args.draw:
        out = Path(args.draw)
        out.mkdir(parents=True, exist_ok=True)
        for i in range(len(report.matches)):
            for which in ("before", "after"):
                path = report.draw(which, i).save(out / f"block{i}_{which}.svg")
                print(f"wrote {path}")
    if args.apply or args.print_graph:
        eager = copy.deepcopy(model)
        applied = moe_fx.apply(model, *inputs, options=options, **kwargs)
        with torch.no_grad():
            ref, out = eager(*inputs, **kwargs), model(*inputs, **kwargs)
        ref, out = getattr(ref, "logits", ref), getattr(out, "logits", out)
        err = ((out - ref).double().norm() / ref.double().norm()).item()
        print(f"moe_fx.apply rewrote {len(applied.matches)} block(s); |moe_fx - eager| / |eager| = {err:.2e}")
        if args.print_graph:
            for name, module in model.named_modules():
                gm = getattr(module.forward, "gm", None)
                if gm is not None:
                    print(f"\n== {name or '<root>'}: the rewritten graph ==")
                    print(gm.print_readable(print_output=False))


def _model_arguments(p: argparse.ArgumentParser, default_dtype: str) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--hf", choices=sorted(hf_models.ARCHITECTURES), help="a tiny HF model built from a config")
    which.add_argument("--module", metavar="PKG.MOD:FACTORY", help="factory() -> model or (model, args[, kwargs])")
    p.add_argument("--shape", type=_shape, help="--hf: batch,tokens (default 2,16); --module: shape of a randn input")
    p.add_argument("--experts-implementation", default="grouped_mm", help="HF experts: grouped_mm|batched_mm|eager")
    p.add_argument("--dtype", default=default_dtype, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--options", help='moe_fx options as JSON, e.g. \'{"lowerings": {"experts": "reference"}}\'')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_fx")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="rewrite a naive MoE model and a tiny HF Mixtral; print report, error, timings")
    d.add_argument("--inner", default="inductor", choices=("inductor", "eager"), help="compiler after the rewrite")
    i = sub.add_parser("inspect", help="print what moe_fx finds in one model (moe_fx.explain)")
    _model_arguments(i, default_dtype="float32")
    i.add_argument("--html", metavar="FILE", help="also write the report as HTML")
    i.add_argument("--draw", metavar="DIR", help="also write block<i>_{before,after}.svg (needs graphviz dot)")
    i.add_argument("--apply", action="store_true", help="rewrite with moe_fx.apply and compare with eager")
    i.add_argument("--print-graph", action="store_true", help="print the rewritten graphs (implies --apply)")
    t = sub.add_parser("tune", help="tune the Triton GEMMs of one model's MoE blocks (moe_fx.tune; needs a GPU)")
    _model_arguments(t, default_dtype="bfloat16")
    t.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), help="token counts T")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.inner)
        return
    try:
        (tune if args.command == "tune" else inspect)(args)
    except (ValueError, ImportError, RuntimeError) as e:
        if not str(e).startswith("moe_fx:"):
            raise
        print(e, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
