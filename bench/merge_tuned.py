"""Merge the entries of a tuning cache (a GPU run's MOE_FX_TUNING_CACHE) into the entries moe_fx ships.

Each cache key names its shape, dtype, quant mode, device and T-bucket (`tuning.key`); an entry holds the up and
down GEMM configs, the µs it was timed at and the compute capability. A merged entry replaces the shipped one
of the same key: it was timed on the current code (times of older entries may predate kernel changes). Prints
what it adds and replaces, old µs and configs beside the new.

    python bench/merge_tuned.py OUT/tuning_cache.json [--match fp8 ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_fx.lowering.triton import tuning

FIELDS = ("up", "down", "us", "capability")


def describe(entry: dict) -> str:
    return tuning.describe(tuning.entry_config(entry))


def merge(cache: dict, shipped: dict, match: list[str]) -> list[str]:
    """Copy cache's entries whose key contains every string of `match` into shipped; one line per change."""
    lines = []
    for key, entry in sorted(cache.items()):
        if not all(m in key for m in match):
            continue
        missing = [f for f in FIELDS if f not in entry]
        if missing:
            raise ValueError(f"moe_fx: tuning cache entry {key!r} lacks {missing}; expected the fields {FIELDS}")
        old = shipped.get(key)
        before = f"{old['us'].get('best', float('nan')):.1f} µs {describe(old)} -> " if old else ""
        lines.append(f"{'replace' if old else 'add'} {key}: {before}{entry['us'].get('best', float('nan')):.1f} µs "
                     f"{describe(entry)}")  # fmt: skip
        shipped[key] = entry
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache", type=Path)
    p.add_argument("--match", nargs="*", default=[], help="merge only keys containing all of these")
    p.add_argument("--into", type=Path, default=tuning.PACKAGED, help="the shipped entries (tuned.json)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    shipped = json.loads(args.into.read_text())
    for line in merge(json.loads(args.cache.read_text()), shipped, args.match):
        print(line)
    if not args.dry_run:
        args.into.write_text(json.dumps(shipped, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
