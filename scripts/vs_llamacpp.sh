#!/usr/bin/env bash
# beam against llama.cpp on the same checkpoint, in alternating rounds (by hand, not in CI).
#
# usage: scripts/vs_llamacpp.sh CKPT_DIR GGUF_PREFIX [ROUNDS]
#   CKPT_DIR     a safetensors checkpoint (e.g. from ../shared/tools/make_olmoe_checkpoint.py)
#   GGUF_PREFIX  the same weights as GGUF: GGUF_PREFIX-BF16.gguf, GGUF_PREFIX-Q8_0.gguf and (for q4)
#                GGUF_PREFIX-Q4_0.gguf (../shared/tools/make_gguf.sh CKPT_DIR GGUF_PREFIX bf16 Q8_0 Q4_0)
#   ROUNDS       alternating rounds (default 3)
# env: LLAMA_BIN (llama.cpp's build/bin, default /tmp/llamacpp/build/bin from build_llamacpp.sh),
#      BEAM (the beam binary, default target/release/beam), THREADS (default 2),
#      PROMPT / NEW (tokens, default 64 / 32), WARM=0 to skip re-reading each file before its run,
#      FORMATS (default "bf16 q8"; any of bf16 q8 q4, in the order given),
#      DEPTH (default 0): decode after DEPTH positions of context, llama.cpp's `-d DEPTH` and beam's
#      `--prompt-tokens DEPTH` (the prefill columns then compare llama.cpp's PROMPT tokens after
#      DEPTH with beam's DEPTH tokens from an empty cache: read only the decode ratios),
#      KV (beam's --kv-cache; default beam's own: f16 for q8 / q4, bf16 for bf16 weights;
#      llama.cpp's cache is f16, its default).
#
# Each round runs, per format, llama.cpp on its GGUF (BF16, Q8_0, Q4_0), then beam at the same
# precision (top-K and keep-1: --quantize q8 / q4 for the quantized ones). Before each run the engine's file is evicted from the page cache and read back in
# (`posix_fadvise(DONTNEED)`, then `cat`): a 16-layer checkpoint and its GGUF do not both fit in
# 24 GB, and a file read in one go gets the page cache's large folios, which stream faster.
# The memory speed of a shared VM moves within minutes, so compare within a round, never across.
# Prints one line per round and format: both engines' tokens/s, the decode and prefill ratios
# beam / llama.cpp, and BEAM keep-1 against llama.cpp's top-K (the issues' targets).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$1; PREFIX=$2; ROUNDS=${3:-3}
L=${LLAMA_BIN:-/tmp/llamacpp/build/bin}
B=${BEAM:-target/release/beam}
T=${THREADS:-2}; P=${PROMPT:-64}; N=${NEW:-32}; D=${DEPTH:-0}
BEAM_PROMPT=$P; [ "$D" -gt 0 ] && BEAM_PROMPT=$D
KV_ARGS=(); [ -n "${KV:-}" ] && KV_ARGS=(--kv-cache "$KV")
for f in "$L/llama-bench" "$B" "$CKPT/config.json"; do
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
  [ -e "$PREFIX-$1.gguf" ] || { echo "missing: $PREFIX-$1.gguf" >&2; exit 1; }
  warm "$PREFIX-$1.gguf"
  "$L/llama-bench" -m "$PREFIX-$1.gguf" -t "$T" -p "$P" -n "$N" -d "$D" -r 2 -o csv 2>/dev/null |
    python3 -c 'import csv, sys
rows = list(csv.DictReader(sys.stdin))
get = lambda key: next(float(r["avg_ts"]) for r in rows if int(r[key]) > 0)
print(get("n_prompt"), get("n_gen"))'
}

# beam bench --json: top-K then keep-1, prefill and decode tokens/s of each.
beam() {
  warm "$CKPT"/*.safetensors
  RAYON_NUM_THREADS=$T "$B" bench --model "$CKPT" "$@" "${KV_ARGS[@]}" --prompt-tokens "$BEAM_PROMPT" \
    --new-tokens "$N" --keep 1 --json 2>/dev/null |
    python3 -c 'import json, sys
rows = [json.loads(line) for line in sys.stdin if line.strip()]
print(" ".join(f"{r[k]:.2f}" for r in rows for k in ("prefill_tokens_per_s", "decode_tokens_per_s")))'
}

# One format: llama.cpp on its GGUF, then beam on the checkpoint; prints the pair and the ratios.
pair() {
  local fmt=$1 gguf=$2; shift 2
  read -r l_pp l_tg < <(llama "$gguf")
  read -r b_pp b_tg _ b_k1 < <(beam "$@")
  python3 - "$round" "$fmt" "$gguf" "$l_pp" "$l_tg" "$b_pp" "$b_tg" "$b_k1" <<'EOF'
import sys
r, fmt, gguf = sys.argv[1:4]
l_pp, l_tg, b_pp, b_tg, b_k1 = [float(x) for x in sys.argv[4:]]
print(f"round {r} {fmt}: llama.cpp {gguf} pp {l_pp:.1f} tg {l_tg:.2f} | beam prefill {b_pp:.1f} decode {b_tg:.2f} keep-1 {b_k1:.2f}"
      f" | decode {b_tg / l_tg:.2f}x, prefill {b_pp / l_pp:.2f}x, keep-1 {b_k1 / l_tg:.2f}x llama.cpp {gguf}"
      f" (keep-1 / top-K {b_k1 / b_tg:.2f}x)")
EOF
}

for round in $(seq "$ROUNDS"); do
  for fmt in ${FORMATS:-bf16 q8}; do
    case $fmt in
      bf16) pair bf16 BF16 ;;
      q8) pair q8 Q8_0 --quantize q8 ;;
      q4) pair q4 Q4_0 --quantize q4 ;;
      *) echo "unknown format $fmt (bf16, q8, q4)" >&2; exit 1 ;;
    esac
  done
done
