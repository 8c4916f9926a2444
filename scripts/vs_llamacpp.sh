#!/usr/bin/env bash
# beam against llama.cpp on the same checkpoint, in alternating rounds (by hand, not in CI).
#
# usage: scripts/vs_llamacpp.sh CKPT_DIR GGUF_PREFIX [ROUNDS]
#   CKPT_DIR     a safetensors checkpoint (e.g. from ../shared/tools/make_olmoe_checkpoint.py)
#   GGUF_PREFIX  the same weights as GGUF: GGUF_PREFIX-BF16.gguf and GGUF_PREFIX-Q8_0.gguf
#                (../shared/tools/make_gguf.sh CKPT_DIR GGUF_PREFIX bf16 Q8_0)
#   ROUNDS       alternating rounds (default 3)
# env: LLAMA_BIN (llama.cpp's build/bin, default /tmp/llamacpp/build/bin from build_llamacpp.sh),
#      BEAM (the beam binary, default target/release/beam), THREADS (default 2),
#      PROMPT / NEW (tokens, default 64 / 32), WARM=0 to skip re-reading each file before its run.
#
# Each round runs llama.cpp BF16, beam bf16 (top-K and keep-1), llama.cpp Q8_0, beam q8, in that
# order. Before each run the engine's file is evicted from the page cache and read back in
# (`posix_fadvise(DONTNEED)`, then `cat`): a 16-layer checkpoint and its GGUF do not both fit in
# 24 GB, and a file read in one go gets the page cache's large folios, which stream faster.
# The memory speed of a shared VM moves within minutes, so compare within a round, never across.
# Prints each round's rows, then per round: decode and prefill ratios beam / llama.cpp, and
# BEAM keep-1 against llama.cpp's top-K (the issues' targets).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$1; PREFIX=$2; ROUNDS=${3:-3}
L=${LLAMA_BIN:-/tmp/llamacpp/build/bin}
B=${BEAM:-target/release/beam}
T=${THREADS:-2}; P=${PROMPT:-64}; N=${NEW:-32}
for f in "$L/llama-bench" "$B" "$PREFIX-BF16.gguf" "$PREFIX-Q8_0.gguf" "$CKPT/config.json"; do
  [ -e "$f" ] || { echo "missing: $f" >&2; exit 1; }
done

warm() {
  [ "${WARM:-1}" = 0 ] && return
  python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"
  cat "$@" > /dev/null
}

# llama-bench's table: "pp<P>" and "tg<N>" rows, tokens/s in the last column.
llama() {
  warm "$PREFIX-$1.gguf"
  "$L/llama-bench" -m "$PREFIX-$1.gguf" -t "$T" -p "$P" -n "$N" -r 2 -o csv 2>/dev/null |
    python3 -c 'import csv, sys
rows = list(csv.DictReader(sys.stdin))
get = lambda key: next(float(r["avg_ts"]) for r in rows if int(r[key]) > 0)
print(get("n_prompt"), get("n_gen"))'
}

# beam bench --json: top-K then keep-1, prefill and decode tokens/s of each.
beam() {
  warm "$CKPT"/*.safetensors
  RAYON_NUM_THREADS=$T "$B" bench --model "$CKPT" "$@" --prompt-tokens "$P" --new-tokens "$N" \
    --keep 1 --json 2>/dev/null |
    python3 -c 'import json, sys
rows = [json.loads(line) for line in sys.stdin if line.strip()]
print(" ".join(f"{r[k]:.2f}" for r in rows for k in ("prefill_tokens_per_s", "decode_tokens_per_s")))'
}

for round in $(seq "$ROUNDS"); do
  read -r lb_pp lb_tg < <(llama BF16)
  read -r bb_pp bb_tg _ bb_k1 < <(beam)
  read -r lq_pp lq_tg < <(llama Q8_0)
  read -r bq_pp bq_tg _ bq_k1 < <(beam --quantize q8)
  python3 - "$round" "$lb_pp" "$lb_tg" "$bb_pp" "$bb_tg" "$bb_k1" "$lq_pp" "$lq_tg" "$bq_pp" "$bq_tg" "$bq_k1" <<'EOF'
import sys
r, lb_pp, lb_tg, bb_pp, bb_tg, bb_k1, lq_pp, lq_tg, bq_pp, bq_tg, bq_k1 = sys.argv[1:2] + [float(x) for x in sys.argv[2:]]
print(f"round {r}: llama.cpp BF16 pp {lb_pp:.1f} tg {lb_tg:.2f} | beam bf16 prefill {bb_pp:.1f} decode {bb_tg:.2f} keep-1 {bb_k1:.2f}"
      f" | llama.cpp Q8_0 pp {lq_pp:.1f} tg {lq_tg:.2f} | beam q8 prefill {bq_pp:.1f} decode {bq_tg:.2f} keep-1 {bq_k1:.2f}")
print(f"  bf16: decode {bb_tg / lb_tg:.2f}x, prefill {bb_pp / lb_pp:.2f}x llama.cpp BF16;"
      f" q8: decode {bq_tg / lq_tg:.2f}x, prefill {bq_pp / lq_pp:.2f}x llama.cpp Q8_0;"
      f" keep-1 on q8 {bq_k1 / lq_tg:.2f}x llama.cpp Q8_0 (keep-1 / top-K {bq_k1 / bq_tg:.2f}x)")
EOF
done
