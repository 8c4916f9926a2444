#!/usr/bin/env bash
# Trains the shipped BEAM adapters of assets/models/kjv-moe (one per λ, mask routers only, KL
# distillation to the frozen top-K model) and evaluates them against top-K and the training-free
# peers on the whole held-out split; writes the table, JSON and plots into docs/eval/.
# CPU only: about 15 minutes on 2 cores (JOBS trainings run at once).
set -euo pipefail
cd "$(dirname "$0")/.."
M=assets/models/kjv-moe
cargo build --release --bin beam
BEAM="${CARGO_TARGET_DIR:-target}/release/beam"
mkdir -p "$M/adapters" docs/eval runs
LAMBDAS=${LAMBDAS:-"0.1 0.3 1 3 10"}
export BEAM M
printf '%s\n' $LAMBDAS | xargs -P "${JOBS:-2}" -I{} sh -c \
  '"$BEAM" train --model "$M" --data assets/corpus/kjv-train.txt.gz --out "runs/kjv-lambda{}" \
     --steps "${STEPS:-400}" --lr 0.02 --lambda {} --log-every 100 \
   && cp "runs/kjv-lambda{}/adapter.safetensors" "$M/adapters/lambda-{}.safetensors"'
ADAPTERS=()
for L in $LAMBDAS; do ADAPTERS+=(--adapter "lambda=$L=$M/adapters/lambda-$L.safetensors"); done
"$BEAM" eval --model "$M" --data assets/corpus/kjv-valid.txt.gz "${ADAPTERS[@]}" --peers \
  --json docs/eval/kjv-moe.json --plot docs/eval/quality_vs_flops.png \
  --layer-plot docs/eval/experts_per_layer.png | tee docs/eval/kjv-moe.md
