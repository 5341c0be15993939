#!/usr/bin/env bash
# GPT-3 XL (1.3B) on one node of 8 GPUs, as planned in configs/gpt3_1.3b.yaml (its header has the command).
#
#   launch/gpt3_1.3b_1node.sh [megagpt train args...]     e.g. --set model.attention=triton --set model.norm=triton
set -euo pipefail
cd "$(dirname "$0")/.."
export NPROC_PER_NODE=${NPROC_PER_NODE:-8}
exec launch/torchrun.sh configs/gpt3_1.3b.yaml "$@"
