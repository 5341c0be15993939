#!/usr/bin/env bash
# Start `megagpt train` under the DeepSpeed launcher: over ssh from one node, or per node without ssh.
#
#   launch/deepspeed.sh CONFIG [megagpt train args...]
#
# Environment (defaults in brackets):
#   HOSTFILE        "HOST slots=N" per node (see launch/hostfile.example); unset: this node only
#   NUM_GPUS        workers on this node when there is no HOSTFILE [all GPUs, or 1 without any]
#   NODE_RANK       set it to run this node only, without ssh (`--no_ssh --node_rank`): start the same
#                   command on every node with its own NODE_RANK; needs HOSTFILE and MASTER_ADDR
#   MASTER_ADDR     address of the first host in HOSTFILE [127.0.0.1 for one node]
#   MASTER_PORT     a free TCP port there [29500]
#   PYTHON          the interpreter with megagpt and deepspeed installed [python]
#
# With HOSTFILE and no NODE_RANK the launcher reaches the other hosts over passwordless ssh (pdsh).
# The launcher would add `--local_rank=N` in front of the subcommand; megagpt reads LOCAL_RANK from the
# environment instead, so it is told not to (--no_local_rank).
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi

source "$(dirname "$0")/checks.sh"  # check_int, check_host, host_problem, check_config
MASTER_PORT=${MASTER_PORT:-29500}
check_int MASTER_PORT 1 65535 "a TCP port on the first host"
args=(--master_port "$MASTER_PORT" --no_local_rank)
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE does not exist" >&2; exit 2; }
    # "HOST slots=N" per line, '#' comments and blank lines skipped (DeepSpeed's reading): hosts and workers
    hosts='' ranks=''
    read -r hosts ranks < <(awk '
        { sub(/#.*/, "") } NF == 0 { next }
        NF != 2 || $2 !~ /^slots=[0-9]+$/ || $2 == "slots=0" {
            printf "deepspeed.sh: HOSTFILE=%s line %d: expected \"HOST slots=N\" (N at least 1), got \"%s\"\n", \
                FILENAME, FNR, $0 > "/dev/stderr"; bad = 1; exit }
        $1 in line {  # DeepSpeed refuses a host listed twice, in a traceback
            printf "deepspeed.sh: HOSTFILE=%s line %d: host %s is listed again (line %d): one line per host\n", \
                FILENAME, FNR, $1, line[$1] > "/dev/stderr"; bad = 1; exit }
        { line[$1] = FNR; hosts++; ranks += substr($2, 7) }
        END { if (!bad) print hosts + 0, ranks + 0 }' "$HOSTFILE") || true
    [[ -n "${ranks:-}" ]] || exit 2
    (( hosts > 0 )) || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE lists no host" >&2; exit 2; }
    if [[ -z "${NODE_RANK:-}" ]]; then  # over ssh every host is reached by its name from here (no-ssh: only MASTER_ADDR)
        while read -r line host; do
            problem=$(host_problem "$host") || {
                echo "deepspeed.sh: HOSTFILE=$HOSTFILE line $line: host $host: $problem" >&2; exit 2; }
        done < <(awk '{ sub(/#.*/, "") } NF { print FNR, $1 }' "$HOSTFILE")
    fi
    args+=(--hostfile "$HOSTFILE")
else
    if [[ -z "${NUM_GPUS:-}" ]]; then
        NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        [[ "$NUM_GPUS" -gt 0 ]] || NUM_GPUS=1
    fi
    check_int NUM_GPUS 1 "" "workers on this node"
    hosts=1 ranks=$((10#$NUM_GPUS))
    args+=(--num_gpus "$ranks")
fi
if [[ -n "${NODE_RANK:-}" ]]; then
    if [[ -z "${HOSTFILE:-}" || -z "${MASTER_ADDR:-}" ]]; then
        echo "deepspeed.sh: NODE_RANK (no-ssh mode) needs HOSTFILE and MASTER_ADDR" >&2
        exit 2
    fi
    check_int NODE_RANK 0 $((hosts - 1)) "this node's index among the $hosts host(s) of HOSTFILE"
    args+=(--no_ssh --node_rank "$((10#$NODE_RANK))")
fi
if [[ -n "${MASTER_ADDR:-}" ]]; then
    check_host MASTER_ADDR "the address of the first host"
    args+=(--master_addr "$MASTER_ADDR")
fi

python=${PYTHON:-python}
check_config "$python" "$ranks" "$@"
exec "$python" -m deepspeed.launcher.runner "${args[@]}" --module megagpt train "$@"
