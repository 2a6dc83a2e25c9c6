"""HF safetensors <-> Megatron dist_checkpointing conversion, single process, tensor by tensor.

The Megatron side's key structure comes from Megatron itself: a TP1/PP1 model is built on the
meta device (no memory) and its `sharded_state_dict()` says which checkpoint keys, global shapes
and layer offsets a real model expects. Import fills those entries with tensors that are
memory-mapped from the HF files, or, where the layout changes (fused QKV, [gate; up]), staged
through a memory-mapped scratch file. Export plans the HF shards from the same entries before
reading anything, then goes one layer at a time: tensors whose bytes are the same on both sides
(all but fused QKV) are copied file to file from the checkpoint into their place in the output
files, and fused QKV is read into memory and split. So neither direction holds more than about
one layer in anonymous memory, and export moves most bytes like `cp`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megatron_rlsd.checkpoint import dist as ckpt
from megatron_rlsd.checkpoint import hf_mapping as hfmap
from megatron_rlsd.checkpoint.safetensors_io import HFWeights, PlannedSafetensorsWriter
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

    sharded = model.sharded_state_dict()
    groups = _layer_groups(sharded)
    # Every HF tensor's name and shape follows from the meta model's entries: plan the shards first.
    hf_parts = {name: mapping.to_hf(mapping.canonical_name(name), sharded[name].data)
                for names in groups for name in names}  # fmt: skip
    plan = [[(hf_name, dtype, tuple(t.shape)) for hf_name, t in parts] for parts in hf_parts.values()]
    out.mkdir(parents=True, exist_ok=True)
    stored = _StoredChunks(step_dir)

    def export(names: list[str], writer: PlannedSafetensorsWriter) -> None:
        """Write one group's (a layer's, or one top-level tensor's) HF tensors. Where the checkpoint
        stores a tensor as plain bytes, same-bytes layouts are copied file to file and fused QKV is
        read into memory; otherwise dist_checkpointing reads them, straight into their place in
        the output files or into memory. Fused QKV is split in memory. All of it is released on
        return, before the next group."""
        targets, split = {}, {}
        for name in names:
            entry = sharded[name]
            ranges = stored.byte_ranges(*_stored_region(entry), dtype)
            if mapping.rule(mapping.canonical_name(name)).kind in _SAME_BYTES:
                hf_names = [hf_name for hf_name, _ in hf_parts[name]]
                if ranges is not None:
                    _copy_ranges(ranges, *writer.region(hf_names)[:2])
                else:
                    targets[name] = _load_target(entry, writer.span(hf_names).view(entry.data.shape))
            elif ranges is not None:
                split[name] = _read_ranges(ranges, entry.data.shape, dtype)
            else:
                split[name] = torch.empty(entry.data.shape, dtype=dtype)
                targets[name] = _load_target(entry, split[name])
        if targets:
            ckpt.load_sharded({"model": targets}, step_dir, partial=True)  # fills the targets' data in place
        for name, tensor in split.items():
            for hf_name, hf_tensor in mapping.to_hf(mapping.canonical_name(name), tensor):
                writer.tensor(hf_name).copy_(hf_tensor)

    bar = Progress(len(groups), "megatron->hf", progress)
    with PlannedSafetensorsWriter(out, plan, max_shard_bytes=max_shard_bytes) as writer:
        for names in groups:
            export(names, writer)
            bar.step(names[0], sum(sharded[name].data.numel() for name in names) * dtype.itemsize)
    copy_side_files(hf_src, out)
    return out


# Layouts whose Megatron tensor is, byte for byte, its HF tensors back to back ([gate; up] for fc1).
_SAME_BYTES = (hfmap.DIRECT, hfmap.GATE_UP)


class _StoredChunks:
    """Where a torch_dist checkpoint keeps the raw bytes of its tensors.

    dist_checkpointing stores every saved shard of a tensor as a torch.save blob in a .distcp
    file. When the shards inside a wanted region are whole row blocks of it, in the wanted dtype
    and without storage transforms, the region's bytes are those blobs' data back to back: they
    can be copied file to file (no decoding, no copy in memory) or read once into memory.
    Anything else (another dtype, column blocks of a tensor-parallel checkpoint) is left to
    dist_checkpointing.
    """

    def __init__(self, step_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.step_dir = step_dir
        self.metadata = FileSystemReader(str(step_dir)).read_metadata()

    def byte_ranges(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype):
        """[(file, byte offset, byte count), ...] that make up the region `offset`, `shape` of
        tensor `key` in row-major order, or None."""
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

        meta = self.metadata.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata) or meta.properties.dtype != dtype:
            return None
        end = [o + n for o, n in zip(offset, shape)]
        inside = [c for c in meta.chunks
                  if all(o <= co and co + cn <= e for o, co, cn, e in zip(offset, c.offsets, c.sizes, end))]  # fmt: skip
        row = next((d for d, n in enumerate(shape) if n > 1), 0)  # blocks split this dimension only
        inside.sort(key=lambda c: c.offsets[row])
        at = offset[row]
        for c in inside:
            if c.offsets[row] != at or any(cn != n for d, (cn, n) in enumerate(zip(c.sizes, shape)) if d != row):
                return None
            at += c.sizes[row]
        if at != end[row]:
            return None
        ranges = []
        for c in inside:
            info = self.metadata.storage_data[MetadataIndex(key, c.offsets)]
            if info.transform_descriptors:
                return None
            path = self.step_dir / info.relative_path
            with open(path, "rb") as f:  # reads the blob's zip directory and pickle, not its data
                t = torch.load(_FileView(f, info.offset, info.length), map_location="meta", weights_only=True)
            start = getattr(t.untyped_storage(), "_checkpoint_offset", None)  # the data's offset in the blob
            if start is None or t.dtype != dtype or tuple(t.shape) != tuple(c.sizes) or not t.is_contiguous():
                return None
            ranges.append((path, info.offset + start + t.storage_offset() * t.element_size(), t.nbytes))
        return ranges


class _FileView(io.RawIOBase):
    """Bytes [start, start + length) of an open binary file, as a seekable file of their own."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = (pos, self.pos + pos, self.length + pos)[whence]
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


def _copy_ranges(ranges: list[tuple[Path, int, int]], dst: Path, offset: int) -> None:
    """Copy byte ranges of files, back to back, into `dst` from `offset`, inside the kernel."""
    with open(dst, "r+b") as out:
        for src, start, nbytes in ranges:
            with open(src, "rb") as f:
                os.lseek(out.fileno(), offset, os.SEEK_SET)
                done = 0
                while done < nbytes:
                    sent = os.sendfile(out.fileno(), f.fileno(), start + done, nbytes - done)
                    if sent == 0:
                        raise ValueError(f"{src}: ends before byte {start + nbytes}; the checkpoint is truncated")
                    done += sent
            offset += nbytes


def _read_ranges(ranges: list[tuple[Path, int, int]], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor read from byte ranges of files, back to back."""
    out = torch.empty(shape, dtype=dtype)
    buffer, at = out.view(-1).view(torch.uint8).numpy(), 0
    for src, start, nbytes in ranges:
        with open(src, "rb") as f:
            f.seek(start)
            if f.readinto(buffer[at : at + nbytes]) != nbytes:
                raise ValueError(f"{src}: ends before byte {start + nbytes}; the checkpoint is truncated")
        at += nbytes
    return out


def _stored_region(entry) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(checkpoint key, offset, shape) of an entry's tensor in the checkpoint: for a layer, its
    one-layer slice [1, ...] of the stacked [num_layers, ...] tensor."""
    shape = tuple(entry.data.shape)
    if not _is_stacked(entry):
        return entry.key, (0,) * len(shape), shape
    layer, _ = _layer_position(entry)
    return entry.key, (layer,) + (0,) * len(shape), (1, *shape)


def _is_stacked(entry) -> bool:
    """Transformer-block layers are stored stacked along a leading layer axis."""
    return getattr(entry, "prepend_axis_num", 0) > 0 or hasattr(entry, "build_fn")


def _load_target(entry, data: torch.Tensor):
    """A new sharded tensor that loads one entry into `data` (the entry is not modified).

    Layer entries become a one-layer slice [1, ...] of the stacked [num_layers, ...] checkpoint
    tensor, addressed by plain offsets: Megatron's prepend-axis form assumes every layer of the
    grid is requested and cannot express a partial read. That also bypasses the fc1 factory:
    the global fc1 tensor already is [gate; up].
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    if not _is_stacked(entry):
        # Checkpoint and model shapes come from the same config.json: a mismatch is an error, not
        # something to zero-fill (and no memset of the embedding before it is read).
        return dataclasses.replace(entry, data=data, dtype=data.dtype, allow_shape_mismatch=False)
    layer, num_layers = _layer_position(entry)
    return ShardedTensor.from_rank_offsets(entry.key, data.unsqueeze(0), (0, layer, num_layers))


def _layer_position(entry) -> tuple[int, int]:
    """(layer index, number of layers) of a stacked layer entry."""
    if hasattr(entry, "build_fn"):  # fc1 factory: its key's offsets live in the built shards
        entry = entry.build_fn(entry.key, entry.data, entry.replica_id, None)[0]
    return entry.global_offset[0], entry.global_shape[0]


def _hf_dtype(hf_config: dict) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config.json dtype {name!r} is not a torch dtype")
    return dtype
