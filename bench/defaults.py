"""How good moe_fx's untuned Triton configs are: the experts op with the default config, with the default
narrowed to fill the GPU's SMs (`tuning.spread`, what an untuned shape runs), and with the tuned entry
(`tuning.choose`, where the cache or moe_fx's shipped entries have one). Each is timed as a CUDA-graph
replay: at decode the eager op is bound by its ~95 µs of host launch time, not by its kernels.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k.

    python bench/defaults.py --out DIR [--shapes mixtral ...] [--T 1 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experts_op import experts_op, write_rows  # noqa: E402
from layer import SHAPES, bench  # noqa: E402

from moe_fx.lowering.triton import timing, tuning  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--T", nargs="+", type=int, default=[1, 16])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    sms = tuning.sm_count(device)
    rows = []
    print(f"{torch.cuda.get_device_name()}, {sms} SMs; experts op µs, graph replays (up N-tile / down N-tile)")
    print("| shape | T | default | spread | tuned |\n|---|---|---|---|---|")
    for name in args.shapes:
        E, K, D, F = SHAPES[name]
        for T in args.T:
            run, R = experts_op(name, T), T * K
            default = tuning.default_config(R / E, torch.bfloat16)
            configs = {
                "default": default,
                "spread": tuning.spread(default, E, D, F, R, sms),
                "tuned": tuning.choose(E, D, F, K, True, torch.bfloat16, device, R),
            }
            us = {k: bench(timing.graph_replay(lambda c=c, run=run: run(c))) for k, c in configs.items()}
            rows.append({"shape": name, "T": T, "us": us, "configs": {k: str(c) for k, c in configs.items()}})
            cells = [f"{us[k]:.1f} ({c.up.block_n}/{c.down.block_n})" for k, c in configs.items()]
            print(f"| {name} | {T} | " + " | ".join(cells) + " |", flush=True)
    write_rows(args.out, "defaults", rows, sms=sms)


if __name__ == "__main__":
    main()
