"""Megatron `dist_checkpointing` save/load and the on-disk layout of a checkpoint root.

    ROOT/
      hf/               config.json + tokenizer files: what HF export and the trainer need
      latest            name of the newest complete step directory (written last)
      step_0000000/     a dist_checkpointing directory (torch_dist), loadable at any TP/PP

Step directories are TP/PP-agnostic: dist_checkpointing stores global tensors, and every rank
reads the slices its layout needs.
"""

from __future__ import annotations

import queue
from pathlib import Path

import torch

HF_SUBDIR = "hf"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def is_dist_checkpoint(path: Path) -> bool:
    return (path / "metadata.json").is_file()


def resolve_step_dir(path: str | Path) -> Path:
    """A checkpoint root (uses `latest`) or a step directory -> the step directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_dist_checkpoint(path):
        return path
    latest = path / LATEST
    if latest.is_file():
        step = path / latest.read_text().strip()
        if not is_dist_checkpoint(step):
            raise FileNotFoundError(f"{latest} points at {step.name}, which is not a complete checkpoint")
        return step
    raise FileNotFoundError(f"{path} is neither a checkpoint root (no '{LATEST}' file) nor a step directory (no metadata.json)")


def hf_dir_of(step_dir: Path) -> Path:
    """The `hf/` folder of the checkpoint root that holds `step_dir`."""
    hf = step_dir.parent / HF_SUBDIR
    if not (hf / "config.json").is_file():
        raise FileNotFoundError(f"{hf}/config.json not found: a checkpoint root must keep the HF config beside its steps")
    return hf


def publish_latest(root: Path, step_dir: Path) -> None:
    """Point `latest` at `step_dir` atomically (write a temp file, then rename over)."""
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(step_dir.name + "\n")
    tmp.replace(root / LATEST)


def _in_process_results_queue() -> None:
    # Megatron's torch_dist writer collects results through a spawn-context Manager queue, which
    # starts a server process that re-imports __main__ (12-17 s). Synchronous saves only ever put
    # to that queue from this process, so a plain queue is equivalent and instant.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_sharded(sharded_state_dict: dict, step_dir: Path) -> None:
    """Synchronous dist_checkpointing save into an existing empty directory (collective)."""
    from megatron.core import dist_checkpointing

    _in_process_results_queue()
    dist_checkpointing.save(sharded_state_dict, str(step_dir))


def load_sharded(sharded_state_dict: dict, step_dir: Path, partial: bool = False) -> dict:
    """Collective load. `partial=True` reads a slice of the checkpoint (e.g. one layer), which
    Megatron's access-integrity check (every element read exactly once) would otherwise refuse."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state_dict, str(step_dir), validate_access_integrity=not partial)


def load_model_weights(model: torch.nn.Module, step_dir: str | Path) -> None:
    """Load the model tensors of a step directory into `model` (this rank's TP/PP slice)."""
    step_dir = resolve_step_dir(step_dir)
    loaded = load_sharded({"model": model.sharded_state_dict()}, step_dir)
    model.load_state_dict(loaded["model"], strict=True)


def save_model_weights(model: torch.nn.Module, step_dir: str | Path) -> None:
    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True, exist_ok=True)
    save_sharded({"model": model.sharded_state_dict()}, step_dir)
