#!/usr/bin/env bash
# The nightly GPU run of mpu-bridge's integration programs under torchrun (see README.md).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
usage: integration_tests/run_nightly.sh single|multi
       integration_tests/run_nightly.sh -h|--help

  single  one node:
            torchrun --standalone --nnodes 1 --nproc-per-node $NPROC_PER_NODE ...
  multi   $NNODES nodes through torchrun's c10d rendezvous. Run the same command on
          every node, with NODE_RANK set (0 on the node at MASTER_ADDR):
            torchrun --nnodes $NNODES --nproc-per-node $NPROC_PER_NODE --node-rank $NODE_RANK \
                     --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:<port> --rdzv-id <id> ...
          Launch k (k = 0, 1, ...) uses port MASTER_PORT + k: keep that range open between nodes.

Launches, each one torchrun job over the whole world (world = nodes x NPROC_PER_NODE):
  1. integration_tests/rank_checks.py $PROGRAMS with every megatron-core layout that
     fits the world (integration_tests/nightly_layouts.py megatron <world>);
  2. python -m mpu_bridge.selfcheck, once per self-check layout that fits
     (integration_tests/nightly_layouts.py selfcheck <world> --gpus-per-node N).

Environment:
  NPROC_PER_NODE  ranks per node (default: the number of GPUs nvidia-smi lists, else 8)
  NNODES          nodes in multi mode (default 2)
  NODE_RANK, MASTER_ADDR, MASTER_PORT
                  required in multi mode (MASTER_ADDR: the host of node 0)
  PYTHON          interpreter with CUDA torch and mpu-bridge installed
                  (default: .venv/bin/python if present, else python3)
  BACKEND         nccl (default) or gloo, for both programs
  PROGRAMS        rank_checks.py programs (default: "megatron standalone nccl deepspeed")
  STEP_TIMEOUT    seconds before a launch is killed (default 900)
  LOG_DIR         one log per launch, and rank_checks.json (default out/nightly)
  RDZV_ID         rendezvous id prefix, the same on every node
                  (default mpu-bridge-$GITHUB_RUN_ID, else mpu-bridge-nightly)
  DRY_RUN=1       print the launches instead of running them

Exit status: 0 when every launch passed, 1 when any failed, 2 for bad usage.
EOF
}

mode="${1:-}"
case "$mode" in
    -h|--help) usage; exit 0 ;;
    single|multi) ;;
    *) echo "run_nightly.sh: unknown mode '${mode}'" >&2; usage >&2; exit 2 ;;
esac

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' )"
    [ "$NPROC_PER_NODE" -gt 0 ] 2>/dev/null || NPROC_PER_NODE=8
fi
NNODES="${NNODES:-2}"
BACKEND="${BACKEND:-nccl}"
PROGRAMS="${PROGRAMS:-megatron standalone nccl deepspeed}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
LOG_DIR="${LOG_DIR:-out/nightly}"
RDZV_ID="${RDZV_ID:-mpu-bridge-${GITHUB_RUN_ID:-nightly}}"
DRY_RUN="${DRY_RUN:-0}"

if [ "$mode" = single ]; then
    world=$NPROC_PER_NODE
else
    missing=()
    for name in NODE_RANK MASTER_ADDR MASTER_PORT; do
        [ -n "${!name:-}" ] || missing+=("$name")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "run_nightly.sh: multi mode needs ${missing[*]} (NODE_RANK 0..$((NNODES - 1)), MASTER_ADDR = node 0's host, MASTER_PORT = first rendezvous port)" >&2
        exit 2
    fi
    world=$((NNODES * NPROC_PER_NODE))
fi

megatron_layouts="$("$PYTHON" integration_tests/nightly_layouts.py megatron "$world")" || {
    echo "run_nightly.sh: could not list the layouts with $PYTHON (is mpu-bridge installed there?)" >&2
    exit 2
}
mapfile -t selfcheck_lines < <("$PYTHON" integration_tests/nightly_layouts.py selfcheck "$world" --gpus-per-node "$NPROC_PER_NODE")

launch_index=0
# The torchrun flags of the next launch (multi mode: a port and an id of its own).
launch_flags() {
    if [ "$mode" = single ]; then
        echo "--standalone --nnodes 1 --nproc-per-node $NPROC_PER_NODE"
    else
        echo "--nnodes $NNODES --nproc-per-node $NPROC_PER_NODE --node-rank $NODE_RANK" \
             "--rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$((MASTER_PORT + launch_index))" \
             "--rdzv-id $RDZV_ID-$launch_index"
    fi
}

names=()
results=()
failed=0
run_launch() {  # run_launch NAME ARGS...: one torchrun job, logged, bounded by STEP_TIMEOUT
    local name="$1"; shift
    local flags
    read -r -a flags <<<"$(launch_flags)"
    local command=("$PYTHON" -m torch.distributed.run "${flags[@]}" "$@")
    launch_index=$((launch_index + 1))
    if [ "$DRY_RUN" = 1 ]; then
        printf '%q ' "${command[@]}"; echo
        return 0
    fi
    local log
    log="$LOG_DIR/$(printf '%02d' "$launch_index")-$name.log"
    echo "=== [$launch_index] $name: ${command[*]}"
    local status
    timeout --kill-after=30 "$STEP_TIMEOUT" "${command[@]}" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    names+=("$name")
    if [ "$status" -eq 0 ]; then
        results+=("PASS")
    elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        results+=("FAIL (killed after ${STEP_TIMEOUT} s)")
        failed=1
    else
        results+=("FAIL (exit $status)")
        failed=1
    fi
}

[ "$DRY_RUN" = 1 ] || mkdir -p "$LOG_DIR"
echo "mpu-bridge nightly: mode $mode, $world ranks ($NPROC_PER_NODE per node), backend $BACKEND, python $PYTHON"

read -r -a programs <<<"$PROGRAMS"
run_launch rank-checks integration_tests/rank_checks.py "${programs[@]}" \
    --layout "$megatron_layouts" --extra-ep 2 4 8 --backend "$BACKEND" \
    --timeout "$((STEP_TIMEOUT - 60))" --report "$LOG_DIR/rank_checks.json"

for line in "${selfcheck_lines[@]}"; do
    read -r -a args <<<"$line"
    name="selfcheck$(printf '%s' "$line" | tr -c 'a-z0-9' '_' | tr -s '_')"
    run_launch "$name" -m mpu_bridge.selfcheck "${args[@]}" --backend "$BACKEND" --timeout "$((STEP_TIMEOUT - 60))"
done

if [ "$DRY_RUN" = 1 ]; then
    exit 0
fi
echo
echo "=== mpu-bridge nightly summary ($mode, $world ranks; logs in $LOG_DIR)"
for i in "${!names[@]}"; do
    printf '  %-60s %s\n' "${names[$i]}" "${results[$i]}"
done
if [ "$failed" -ne 0 ]; then
    echo "FAIL"
    exit 1
fi
echo "PASS"
exit 0
