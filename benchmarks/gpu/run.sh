#!/usr/bin/env bash
# The GPU check on the device machine: install the carried wheels (.whl/, made here by
# benchmarks/gpu/fetch_wheels.sh), then run benchmarks/gpu/check.py with its console saved beside
# its results in $OUT (./gpu_check_out without it). Flags go to check.py, e.g. --quick.
#
#   device tool: run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/../.."
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "run.sh: no wheels in .whl/: run bash benchmarks/gpu/fetch_wheels.sh first and carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-gpu_check_out}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv
  python3 benchmarks/gpu/check.py --out "$out" "$@"
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
