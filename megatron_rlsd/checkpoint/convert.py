"""HF safetensors <-> Megatron dist_checkpointing conversion, single process, tensor by tensor.

The Megatron side's key structure comes from Megatron itself: a TP1/PP1 model is built on the
meta device (no memory) and its `sharded_state_dict()` says which checkpoint keys, global shapes
and layer offsets a real model expects. Conversion fills those entries with tensors that are
memory-mapped from the HF files, or, where the layout changes (fused QKV, [gate; up]), staged
through a memory-mapped scratch file; so neither direction holds the model in anonymous memory.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megatron_rlsd.checkpoint import dist as ckpt
from megatron_rlsd.checkpoint import hf_mapping as hfmap
from megatron_rlsd.checkpoint.safetensors_io import HFWeights, ShardedSafetensorsWriter
from megatron_rlsd.models import qwen3
from megatron_rlsd.models.registry import model_module

# Files copied between HF folders and the checkpoint's hf/ folder (config, tokenizer, templates).
_HF_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
_NOT_SIDE_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


class Progress:
    """One line per tensor group on stderr: done/total, elapsed, MB moved."""

    def __init__(self, total: int, what: str, enabled: bool = True):
        self.total, self.what, self.enabled = total, what, enabled
        self.done, self.bytes, self.t0 = 0, 0, time.time()

    def step(self, name: str, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        if self.enabled and (self.done == self.total or self.done % max(1, self.total // 20) == 0):
            print(
                f"[{self.what}] {self.done}/{self.total} tensors, {self.bytes / 2**20:.1f} MiB, "
                f"{time.time() - self.t0:.1f}s ({name})",
                file=sys.stderr,
                flush=True,
            )


def copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in _HF_SIDE_FILES:
        for f in src.glob(pattern):
            if f.name not in _NOT_SIDE_FILES:
                shutil.copy2(f, dst / f.name)


def _meta_model(hf_config: dict):
    """The TP1/PP1 model on the meta device (key structure without memory), and its mapping."""
    from megatron_rlsd.platform import select_platform

    module = model_module(hf_config)
    shape = module.Shape.from_hf_config(hf_config)
    config = module.transformer_config(shape, select_platform(), init_weights=False)
    with torch.device("meta"):
        model = module.build_model(shape, config, pre_process=True, post_process=True, use_te=False)
    return model, shape, module.hf_mapping(shape)


class _ScratchFiles:
    """Allocates tensors in memory-mapped files, so assembled tensors stay out of anonymous memory."""

    def __init__(self, directory: Path):
        self.directory, self.count = directory, 0

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.count += 1
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        raw = np.memmap(self.directory / f"{self.count:06d}.bin", dtype=np.uint8, mode="w+", shape=(nbytes,))
        return torch.from_numpy(raw).view(dtype).reshape(shape)


def hf_to_megatron(hf_dir: str | Path, out: str | Path, *, allow_pickle: bool = False, progress: bool = True) -> Path:
    """Convert an HF folder to a checkpoint root `out` (hf/ + step_0000000/ + latest).

    Needs torch.distributed and Megatron parallel_state initialised at world size 1.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    hf_config = qwen3.load_hf_config(hf_dir)
    weights = HFWeights(hf_dir, allow_pickle=allow_pickle)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
    model, shape, mapping = _meta_model(hf_config)

    unknown = sorted(set(weights.names()) - mapping.hf_names() - {mapping.lm_head})
    if unknown:
        raise ValueError(f"{hf_dir}: {len(unknown)} tensors have no Megatron mapping, e.g. {unknown[0]!r}")

    out.mkdir(parents=True, exist_ok=True)
    step_dir = out / ckpt.step_dir_name(0)
    step_dir.mkdir()
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as scratch:
        alloc = _ScratchFiles(Path(scratch))
        sharded = model.sharded_state_dict()
        bar = Progress(sum(1 for v in sharded.values() if hasattr(v, "data") and v.data is not None), "hf->megatron", progress)
        for name, entry in list(sharded.items()):
            if getattr(entry, "data", None) is None:  # _extra_state objects carry no tensor
                continue
            canonical = mapping.canonical_name(name)
            if hasattr(entry, "build_fn"):
                sharded[name] = _fill_factory(entry, mapping.hf_sources(canonical), weights)
                nbytes = sum(t.data.numel() * t.data.element_size() for t in sharded[name])
            else:
                tensor = mapping.to_megatron(canonical, weights.get, alloc)
                _check_entry_shape(canonical, mapping.hf_sources(canonical), tensor, tuple(entry.data.shape))
                entry.data = tensor
                nbytes = tensor.numel() * tensor.element_size()
            bar.step(canonical, nbytes)
        ckpt.save_sharded({"model": sharded}, step_dir)
    copy_side_files(hf_dir, out / ckpt.HF_SUBDIR)
    ckpt.publish_latest(out, step_dir)
    return step_dir


def _check_entry_shape(canonical: str, sources: tuple[str, ...], tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"shape mismatch for {canonical} (from {', '.join(sources)}): "
            f"weights have {tuple(tensor.shape)}, config.json implies {expected}"
        )


def _fill_factory(entry, sources: tuple[str, ...], weights: HFWeights) -> list:
    """Megatron saves fc1 through a factory that splits [gate; up] into two shards. Build those
    shards directly from the two HF tensors: no fused copy, and each shard keeps its own mapped
    storage (the writer would clone views of a shared one)."""
    shards = entry.build_fn(entry.key, entry.data, entry.replica_id, None)
    if len(shards) != len(sources):
        raise AssertionError(f"{entry.key}: factory built {len(shards)} shards for {len(sources)} HF tensors")
    for shard, source in zip(shards, sources):
        tensor = weights.get(source)
        _check_entry_shape(entry.key, (source,), tensor, tuple(shard.data.shape))
        shard.data = tensor
    return shards


def _layer_groups(sharded: dict) -> list[list[str]]:
    """Group state-dict names so that each load reads one layer (or one top-level tensor)."""
    groups: dict[str, list[str]] = {}
    for name, entry in sharded.items():
        if getattr(entry, "data", None) is None:
            continue
        groups.setdefault(hfmap.layer_group_key(name), []).append(name)
    return list(groups.values())


def megatron_to_hf(
    ckpt_path: str | Path, out: str | Path, *, max_shard_bytes: int = 4 << 30, progress: bool = True
) -> Path:
    """Export a checkpoint (root or step directory) to an HF folder loadable by transformers."""
    step_dir = ckpt.resolve_step_dir(ckpt_path)
    hf_src = ckpt.hf_dir_of(step_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
    hf_config = qwen3.load_hf_config(hf_src)
    model, shape, mapping = _meta_model(hf_config)
    dtype = _hf_dtype(hf_config)

    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(out, max_shard_bytes=max_shard_bytes)
    sharded = model.sharded_state_dict()
    groups = _layer_groups(sharded)
    bar = Progress(len(groups), "megatron->hf", progress)
    for names in groups:
        stacked = {name for name in names if _is_stacked(sharded[name])}
        part = {name: _load_target(sharded[name], dtype) for name in names}
        loaded = ckpt.load_sharded({"model": part}, step_dir, partial=True)["model"]
        nbytes = 0
        for name in names:
            megatron_tensor = loaded[name]
            if name in stacked:
                megatron_tensor = megatron_tensor[0]  # drop the stacked-layer axis of the one-layer slice
            for hf_name, hf_tensor in mapping.to_hf(mapping.canonical_name(name), megatron_tensor):
                writer.add(hf_name, hf_tensor)
                nbytes += hf_tensor.numel() * hf_tensor.element_size()
        bar.step(names[0], nbytes)
    writer.close()
    copy_side_files(hf_src, out)
    return out


def _is_stacked(entry) -> bool:
    """Transformer-block layers are stored stacked along a leading layer axis."""
    return getattr(entry, "prepend_axis_num", 0) > 0 or hasattr(entry, "build_fn")


def _load_target(entry, dtype: torch.dtype):
    """An empty tensor to load one entry into.

    Layer entries become a one-layer slice [1, ...] of the stacked [num_layers, ...] checkpoint
    tensor, addressed by plain offsets: Megatron's prepend-axis form assumes every layer of the
    grid is requested and cannot express a partial read. That also bypasses the fc1 factory:
    the global fc1 tensor already is [gate; up].
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    data = torch.empty(entry.data.shape, dtype=dtype)
    if not _is_stacked(entry):
        entry.data = data
        return entry
    if hasattr(entry, "build_fn"):  # fc1 factory: its key's offsets live in the built shards
        stacked = entry.build_fn(entry.key, entry.data, entry.replica_id, None)[0]
    else:
        stacked = entry
    layer, num_layers = stacked.global_offset[0], stacked.global_shape[0]
    return ShardedTensor.from_rank_offsets(entry.key, data.unsqueeze(0), (0, layer, num_layers))


def _hf_dtype(hf_config: dict) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config.json dtype {name!r} is not a torch dtype")
    return dtype
