"""Megatron `dist_checkpointing` save/load and the on-disk layout of a checkpoint root.

    ROOT/                     (a training run's is OUTPUT/checkpoints)
      hf/                     config.json + tokenizer files: what HF export and the trainer need
      latest                  name of the newest complete step directory (written last)
      step_0000000/           a dist_checkpointing directory (torch_dist), loadable at any TP/PP
        train_config.json     (training checkpoints) the run's full config, checked on resume
      .incomplete-step_N/     a step being written; never loaded, removed when a run starts

Step directories are TP/PP-agnostic: dist_checkpointing stores global tensors, and every rank
reads the slices its layout needs. `latest` is the commit point: a step directory newer than the
one it names was never published (the writer died between rename and `latest`).
"""

from __future__ import annotations

import queue
import random
import shutil
from pathlib import Path

import numpy as np
import torch

HF_SUBDIR = "hf"
LATEST = "latest"
CHECKPOINTS_SUBDIR = "checkpoints"
TRAIN_CONFIG = "train_config.json"
INCOMPLETE_PREFIX = ".incomplete-"
RNG_KEY = "rng_state"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def is_dist_checkpoint(path: Path) -> bool:
    return (path / "metadata.json").is_file()


def checkpoint_root(output_dir: str | Path) -> Path:
    """Where a training run keeps its checkpoints."""
    return Path(output_dir) / CHECKPOINTS_SUBDIR


def latest_step_dir(root: Path) -> Path | None:
    """The published step directory of a checkpoint root; None when nothing was published."""
    if not (Path(root) / LATEST).is_file():
        return None
    return resolve_step_dir(root)


def unpublished_dirs(root: Path) -> list[Path]:
    """What a writer that died mid-save leaves behind: `.incomplete-*` directories, and step
    directories newer than the one `latest` names (renamed into place, `latest` not yet moved).
    Without `latest` only the former: step directories nothing names are not ours to judge."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.glob(INCOMPLETE_PREFIX + "*") if p.is_dir())
    latest = root / LATEST
    if latest.is_file():
        newest = latest.read_text().strip()
        found += sorted(p for p in root.glob("step_*") if p.is_dir() and p.name > newest)
    return found


def prune_step_dirs(root: Path, newest: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest step directories up to `newest` (never newer ones)."""
    older = sorted(p for p in Path(root).glob("step_*") if p.is_dir() and p.name <= newest.name)
    doomed = older[:-keep] if keep > 0 else older
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


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


def save_sharded(sharded_state_dict: dict, step_dir: Path, before_metadata=None) -> None:
    """Synchronous dist_checkpointing save into an existing empty directory (collective).

    `before_metadata()`, if given, runs on every rank once all ranks wrote their shards and
    before the checkpoint's metadata exists (what a reader needs to see a checkpoint at all)."""
    from megatron.core import dist_checkpointing

    _in_process_results_queue()
    request = dist_checkpointing.save(sharded_state_dict, str(step_dir), async_sharded_save=True)
    if before_metadata is not None:
        request.finalize_fns.insert(0, before_metadata)
    request.execute_sync()


def load_sharded(sharded_state_dict: dict, step_dir: Path, partial: bool = False) -> dict:
    """Collective load. `partial=True` reads a slice of the checkpoint (e.g. one layer), which
    Megatron's access-integrity check (every element read exactly once) would otherwise refuse.

    Requested `_extra_state` objects the checkpoint lacks load as None, i.e. "no state": Transformer
    Engine's norms keep (FP8) extra state where the local layer spec's norms keep none, so without
    this a checkpoint written under the local spec would not load under TE. Any other requested key
    the checkpoint lacks raises ValueError."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    extra_states = _extra_state_paths(sharded_state_dict)  # before the load rewrites the request
    loaded, _, absent = dist_checkpointing.load(
        sharded_state_dict, str(step_dir), validate_access_integrity=not partial, strict=StrictHandling.RETURN_UNEXPECTED
    )
    lacking = sorted(absent - set(extra_states.values()))
    if lacking:
        raise ValueError(f"{step_dir} has no {lacking[0]!r} ({len(lacking)} requested keys missing): "
                         f"it was saved from another model")  # fmt: skip
    for path, key in extra_states.items():
        if key in absent:
            target = loaded
            for name in path[:-1]:
                target = target.setdefault(name, {})
            target[path[-1]] = None
    return loaded


def _extra_state_paths(sharded_state_dict: dict, prefix: tuple = ()) -> dict[tuple, str]:
    """{path of each `_extra_state` ShardedObject in the nested dict: its checkpoint key}."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    paths = {}
    for name, entry in sharded_state_dict.items():
        if isinstance(entry, dict):
            paths.update(_extra_state_paths(entry, (*prefix, name)))
        elif isinstance(entry, ShardedObject) and entry.key.endswith("_extra_state"):
            paths[(*prefix, name)] = entry.key
    return paths


def load_model_weights(model: torch.nn.Module, step_dir: str | Path) -> None:
    """Load the model tensors of a step directory into `model` (this rank's TP/PP slice)."""
    step_dir = resolve_step_dir(step_dir)
    loaded = load_sharded({"model": model.sharded_state_dict()}, step_dir)
    model.load_state_dict(loaded["model"], strict=True)


def save_model_weights(model: torch.nn.Module, step_dir: str | Path) -> None:
    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True, exist_ok=True)
    save_sharded({"model": model.sharded_state_dict()}, step_dir)


# --------------------------------------------------------------------------------- RNG states
def rng_states(cuda: bool) -> dict:
    """This process's generator states: python `random`, numpy, torch (CPU; CUDA on GPU) and
    Megatron's model-parallel tracker (per-TP-rank streams; on CPU the platform layer backs them
    with the CPU generator). Plain containers and tensors only (loadable with weights_only)."""
    from megatron.core import tensor_parallel

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
        "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states()),
    }


def set_rng_states(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _tuples(value):
    # random.setstate wants tuples; a round trip through some serialisers yields lists
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def rng_sharded_object(state: dict | None):
    """This rank's RNG states as its own shard of a (world_size,) object (rank-specific: every
    rank is a main replica). It only loads back at the same world size; the trainer restores
    RNG states only at the same TP/PP/world layout, as Megatron-LM does."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(RNG_KEY, state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)
