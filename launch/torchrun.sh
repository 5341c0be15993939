#!/usr/bin/env bash
# Start `megagpt train` under torchrun on this node: one node, or one node of many.
#
#   launch/torchrun.sh CONFIG [megagpt train args...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  workers on this node [number of GPUs, or 1 without any]
#   NNODES          nodes in the job [1]
#   NODE_RANK       this node's index, 0..NNODES-1 [0]
#   MASTER_ADDR     address of node 0, reachable from every node [127.0.0.1; needed when NNODES > 1]
#   MASTER_PORT     a free TCP port on node 0 [29500]
#   SHUTDOWN_TIMEOUT  seconds torchrun gives workers to save after SIGTERM/SIGUSR1 before SIGKILL [600;
#                     torch 2.11's torchrun has a fixed 30]
#   PYTHON          the interpreter with megagpt installed [python]
#
# Multi-node: run the same command on every node with NNODES/NODE_RANK/MASTER_ADDR set (see docs/distributed.md).
# torchrun forwards SIGTERM and SIGUSR1 to the workers, which save a checkpoint at the next step boundary and
# exit 0; torchrun then says so in one line and exits 128 + the signal's number (143 for SIGTERM). A worker that
# dies takes the whole job down; `--resume auto` (the default) continues from the last complete checkpoint.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_PORT=${MASTER_PORT:-29500}

source "$(dirname "$0")/checks.sh"  # check_int, check_host, check_config
check_int NPROC_PER_NODE 1 "" "workers on this node"
check_int NNODES 1 "" "nodes in the job"
check_int NODE_RANK 0 $((10#$NNODES - 1)) "this node's index, below NNODES=$NNODES"
check_int MASTER_PORT 1 65535 "a TCP port on node 0"
[[ -z "${SHUTDOWN_TIMEOUT:-}" ]] || check_int SHUTDOWN_TIMEOUT 0 "" "seconds"
if [[ -z "${MASTER_ADDR:-}" ]] && (( 10#$NNODES > 1 )); then  # 127.0.0.1 would be each node's own
    echo "torchrun.sh: MASTER_ADDR is unset: NNODES=$NNODES needs the address of node 0, the same on every node" >&2
    exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
check_host MASTER_ADDR "the address of node 0"

# torchrun's --shutdown_timeout is newer than torch 2.11, whose torchrun gives workers a fixed 30 s after a signal:
# pass it only where this torch's torchrun has it.
python=${PYTHON:-python}
grace=()
find_torch='import importlib.util as u; s = u.find_spec("torch"); print(s.submodule_search_locations[0] if s else "")'
torch_dir=$("$python" -c "$find_torch")  # where torch is, without importing it (that takes seconds)
[[ -n "$torch_dir" ]] || { echo "torchrun.sh: $python has no torch: install megagpt as the README says" >&2; exit 2; }
if grep -q -- '--shutdown[-_]timeout' "$torch_dir/distributed/run.py"; then
    grace=(--shutdown_timeout "${SHUTDOWN_TIMEOUT:-600}")
elif [[ -n "${SHUTDOWN_TIMEOUT:-}" ]]; then
    echo "torchrun.sh: this torch's torchrun has no --shutdown_timeout; SHUTDOWN_TIMEOUT is ignored (30 s)" >&2
fi

check_config "$python" $(( 10#$NNODES * 10#$NPROC_PER_NODE )) "$@"

# megagpt.launcher is torchrun with its stop by a signal said in one line, not a traceback.
exec "$python" -m megagpt.launcher \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    --max_restarts 0 \
    --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    "${grace[@]}" \
    -m megagpt train "$@"
