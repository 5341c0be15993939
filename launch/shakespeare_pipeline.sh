#!/usr/bin/env bash
# The whole arc on Tiny Shakespeare, on a CPU, offline: pre-train -> SFT -> preference pairs -> reward model ->
# PPO and DPO -> the evaluation table (docs/alignment.md).
#
#   launch/shakespeare_pipeline.sh OUT_DIR [INPUT_TXT]
#
# INPUT_TXT: a local Tiny Shakespeare input.txt (or .txt.gz) to pre-train on; without it, the copy shipped
# inside megagpt (sha256-checked; nothing is downloaded). The QA questions, preference prompts and the real-word
# vocabulary always come from the shipped copy.
# Leaves: OUT_DIR/data/{shakespeare_char,qa,prefs}, the run dirs OUT_DIR/{base,sft,reward,ppo,dpo}, and the
# table in OUT_DIR/eval.json; each step's wall, user and system CPU seconds and the load average after it in
# OUT_DIR/times.txt (appended, a line per step run). Every step resumes: run it again after an interruption and
# finished steps are skipped (a run dir resumes from its last checkpoint, a dataset that exists is kept); the
# table is made again.
#
# Environment (defaults in brackets), e.g. for a quick smoke run with tiny step counts:
#   BASE_STEPS [2000]  SFT_STEPS [1200]  REWARD_STEPS [300]  PPO_STEPS [150]  DPO_STEPS [150]
#   PREFS_LIMIT [1500] questions sampled for preference pairs     EVAL_LIMIT [260] held-out prompts evaluated
#   PYTHON [python]    the interpreter with megagpt installed
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
OUT=$1
INPUT=${2:-}
CONFIGS=$(cd "$(dirname "$0")/../configs" && pwd)
MEGAGPT=("${PYTHON:-python}" -m megagpt)
DATA=$OUT/data
mkdir -p "$DATA"

step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }
timed() {  # NAME COMMAND...: run it; then its wall, user and system CPU seconds and the load average to times.txt
    local name=$1 t TIMEFORMAT="%R %U %S"
    shift
    { t=$( { time "$@" 1>&3 2>&4; } 2>&1 ); } 3>&1 4>&2
    read -r -a t <<< "$t"
    printf '%-8s wall %8.1f s  user %8.1f s  sys %6.1f s  load %s\n' "$name" "${t[@]}" \
        "$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/times.txt"
}
train() {  # CONFIG RUN_NAME STEPS [--set ...]: a run dir under OUT_DIR, its data and sources inside OUT_DIR
    local config=$1 name=$2 steps=$3
    shift 3
    "${MEGAGPT[@]}" train "$CONFIGS/$config" --run-dir "$OUT/$name" --set "train.max_steps=$steps" \
        --set "train.lr_decay_steps=$steps" --set logging.progress_bar=false "$@"
}

step "1/7 Tiny Shakespeare, char level"
if [[ ! -f $DATA/shakespeare_char/manifest.json ]]; then
    timed data "${MEGAGPT[@]}" prep shakespeare --out "$DATA/shakespeare_char" ${INPUT:+--input "$INPUT"}
fi

step "2/7 pre-train the base model (a document completer)"
timed base train shakespeare_char_cpu.yaml base "${BASE_STEPS:-2000}" \
    --set "data.dataset_dir=$DATA/shakespeare_char"

step "3/7 supervised fine-tuning on Shakespeare questions"
if [[ ! -f $DATA/qa/manifest.json ]]; then
    timed qa "${MEGAGPT[@]}" prep shakespeare-qa --out "$DATA/qa"
fi
timed sft train shakespeare_sft_cpu.yaml sft "${SFT_STEPS:-1200}" --set "data.dataset_dir=$DATA/qa" \
    --set "train.init_from=$OUT/base"

step "4/7 preference pairs: SFT replies labelled by the real-word rule"
if [[ ! -f $DATA/prefs/manifest.json ]]; then
    timed prefs "${MEGAGPT[@]}" prep shakespeare-prefs --sft "$OUT/sft" --qa "$DATA/qa" --out "$DATA/prefs" \
        --samples 8 --limit "${PREFS_LIMIT:-1500}"
fi

step "5/7 reward model"
timed reward train shakespeare_reward_cpu.yaml reward "${REWARD_STEPS:-300}" \
    --set "data.dataset_dir=$DATA/prefs" --set "train.init_from=$OUT/sft"

step "6/7 PPO and DPO"
timed ppo train shakespeare_ppo_cpu.yaml ppo "${PPO_STEPS:-150}" --set "data.dataset_dir=$DATA/prefs" \
    --set "train.init_from=$OUT/sft" --set "align.reward_model=$OUT/reward"
timed dpo train shakespeare_dpo_cpu.yaml dpo "${DPO_STEPS:-150}" --set "data.dataset_dir=$DATA/prefs" \
    --set "train.init_from=$OUT/sft"

step "7/7 the table: SFT, PPO and DPO on held-out prompts"
timed eval "${MEGAGPT[@]}" eval prefs "$OUT/sft" "$OUT/ppo" "$OUT/dpo" --reward-model "$OUT/reward" \
    --reference "$OUT/sft" --data "$DATA/prefs" --limit "${EVAL_LIMIT:-260}" --out "$OUT/eval.json"
step "done: $OUT/eval.json"
