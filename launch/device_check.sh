#!/usr/bin/env bash
# The prepared GPU check of issue #14, one command for a lent GPU machine (docs/benchmarks.md, "On a GPU"):
# `megagpt doctor --full` (8 minutes on one H100/H200 from cold caches), ended within DEVICE_CHECK_S seconds
# [570] of this script's start, so that it finishes inside a 600 s device call and still packs its results.
#
#   bash launch/device_check.sh [DEST]        # DEST defaults to $OUT/doctor, else ./doctor_out
#
# doctor works in a scratch folder (its run dirs hold checkpoints); DEST gets four files, few enough for a
# device call to bring back: nvidia-smi.txt, doctor.log (written as it runs), report.md, and doctor_files.tar.gz
# (every part's log, the benchmarks' tables and plots, the runs' metrics and samples; no checkpoints).
#
# On a machine whose Python has torch and triton but not deepspeed, webdataset or pydantic (the lent GPU
# machines), carry the wheels that ../shared/tools/device-wheels.sh puts in .whl/: they are installed into
# /tmp/site first (only where one of the three is missing). Nothing is downloaded. Exit status: doctor's (0 only if
# every check that applies passed).
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${1:-${OUT:+$OUT/doctor}}
dest=${dest:-doctor_out}
work=$(mktemp -d /tmp/megagpt_doctor.XXXX)
mkdir -p "$dest"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing='import importlib.util as u, sys; sys.exit(all(u.find_spec(m) for m in ("deepspeed", "webdataset", "pydantic")))'
if compgen -G ".whl/*.whl" > /dev/null && python3 -c "$missing"; then  # only where a package is missing
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "device_check: installing the carried wheels in .whl/ failed"; exit 2; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$dest/nvidia-smi.txt"
limit=$(( ${DEVICE_CHECK_S:-570} - SECONDS ))
python3 -m megagpt doctor --full --out "$work" --time-limit "$limit" 2>&1 | tee "$dest/doctor.log"
status=${PIPESTATUS[0]}
[[ -f "$work/report.md" ]] && cp "$work/report.md" "$dest/"
tar -czf "$dest/doctor_files.tar.gz" -C "$work" --exclude=checkpoints . \
    && echo "device_check: $(du -h "$dest/doctor_files.tar.gz" | cut -f1) of logs and results in $dest"
rm -rf "$work"  # the scratch folder's checkpoints: nothing in it is kept that the tar does not hold
exit "$status"
