#!/usr/bin/env bash
# The main job: the self-check over megatron-core on 8 local processes (gloo on CPU,
# NCCL where CUDA is available) and of a two-module layout, then the planner's table and
# picture of a larger layout and the plan of a two-module one.
set -euo pipefail
mkdir -p out
# Every group of tp 2 x pp 2 x dp 2 with expert sizes 2 and 4 (expert-TP 1), hpZ 2 and
# 4 "GPUs" per node: built by the bridge on every rank, membership proven by an
# all-reduce and a broadcast in each group; exits non-zero on any failure.
mpu-bridge selfcheck --nproc 8 --with-megatron --tp 2 --pp 2 --ep 2 4 --etp 1 --hpz 2 --gpus-per-node 4 \
    | tee out/selfcheck-8.txt
# A two-module layout (an encoder on ranks 0..1, a language model with tp 2, pp 3 on ranks
# 2..7): every rank builds both modules' bridges, each proves its own module's groups.
mpu-bridge selfcheck --nproc 8 --module encoder:ranks=2 --module llm:tp=2,pp=3 | tee out/selfcheck-modules-8.txt
mpu-bridge plan --world-size 64 --tp 2 --pp 2 --ep 4 --gpus-per-node 8 --rank 13
mpu-bridge plan --world-size 64 --module encoder:ranks=8 --module llm:tp=4,pp=2 --budget --rank 9
mpu-bridge plan --world-size 64 --tp 2 --pp 2 --ep 4 --gpus-per-node 8 \
    --format svg --color-by ep --output out/plan-64.svg
echo "wrote out/selfcheck-8.txt, out/selfcheck-modules-8.txt and out/plan-64.svg"
