#!/usr/bin/env python3
"""moe_bench --json lines (stdin) → a markdown table for docs/BENCHMARKS.md (no dependencies)."""
import json
import sys


def fmt_limit(value):
    return "∞" if value is None else f"{value:.2f}×"


lines = [json.loads(line) for line in sys.stdin if line.startswith("{")]
for c in (r for r in lines if "copy_gbps" in r):
    print(f"{c['backend']} copy bandwidth ({c['copy']}, read + write): {c['copy_gbps']:.1f} GB/s\n")
rows = [r for r in lines if "tokens" in r]
print("| backend | shape | T | sparsity | kept pairs | experts top-K → BEAM | top-K ms | BEAM ms "
      "| speed-up | FLOP limit | weight limit | floor ms | overhead limit | top-K GB/s | BEAM GB/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    gb = lambda v: "" if v is None else f"{v:.2f}"
    print(f"| {r['backend']} | {r['shape']} | {r['tokens']} | {r['sparsity']} | {r['kept_pairs']} "
          f"| {r['topk_distinct_experts']} → {r['distinct_experts']} | {r['topk_ms']:.3f} "
          f"| {r['beam_ms']:.3f} | {r['speedup']:.2f}× | {fmt_limit(r['flop_limit'])} "
          f"| {fmt_limit(r['weight_limit'])} | {r['floor_ms']:.3f} | {r['overhead_limit']:.2f}× "
          f"| {gb(r['topk_gbps'])} | {gb(r['gbps'])} |")
