#!/usr/bin/env bash
# Create (or update) the project's virtualenv and install megatron_rlsd with its stack.
#
#   bash tools/setup_env.sh [cpu|gpu] [dev]      default: cpu dev
#   DRY_RUN=1 bash tools/setup_env.sh gpu        resolve the GPU set with pip, install nothing
#
# Env: VENV (default .venv in the repo), PYTHON (default python3.11, else python3).
# Idempotent: a stamp of setup.py + this script skips the install when nothing changed.
#
# The GPU set, pinned so that it resolves and builds together on a fresh cluster node (CUDA 13
# driver >= 580, CUDA toolkit with nvcc and cuDNN headers for Transformer Engine's build):
#   torch 2.14.0          exactly what vllm 0.33.0 pins (CUDA 13 wheels), installed first so
#                         nothing else picks another build
#   vllm 0.33.0           rollouts (CUDA); pins transformers >= 5.16.1, < 5.21
#   megatron-core 0.16.1  the version this package's CPU layer and model code are written for
#   transformer-engine 2.11.0  the newest inside megatron-core 0.16.1's own range (>= 2.9, < 2.12):
#                         its core is a wheel (transformer-engine-cu13), its PyTorch binding a
#                         source package built against the installed torch (--no-build-isolation)
# An import check runs last: a broken Transformer Engine fails here, not hours into a job.
set -euo pipefail
cd "$(dirname "$0")/.."

flavor=${1:-cpu}
extras=$flavor${2:+,$2}
[ $# -eq 0 ] && extras=cpu,dev
case $flavor in cpu|gpu) ;; *) echo "setup_env.sh: flavor must be cpu or gpu, got '$flavor'" >&2; exit 2;; esac
GPU_TORCH="torch==2.14.0"
GPU_TE="transformer-engine[pytorch]==2.11.0"

if [ "${DRY_RUN:-0}" = 1 ]; then
  [ "$flavor" = gpu ] || { echo "setup_env.sh: DRY_RUN is for the gpu flavor" >&2; exit 2; }
  tmp=$(mktemp -d)
  "${PYTHON:-$(command -v python3.11 || command -v python3)}" -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install --quiet --upgrade pip
  echo "[setup_env] resolving the GPU set with pip (--dry-run; downloads metadata only)"
  "$tmp/venv/bin/python" -m pip install --dry-run --ignore-installed --quiet --report "$tmp/report.json" \
      "$GPU_TORCH" ".[$extras]" "$GPU_TE"
  "$tmp/venv/bin/python" - "$tmp/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}
for name in ("torch", "vllm", "megatron-core", "transformer-engine", "transformer-engine-cu13", "transformer-engine-torch", "transformers"):
    print(f"[setup_env] resolved {name}=={got.get(name, 'MISSING')}")
missing = [n for n in ("torch", "vllm", "megatron-core", "transformer-engine", "transformer-engine-torch") if n not in got]
sys.exit(f"[setup_env] not resolved: {missing}" if missing else 0)
PY
  rm -rf "$tmp"
  exit 0
fi

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
else
  pip install --quiet "$GPU_TORCH"
fi
echo "[setup_env] installing megatron_rlsd[$extras] (first time: a few minutes)"
pip install --quiet -e ".[$extras]"
if [ "$flavor" = gpu ]; then
  echo "[setup_env] building Transformer Engine's PyTorch binding against torch (several minutes)"
  pip install --quiet --no-build-isolation "$GPU_TE"
fi
if [ "$flavor" = cpu ]; then
  # torchvision: vLLM's Qwen3-VL imports transformers' torchvision-backed Qwen2-VL image processor
  # (and its video processor needs torchvision too), so the PIL image processor is not an option.
  # PyPI only has CUDA-linked torchvision for Linux x86_64 (no CPU wheel, no sdist), so we keep its
  # 0.28.0 (pinned in setup.py): its compiled ops (_C.so) cannot load beside torch+cpu, which
  # torchvision tolerates by design (extension._has_ops() is False) except for two unguarded
  # fake-kernel registrations that fail the import ("operator torchvision::nms does not exist",
  # pytorch/vision#9337). We apply upstream's guard (pytorch/vision#9649; a no-op where the ops
  # load). Image transforms (pure torch) then work; torchvision.ops and torchvision.io's decoders
  # do not, and nothing here uses them. torchaudio/torchcodec (CUDA-linked too) are not needed.
  pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" - <<'PY'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")  # find, don't import: the import is what fails
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
unguarded = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.M)
guarded = r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))'
fixed, n = unguarded.subn(guarded, src)
if n:
    path.write_text(fixed)
    print(f"[setup_env] torchvision: guarded {n} fake-op registrations in {path}")
PY
fi
"$VENV/bin/python" - "$flavor" <<'PY'
import sys
import megatron.core, torch, transformers
if sys.argv[1] == "gpu":  # what a GPU run needs: Transformer Engine's binding and vLLM for CUDA
    import transformer_engine.pytorch, vllm
    print(f"[setup_env] CUDA {torch.version.cuda}, transformer-engine {transformer_engine.__version__}, vllm {vllm.__version__}")
from transformers import Qwen3ForCausalLM  # fails if a broken torchvision is importable
# what vLLM's Qwen3-VL imports: the torchvision-backed image processor and the video processor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_vl import Qwen3VLProcessor, Qwen3VLVideoProcessor
print(f"[setup_env] torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
