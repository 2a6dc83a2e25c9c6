#!/bin/bash
#SBATCH --job-name=rlsd-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.log
#
# Convert a Hugging Face model folder into a Megatron dist_checkpointing checkpoint (one process
# on CPU; tensors are streamed, so memory stays well below the model size). Submit from the
# repository root:
#
#   sbatch --export=ALL,HF_DIR=/models/Qwen3-VL-8B,OUT=/lustre/me/qwen3vl_8b_mcore slurm/convert_hf_to_megatron.sh
#
# Settings:
#   HF_DIR            HF folder with config.json, tokenizer and *.safetensors (required)
#   OUT               new (or empty) checkpoint root (required)
#   CONVERT_ARGS      extra flags for tools/convert_hf_to_megatron.py, e.g. "--allow-pickle"
#   CONTAINER_IMAGE / CONTAINER_MOUNTS / CONTAINER_WORKDIR / CONTAINER_NAME, VENV, PYTHON,
#   REPO_DIR, SRUN_EXTRA_ARGS: as for slurm/rlsd_qwen3vl.sh (see slurm/README.md). With a
#   container, mount HF_DIR and OUT's parent too (CONTAINER_MOUNTS).
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
. "$REPO_DIR/slurm/lib.sh" || { echo "cannot source $REPO_DIR/slurm/lib.sh: submit from the repository root or set REPO_DIR" >&2; exit 1; }

[ -n "${HF_DIR:-}" ] || rlsd_die "set HF_DIR (sbatch --export=ALL,HF_DIR=...,OUT=...)"
[ -n "${OUT:-}" ] || rlsd_die "set OUT, the checkpoint directory to create"
# shellcheck disable=SC2086  # CONVERT_ARGS is a flag list
rlsd_launch_single "${PYTHON:-python}" tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --out "$OUT" ${CONVERT_ARGS:-}
