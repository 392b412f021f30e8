#!/usr/bin/env bash
# The main job: the self-check over megatron-core on 8 local processes (gloo on CPU,
# NCCL where CUDA is available), then the planner's table and picture of a larger layout.
set -euo pipefail
mkdir -p out
# Every group of tp 2 x pp 2 x dp 2 with expert sizes 2 and 4 (expert-TP 1), hpZ 2 and
# 4 "GPUs" per node: built by the bridge on every rank, membership proven by an
# all-reduce and a broadcast in each group; exits non-zero on any failure.
mpu-bridge selfcheck --nproc 8 --with-megatron --tp 2 --pp 2 --ep 2 4 --etp 1 --hpz 2 --gpus-per-node 4 \
    | tee out/selfcheck-8.txt
mpu-bridge plan --world-size 64 --tp 2 --pp 2 --ep 4 --gpus-per-node 8 --rank 13
mpu-bridge plan --world-size 64 --tp 2 --pp 2 --ep 4 --gpus-per-node 8 \
    --format svg --color-by ep --output out/plan-64.svg
echo "wrote out/selfcheck-8.txt and out/plan-64.svg"
