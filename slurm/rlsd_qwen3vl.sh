#!/bin/bash
#SBATCH --job-name=rlsd-qwen3vl
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
# RLSD on Qwen3-VL: N nodes x 8 GPUs, one torchrun per node (c10d rendezvous on the first node).
# Submit from the repository root (the job runs there):
#
#   sbatch slurm/rlsd_qwen3vl.sh [section.key=value ...]
#   sbatch --nodes=8 --export=ALL,OUTPUT_DIR=/lustre/me/rlsd-run1 slurm/rlsd_qwen3vl.sh trainer.steps=500
#
# Settings a user changes (environment variables, e.g. through sbatch --export=ALL,NAME=value,
# or #SBATCH flags on the sbatch command line, which override the ones above):
#   CONFIG            trainer YAML (default examples/qwen3vl_8b_rlsd.yaml)
#   OUTPUT_DIR        trainer.output_dir: checkpoints, metrics, COMPLETED/STOPPED markers
#                     (default outputs/slurm/<job name>-<job id>; keep it when resubmitting a run
#                     as a new job so it resumes from OUTPUT_DIR/checkpoints/latest)
#   --nodes=N         number of nodes (sbatch flag); --time, --partition, --account likewise
#   NPROC_PER_NODE    processes per node (default: the node's GPU count, 4 on a CPU-only node)
#   EXTRA_ARGS        dotted config overrides, whitespace-separated (arguments after the script
#                     name are overrides too), e.g. "trainer.steps=200 optim.lr=5e-7"
#   CONTAINER_IMAGE   pyxis/enroot image to run in (srun --container-image); CONTAINER_MOUNTS
#                     (default: the repository, and OUTPUT_DIR's parent when outside it),
#                     CONTAINER_WORKDIR, CONTAINER_NAME, CONTAINER_EXTRA_ARGS
#   VENV              virtualenv activated on every node (default REPO_DIR/.venv when present and
#                     no container is used); PYTHON (default python)
#   NCCL_IB_HCA, NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_DEBUG, NCCL_IB_TIMEOUT,
#   NCCL_IB_DISABLE, NCCL_IB_GID_INDEX: communication settings (defaults in slurm/lib.sh)
#   RDZV_PORT         rendezvous port (default 20000 + job id mod 20000)
#   REQUEUE_ON_STOP   1 (default): requeue after a signal-triggered checkpoint; 0: just stop
#   REPO_DIR          repository root (default: the directory sbatch was run from)
#   SRUN_EXTRA_ARGS, TORCHRUN_EXTRA_ARGS: extra flags for srun / torchrun
#
# Preemption and time limits: 900 s before the time limit Slurm sends USR1 to this script, which
# forwards it to every training process; they finish the current step, save a checkpoint, write
# OUTPUT_DIR/STOPPED and exit; the script then runs `scontrol requeue` and the requeued job
# resumes from the checkpoint. The same happens on `scancel --signal=USR1 --batch JOBID`.
# The warning time must cover one step plus one checkpoint save: the paper recipe's step is about
# 4 minutes on 4 x 8 H100 and an 8B checkpoint with optimizer state takes 1-3 minutes to write,
# so 900 s leaves margin. Lengthen it for slower steps: sbatch --signal=B:USR1@SECONDS ...
#
# CPU-only test run (one node, 4 gloo processes):
#   sbatch --nodes=1 --gpus-per-node=0 --export=ALL,CONFIG=examples/tiny_cpu.yaml \
#       slurm/rlsd_qwen3vl.sh trainer.steps=2
set -euo pipefail

: "${CONFIG:=examples/qwen3vl_8b_rlsd.yaml}"
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
. "$REPO_DIR/slurm/lib.sh" || { echo "cannot source $REPO_DIR/slurm/lib.sh: submit from the repository root or set REPO_DIR" >&2; exit 1; }

rlsd_launch_train "$CONFIG" "$@"
