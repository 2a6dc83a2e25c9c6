#!/usr/bin/env bash
# Install the CPU stack (tools/setup_env.sh) and run the embedded default: a tiny Qwen3 trained
# with RLSD on a synthetic addition task under TP2 x PP2 on 4 gloo processes (about 6 minutes on
# 2 cores). Extra arguments are dotted config overrides, e.g. trainer.steps=10.
#
#   bash tools/run_default.sh [section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh cpu dev
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec "${VENV:-.venv}/bin/torchrun" --nproc-per-node 4 -m megatron_rlsd.train --config examples/tiny_cpu.yaml "$@"
