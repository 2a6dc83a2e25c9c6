#!/bin/bash
#SBATCH --job-name=rlsd-grpo-baseline
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
#
# The GRPO baseline for RLSD: the same job as slurm/rlsd_qwen3vl.sh with algorithm.loss_mode=grpo
# (no teacher credit), so the two runs differ only in the loss. Submit from the repository root:
#
#   sbatch slurm/rlsd_grpo_baseline.sh [section.key=value ...]
#
# Every setting of slurm/rlsd_qwen3vl.sh applies (CONFIG, OUTPUT_DIR, --nodes, NPROC_PER_NODE,
# EXTRA_ARGS, CONTAINER_IMAGE / CONTAINER_MOUNTS / CONTAINER_NAME, VENV, NCCL_* and
# GLOO_SOCKET_IFNAME, RDZV_PORT, REQUEUE_ON_STOP, REPO_DIR); see its header and slurm/README.md.
# Overrides given after the script name or in EXTRA_ARGS come after the loss mode, so
# algorithm.loss_mode there would win.
set -euo pipefail

: "${CONFIG:=examples/qwen3vl_8b_rlsd.yaml}"
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
. "$REPO_DIR/slurm/lib.sh" || { echo "cannot source $REPO_DIR/slurm/lib.sh: submit from the repository root or set REPO_DIR" >&2; exit 1; }

rlsd_launch_train "$CONFIG" algorithm.loss_mode=grpo "$@"
