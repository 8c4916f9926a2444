#!/usr/bin/env bash
# Issue 16 on the fine-grained base model assets/models/kjv-moe-fine (64 experts of 32, top-8):
# BEAM mask routers alone (per-expert at λ = 3, 10; per-slot at λ = 30), BEAM end-to-end (the
# per-slot λ = 30 mask, then the whole model with it for 300 steps at lr 5e-4: with λ = 30, or
# holding a target active fraction of 0.07 or 0.055 with λ = 300), the fixed K' = 1 retrained
# with the same token budget (700 steps), against top-K, the training-free peers and the fixed
# smaller K' untrained. Then the coarse model's end-to-end and fixed-K' = 1 runs. Writes docs/eval/kjv-moe-fine.{json,md}, the plots and the
# token map, and copies the adapters into the model folder. CPU only: about two and a half hours
# on 2 cores (the session-17 runs at the end: ~75 min).
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
for T in 0.07 0.055; do
  "$B" train --model $M --data $D --out runs/fine-slot-target${T#0.}-all --steps 300 --lr 5e-4 --lambda 300 \
    --target-active-fraction $T --train all --init-adapter runs/fine-slot-lambda30/adapter.safetensors --log-every 50
done
"$B" train --model $M --data $D --out runs/fine-fixed1 --steps 700 --lr 5e-4 --fixed-k 1 --train all \
  --log-every 100
for R in lambda3 lambda10 slot-lambda30; do cp runs/fine-$R/adapter.safetensors "$M/adapters/$R.safetensors"; done
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz \
  --adapter "slot lambda=30=$M/adapters/slot-lambda30.safetensors" \
  --adapter "lambda=10=$M/adapters/lambda10.safetensors" \
  --adapter "lambda=3=$M/adapters/lambda3.safetensors" \
  --trained "beam e2e slot lambda=30=runs/fine-slot-lambda30-all" \
  --trained "beam e2e slot target=0.07=runs/fine-slot-target07-all" \
  --trained "beam e2e slot target=0.055=runs/fine-slot-target055-all" \
  --trained "fixed-k 1 trained=runs/fine-fixed1" \
  --token-map-of "beam e2e slot target=0.07" \
  --peers --max-tokens 16384 --choice-items 2000 \
  --json docs/eval/kjv-moe-fine.json --plot docs/eval/fine_quality_vs_flops.png \
  --choice-plot docs/eval/fine_choice_vs_flops.png --layer-plot docs/eval/fine_experts_per_layer.png \
  --token-map docs/eval/fine_token_map.html | tee docs/eval/kjv-moe-fine.md
C=assets/models/kjv-moe
"$B" train --model $C --data $D --out runs/kjv-lambda10-all --steps 300 --lr 5e-4 --lambda 10 --train all \
  --init-adapter $C/adapters/lambda-10.safetensors --log-every 50
"$B" train --model $C --data $D --out runs/kjv-fixed1 --steps 700 --lr 5e-4 --fixed-k 1 --train all --log-every 100
"$B" eval --model $C --data assets/corpus/kjv-valid.txt.gz \
  --adapter "lambda=10=$C/adapters/lambda-10.safetensors" \
  --trained "beam e2e lambda=10=runs/kjv-lambda10-all" \
  --trained "fixed-k 1 trained=runs/kjv-fixed1" \
  --max-tokens 16384 --choice-items 2000 --json docs/eval/kjv-moe-e2e.json | tee docs/eval/kjv-moe-e2e.md

# Session 17: end-to-end from the first step (mask routers at their own learning rate, the
# target active fraction ramped down over 200 steps), against fixed K' = 2 and 1 retrained with
# the same 700 steps; the same without the ramp. Writes docs/eval/kjv-moe-fine-warm.{json,md},
# kjv-moe-warm.{json,md} (coarse model), the plots and the token map.
E2E="--steps 700 --lr 5e-4 --lambda 300 --mask-shape per-slot --train all --mask-lr 0.02 --log-every 100"
for T in 0.25 0.19 0.125 0.09 0.06; do
  "$B" train --model $M --data $D --out runs/fine-warm-target${T#0.} $E2E --sparsity-warmup 200 --target-active-fraction $T
done
for T in 0.125 0.06; do
  "$B" train --model $M --data $D --out runs/fine-joint-target${T#0.} $E2E --target-active-fraction $T
done
for K in 2 1; do
  "$B" train --model $M --data $D --out runs/fine-fixed$K --steps 700 --lr 5e-4 --fixed-k $K --train all --log-every 100
done
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz \
  --trained "beam e2e warm target=0.25=runs/fine-warm-target25" \
  --trained "beam e2e warm target=0.19=runs/fine-warm-target19" \
  --trained "beam e2e warm target=0.125=runs/fine-warm-target125" \
  --trained "beam e2e warm target=0.09=runs/fine-warm-target09" \
  --trained "beam e2e warm target=0.06=runs/fine-warm-target06" \
  --trained "fixed-k 2 trained=runs/fine-fixed2" \
  --trained "fixed-k 1 trained=runs/fine-fixed1" \
  --token-map-of "beam e2e warm target=0.125" \
  --max-tokens 16384 --choice-items 2000 \
  --json docs/eval/kjv-moe-fine-warm.json --plot docs/eval/fine_warm_quality_vs_flops.png \
  --choice-plot docs/eval/fine_warm_choice_vs_flops.png \
  --token-map docs/eval/fine_warm_token_map.html | tee docs/eval/kjv-moe-fine-warm.md
# The same end-to-end recipe without the warmup (its own table: the plots draw one line per method).
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz \
  --trained "beam e2e no-warmup target=0.125=runs/fine-joint-target125" \
  --trained "beam e2e no-warmup target=0.06=runs/fine-joint-target06" \
  --max-tokens 16384 --choice-items 2000 --json docs/eval/kjv-moe-fine-nowarmup.json | tee docs/eval/kjv-moe-fine-nowarmup.md
"$B" train --model $C --data $D --out runs/kjv-warm-target25 $E2E --sparsity-warmup 200 --target-active-fraction 0.25
"$B" train --model $C --data $D --out runs/kjv-fixed2 --steps 700 --lr 5e-4 --fixed-k 2 --train all --log-every 100
"$B" eval --model $C --data assets/corpus/kjv-valid.txt.gz \
  --trained "beam e2e warm target=0.25=runs/kjv-warm-target25" \
  --trained "fixed-k 2 trained=runs/kjv-fixed2" \
  --trained "fixed-k 1 trained=runs/kjv-fixed1" \
  --max-tokens 16384 --choice-items 2000 --json docs/eval/kjv-moe-warm.json | tee docs/eval/kjv-moe-warm.md
# Two variants of the T = 0.06 run: a 400-step warmup, and λ = 30 (which does not hold the target).
"$B" train --model $M --data $D --out runs/fine-warm400-target06 $E2E --sparsity-warmup 400 --target-active-fraction 0.06
"$B" train --model $M --data $D --out runs/fine-warm-lambda30-target06 --steps 700 --lr 5e-4 --lambda 30 \
  --mask-shape per-slot --train all --mask-lr 0.02 --log-every 100 --sparsity-warmup 200 --target-active-fraction 0.06
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz \
  --trained "beam e2e warm400 target=0.06=runs/fine-warm400-target06" \
  --trained "beam e2e warm lambda=30 target=0.06=runs/fine-warm-lambda30-target06" \
  --max-tokens 16384 --choice-items 2000 --json docs/eval/kjv-moe-fine-warm-variants.json \
  | tee docs/eval/kjv-moe-fine-warm-variants.md

# Session 21: what a target active fraction steers. `--sparsity-scope layer` (each layer's kept
# fraction, the session-17 runs above) against `model` (the whole model's, now the default), the
# same 700 steps; two variants that did not help (--renormalize, other base learning rates);
# then three times the budget (2 100 steps) for BEAM at ≥ 85 % cut and for the fixed K' = 1.
# Writes docs/eval/kjv-moe-fine-scope.{json,md} and kjv-moe-fine-long.{json,md}. ~75 min on 2 cores.
W="--lambda 300 --mask-shape per-slot --train all --mask-lr 0.02 --log-every 100 --sparsity-warmup 200"
"$B" train --model $M --data $D --out runs/fine-layer-target09 --steps 700 --lr 5e-4 $W --sparsity-scope layer --target-active-fraction 0.09
"$B" train --model $M --data $D --out runs/fine-layer-renorm-target09 --steps 700 --lr 5e-4 $W --sparsity-scope layer --target-active-fraction 0.09 --renormalize
"$B" train --model $M --data $D --out runs/fine-layer-lr1e3-target09 --steps 700 --lr 1e-3 $W --sparsity-scope layer --target-active-fraction 0.09
for T in 0.09 0.06; do
  "$B" train --model $M --data $D --out runs/fine-model-target${T#0.} --steps 700 --lr 5e-4 $W --target-active-fraction $T
done
"$B" train --model $M --data $D --out runs/fine-model-lr25-target06 --steps 700 --lr 2.5e-4 $W --target-active-fraction 0.06
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz \
  --trained "beam e2e layer target=0.09=runs/fine-layer-target09" \
  --trained "beam e2e layer renorm target=0.09=runs/fine-layer-renorm-target09" \
  --trained "beam e2e layer lr=1e-3 target=0.09=runs/fine-layer-lr1e3-target09" \
  --trained "beam e2e model target=0.09=runs/fine-model-target09" \
  --trained "beam e2e model target=0.06=runs/fine-model-target06" \
  --trained "beam e2e model lr=2.5e-4 target=0.06=runs/fine-model-lr25-target06" \
  --max-tokens 16384 --choice-items 2000 --json docs/eval/kjv-moe-fine-scope.json | tee docs/eval/kjv-moe-fine-scope.md
"$B" train --model $M --data $D --out runs/fine-model-target055 --steps 700 --lr 5e-4 $W --target-active-fraction 0.055
"$B" train --model $M --data $D --out runs/fine-model-both-target06 --steps 700 --lr 5e-4 $W --loss both --target-active-fraction 0.06
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz \
  --trained "beam e2e model target=0.055=runs/fine-model-target055" \
  --trained "beam e2e model loss=both target=0.06=runs/fine-model-both-target06" \
  --max-tokens 16384 --choice-items 2000 --json docs/eval/kjv-moe-fine-scope2.json | tee docs/eval/kjv-moe-fine-scope2.md
# Three times the token budget (2 100 steps × 8 × 128 tokens = 2.15 M) for BEAM and for the fixed K'.
for T in 0.09 0.055; do
  "$B" train --model $M --data $D --out runs/fine-model-target${T#0.}-2100 --steps 2100 --lr 5e-4 $W --target-active-fraction $T
done
for K in 2 1; do
  "$B" train --model $M --data $D --out runs/fine-fixed$K-2100 --steps 2100 --lr 5e-4 --fixed-k $K --train all --log-every 100
done
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz --peers \
  --trained "beam e2e 2100 target=0.09=runs/fine-model-target09-2100" \
  --trained "beam e2e 2100 target=0.055=runs/fine-model-target055-2100" \
  --trained "fixed-k 2 trained 2100=runs/fine-fixed2-2100" \
  --trained "fixed-k 1 trained 2100=runs/fine-fixed1-2100" \
  --token-map-of "beam e2e 2100 target=0.055" \
  --max-tokens 16384 --choice-items 2000 \
  --json docs/eval/kjv-moe-fine-long.json --plot docs/eval/fine_long_quality_vs_flops.png \
  --choice-plot docs/eval/fine_long_choice_vs_flops.png \
  --token-map docs/eval/fine_long_token_map.html | tee docs/eval/kjv-moe-fine-long.md
# A BEAM point inside the retrained K' = 2…1 range (69–81 % cut) at the same 2 100 steps.
"$B" train --model $M --data $D --out runs/fine-model-target15-2100 --steps 2100 --lr 5e-4 $W --target-active-fraction 0.15
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz \
  --trained "beam e2e 2100 target=0.15=runs/fine-model-target15-2100" \
  --max-tokens 16384 --choice-items 2000 --json docs/eval/kjv-moe-fine-long2.json | tee docs/eval/kjv-moe-fine-long2.md
# Session 22: BEAM at the fixed K' = 2's budget (69.2 % cut) with the same 2 100 steps: T = 0.25
# (2.1 experts per token) and 0.2375 (8 · T + 0.1 ≈ 2.0, the mapping the earlier runs show).
for T in 0.25 0.2375; do
  "$B" train --model $M --data $D --out runs/fine-model-target${T#0.}-2100 --steps 2100 --lr 5e-4 $W --target-active-fraction $T
done
"$B" eval --model $M --data assets/corpus/kjv-valid.txt.gz \
  --trained "beam e2e 2100 target=0.25=runs/fine-model-target25-2100" \
  --trained "beam e2e 2100 target=0.2375=runs/fine-model-target2375-2100" \
  --max-tokens 16384 --choice-items 2000 --json docs/eval/kjv-moe-fine-long3.json | tee docs/eval/kjv-moe-fine-long3.md
