"""End to end: real HF MoE models (Mixtral, Qwen3-MoE, DeepSeek-V3, GPT-OSS) at one layer's size, four ways.

Legend: T tokens of one sequence (prefill T=2048, decode T=1), E experts, K top-k, D model dim, F expert ffn dim.

Each model is the transformers model class itself (`...ForCausalLM`), built from a config with random
weights in bf16: one decoder layer whose MoE block has the sizes of `bench/layer.py`'s SHAPES (DeepSeek-V3
with 64 routed experts there), a 32k vocabulary. The forward (logits, no KV cache) is timed for:
- `hf_eager`: transformers' `eager` experts (the per-expert loop over `nonzero()`);
- `hf_gmm`: transformers' `grouped_mm` experts, run eagerly;
- `inductor`: `torch.compile(model)` (grouped_mm experts, Inductor);
- `moe_fx`: `torch.compile(model, backend="moe_fx")` (its inner compiler is Inductor).
Times are medians of `bench/layer.py`'s `bench` (L2 flushed between repetitions); `graph_us` times the
replays of one captured CUDA graph (`hf_eager` syncs on `nonzero()` and cannot be captured). `err` is
the rel err ‖logits − hf_eager's‖ / ‖hf_eager's‖ of each variant, on the same input.

    python bench/hf_models.py [--models mixtral qwen3_moe ...] [--T 2048 1] --out bench/results   # a GPU
    python bench/hf_models.py --tiny --out /tmp/x   # tiny sizes on the CPU (the test runs this)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer import SHAPES, bench, rel_err  # noqa: E402

from moe_fx import hf_models  # noqa: E402
from moe_fx.lowering.triton import timing  # noqa: E402

VOCAB = 32000
# name: (transformers config, model class, bench/layer.py shape, config fields beyond the MoE sizes)
MODELS = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        "mixtral",
        dict(num_attention_heads=32, num_key_value_heads=8),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        "qwen3",
        dict(num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        "deepseek",
        dict(
            num_attention_heads=128,
            num_key_value_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=8,
            topk_group=4,
            routed_scaling_factor=2.5,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        "gptoss",
        dict(num_attention_heads=64, num_key_value_heads=8, head_dim=64, layer_types=["full_attention"]),
    ),
}
# The MoE-size fields each config names differently: E, K, F.
FIELDS = {
    "mixtral": ("num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "deepseek_v3": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gpt_oss": ("num_local_experts", "num_experts_per_tok", "intermediate_size"),
}
TINY = dict(E=8, K=2, D=64, F=48, heads=4)
VARIANTS = ("hf_eager", "hf_gmm", "inductor", "moe_fx")


def build(name: str, tiny: bool, device: str) -> torch.nn.Module:
    """The model with random weights, bf16 on the GPU (fp32 on the CPU: the tiny run checks, not times)."""
    import transformers

    config_name, model_name, shape, extra = MODELS[name]
    E, K, D, F = SHAPES[shape]
    if tiny:  # the tiny config keeps the model's own kind of attention, at tiny sizes
        E, K, D, F = TINY["E"], TINY["K"], TINY["D"], TINY["F"]
        extra = {k: v for k, v in extra.items() if k not in ("num_attention_heads", "num_key_value_heads", "head_dim")}
        extra |= dict(num_attention_heads=TINY["heads"], num_key_value_heads=TINY["heads"], head_dim=16)
        if name == "deepseek_v3":
            extra |= dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
            extra |= dict(head_dim=8, n_group=4, topk_group=2)
    e_field, k_field, f_field = FIELDS[name]
    config = getattr(transformers, config_name)(
        vocab_size=128 if tiny else VOCAB,
        hidden_size=D,
        num_hidden_layers=1,
        max_position_embeddings=4096,
        **{e_field: E, k_field: K, f_field: F},
        **extra,
    )
    config._experts_implementation = "grouped_mm"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.device(device):
        model = getattr(transformers, model_name)(config).to(dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # fan-in scaled weights: logits of a sane size in bf16
                p.copy_(torch.randn(p.shape, generator=g, device=device) * p.shape[-1] ** -0.5)
    hf_models._randomize_zero_biases(model)  # router correction biases, expert biases: nonzero, as trained
    return model


def _impl(model, impl: str):
    model.config._experts_implementation = impl
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_experts_implementation"):
            m.config._experts_implementation = impl


def variants(model, inner: str) -> dict:
    """name -> fn(input_ids) -> logits. The compiled ones compile on their first call."""
    inductor = torch.compile(model)
    moe_fx = torch.compile(model, backend="moe_fx", options={"inner": inner})

    def eager(impl):
        def run(ids):
            _impl(model, impl)
            try:
                return model(input_ids=ids, use_cache=False).logits
            finally:
                _impl(model, "grouped_mm")

        return run

    return {
        "hf_eager": eager("eager"),
        "hf_gmm": eager("grouped_mm"),
        "inductor": lambda ids: inductor(input_ids=ids, use_cache=False).logits,
        "moe_fx": lambda ids: moe_fx(input_ids=ids, use_cache=False).logits,
    }


def cpu_us(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def run_model(name: str, Ts: list[int], chosen: list[str], tiny: bool, device: str, inner: str) -> list[dict]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = build(name, tiny, device)
    fns = variants(model, inner)
    cuda = device == "cuda"
    rows = []
    for T in Ts:
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
        row = {"model": name, "T": T, "us": {}, "graph_us": {}, "err": {}}
        with torch.no_grad():
            ref = fns["hf_eager"](ids)
            for v in chosen:
                try:
                    counters.clear()
                    out = fns[v](ids)
                    if v == "moe_fx":
                        row["rewritten"] = counters["moe_fx"]["rewritten"]
                    row["err"][v] = rel_err(out, ref)
                    call = functools.partial(fns[v], ids)
                    row["us"][v] = bench(call) if cuda else cpu_us(call)
                except Exception as err:  # a variant that cannot run is reported, not fatal
                    row["us"][v] = float("nan")
                    row.setdefault("failed", {})[v] = f"{type(err).__name__}: {err}"[:300]
                    continue
                if cuda and v != "hf_eager":
                    try:
                        row["graph_us"][v] = bench(timing.graph_replay(call))
                    except Exception as err:  # eager ran; only the CUDA-graph capture failed
                        row.setdefault("graph_failed", {})[v] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        _print_row(row, chosen)
    fns.clear()
    del model
    if cuda:
        torch.cuda.empty_cache()
    return rows


def _cell(row, v) -> str:
    us, g = row["us"].get(v, float("nan")), row["graph_us"].get(v)
    graph = f" (g {g:.0f})" if g else (" (g fail)" if v in row.get("graph_failed", {}) else "")
    text = "fail" if math.isnan(us) else f"{us:.0f}{graph}"
    return text + (f" e={row['err'][v]:.1e}" if v in row["err"] else "")


def _print_row(row, chosen):
    print(f"| {row['model']} | {row['T']} | " + " | ".join(_cell(row, v) for v in chosen) + " |", flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--T", nargs="+", type=int, default=[2048, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (on the CPU when there is no GPU)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"], help="moe_fx's inner compiler")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        p.error("moe_fx: without a GPU only --tiny runs")
    Ts = [7, 1] if args.tiny and args.T == [2048, 1] else args.T
    torch.manual_seed(0)
    print("µs per forward (g: CUDA-graph replay); e: rel err of the logits vs hf_eager")
    print("| model | T | " + " | ".join(args.variants) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    import transformers

    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "variants": args.variants,
        "tiny": args.tiny,
        "layers": 1,
        "moe_fx_inner": args.inner,
        "cuda_graph_note": "graph_us: one call captured, replays timed",
    }
    rows = []
    path = out / f"hf_models-{stamp}.json"
    for name in args.models:
        rows += run_model(name, Ts, args.variants, args.tiny, device, args.inner)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return {"meta": meta, "rows": rows, "path": str(path)}


if __name__ == "__main__":
    main()
