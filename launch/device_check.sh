#!/usr/bin/env bash
# The prepared GPU check of issue #14, one command for a lent GPU machine (docs/benchmarks.md, "On a GPU"):
# `megagpt doctor --full` (8 minutes on one H100/H200 from cold caches), its report and log written to OUT_DIR.
#
#   bash launch/device_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT/doctor, else ./doctor_out
#
# On a machine whose Python has torch and triton but not deepspeed, webdataset or pydantic (the lent GPU
# machines), carry the wheels that ../shared/tools/device-wheels.sh puts in .whl/: they are installed into
# /tmp/site first. Nothing is downloaded. Exit status: doctor's (0 only if every check that applies passed).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:+$OUT/doctor}}
out=${out:-doctor_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "device_check: installing the carried wheels in .whl/ failed"; exit 2; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/nvidia-smi.txt"
python3 -m megagpt doctor --full --out "$out" 2>&1 | tee "$out/doctor.log"
exit "${PIPESTATUS[0]}"
