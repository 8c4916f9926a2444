#!/usr/bin/env bash
# Trains the shipped BEAM adapters of assets/models/kjv-moe (one per λ) and evaluates them against
# top-K and the training-free peers on the held-out chapters; writes the tables and plots in docs/.
# CPU only; about 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
M=assets/models/kjv-moe
cargo build --release --bin beam
BEAM=target/release/beam
[ -n "${CARGO_TARGET_DIR:-}" ] && BEAM="$CARGO_TARGET_DIR/release/beam"
mkdir -p "$M/adapters" docs/eval runs
LAMBDAS=${LAMBDAS:-"0.03 0.1 0.3 1"}
ADAPTERS=()
for L in $LAMBDAS; do
  "$BEAM" train --model "$M" --data assets/corpus/kjv-train.txt.gz --out "runs/kjv-lambda$L" \
    --steps "${STEPS:-400}" --lambda "$L" --log-every 50
  cp "runs/kjv-lambda$L/adapter.safetensors" "$M/adapters/lambda-$L.safetensors"
  ADAPTERS+=(--adapter "lambda=$L=$M/adapters/lambda-$L.safetensors")
done
"$BEAM" eval --model "$M" --data assets/corpus/kjv-valid.txt.gz "${ADAPTERS[@]}" --peers \
  --json docs/eval/kjv-moe.json --plot docs/eval/quality_vs_flops.png \
  --layer-plot docs/eval/experts_per_layer.png | tee docs/eval/kjv-moe.md
