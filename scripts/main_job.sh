#!/usr/bin/env bash
# The main job: plan a realistic MoE layout and show where its groups fall.
set -euo pipefail
mkdir -p out
mpu-bridge plan --world-size 64 --tp 2 --pp 2 --ep 4 --gpus-per-node 8 --rank 13
mpu-bridge plan --world-size 64 --tp 2 --pp 2 --ep 4 --gpus-per-node 8 \
    --format svg --color-by ep --output out/plan-64.svg
echo "wrote out/plan-64.svg"
