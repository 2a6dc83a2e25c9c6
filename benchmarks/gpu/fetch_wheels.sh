#!/usr/bin/env bash
# Fill .whl/ at the repository root with what the GPU check needs beyond the device image:
# Megatron-Core, the reward verifier's pure-Python dependencies, and megatron_rlsd itself (built
# from this working tree). Run here (with network), before every device run whose code changed:
# benchmarks/gpu/check.py refuses a megatron_rlsd wheel that differs from the working tree.
#
#   bash benchmarks/gpu/fetch_wheels.sh        (PYTHON=... picks the interpreter that runs pip)
#
# The device image (Python 3.12, torch 2.11, transformers 5.17, numpy, sympy, pyyaml, pyarrow,
# pillow, safetensors, tokenizers, tensorboard, einops, packaging) has everything else.
set -euo pipefail
PYTHON=${PYTHON:-python3}
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
grep -qxF '/.whl/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null \
  || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf .whl
mkdir -p .whl

# Exact versions: one of each (two versions of a package stop the whole install there).
PINS=(
  megatron-core==0.16.1              # the version megatron_rlsd's model code is written for
  math-verify==0.9.0                 # rewards: answer equivalence
  latex2sympy2_extended==1.11.0      # math-verify's LaTeX parser
  antlr4-python3-runtime==4.13.2     # its grammar runtime
  pebble==5.2.3                      # rewards: the verifier's process pool
)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "${PINS[@]}"

# megatron_rlsd from the working tree, built outside it (no build/ or egg-info left behind)
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp setup.py "$src/"
cp -r megatron_rlsd "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel -q --no-deps -w .whl "$src"

ls -l .whl
du -sh .whl
total=$(du -sb .whl | cut -f1)
if (( total > 60 * 1024 * 1024 )); then
  echo "fetch_wheels: .whl holds $total bytes; the device tool carries at most 64 MiB with the working tree" >&2
  exit 1
fi
