#!/usr/bin/env bash
# Install the CPU stack (tools/setup_env.sh) and run the whole test suite. CI runs exactly this.
#
#   bash tools/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh cpu dev
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
# --durations: the slowest tests, to keep an eye on CI time
exec "${VENV:-.venv}/bin/python" -m pytest -q --durations=12 "$@" tests
