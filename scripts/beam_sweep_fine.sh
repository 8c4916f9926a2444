#!/usr/bin/env bash
# Issue 16 on the fine-grained base model assets/models/kjv-moe-fine (64 experts of 32, top-8):
# BEAM mask routers alone (per-expert at λ = 3, 10; per-slot at λ = 30), BEAM end-to-end (the
# per-slot λ = 30 mask, then the whole model with it for 300 steps at lr 5e-4), the fixed K' = 1
# retrained with the same token budget (700 steps), against top-K, the training-free peers and
# the fixed smaller K' untrained. Writes docs/eval/kjv-moe-fine.{json,md}, the plots and the
# token map, and copies the adapters into the model folder. CPU only: about 45 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
M=assets/models/kjv-moe-fine
D=assets/corpus/kjv-train.txt.gz
cargo build --release --bin beam
B="${CARGO_TARGET_DIR:-target}/release/beam"
mkdir -p "$M/adapters" docs/eval runs
for L in 3 10; do
  "$B" train --model $M --data $D --out runs/fine-lambda$L --steps 400 --lr 0.02 --lambda $L --log-every 100
done
"$B" train --model $M --data $D --out runs/fine-slot-lambda30 --steps 400 --lr 0.02 --lambda 30 \
  --mask-shape per-slot --log-every 100
"$B" train --model $M --data $D --out runs/fine-slot-lambda30-all --steps 300 --lr 5e-4 --lambda 30 \
  --train all --init-adapter runs/fine-slot-lambda30/adapter.safetensors --log-every 50
"$B" train --model $M --data $D --out runs/fine-fixed1 --steps 700 --lr 5e-4 --fixed-k 1 --train all \
  --log-every 100
for R in lambda3 lambda10 slot-lambda30; do cp runs/fine-$R/adapter.safetensors "$M/adapters/$R.safetensors"; done
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz \
  --adapter "slot lambda=30=$M/adapters/slot-lambda30.safetensors" \
  --adapter "lambda=10=$M/adapters/lambda10.safetensors" \
  --adapter "lambda=3=$M/adapters/lambda3.safetensors" \
  --trained "beam e2e slot lambda=30=runs/fine-slot-lambda30-all" \
  --trained "fixed-k 1 trained=runs/fine-fixed1" \
  --peers --max-tokens 16384 --choice-items 2000 \
  --json docs/eval/kjv-moe-fine.json --plot docs/eval/fine_quality_vs_flops.png \
  --choice-plot docs/eval/fine_choice_vs_flops.png --layer-plot docs/eval/fine_experts_per_layer.png \
  --token-map docs/eval/fine_token_map.html | tee docs/eval/kjv-moe-fine.md
