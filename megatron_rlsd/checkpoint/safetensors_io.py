"""Streaming access to Hugging Face weight folders.

`HFWeights` opens every tensor of a folder (single file, sharded with an index, or pickle `.bin`
files when explicitly allowed) as a memory-mapped, copy-on-write view: nothing is read until a
tensor is used, and pages are file-backed, so converting a model never holds it in anonymous
memory. `PlannedSafetensorsWriter` lays out size-bounded shards plus the standard
`model.safetensors.index.json` for tensors known in advance, and has each tensor filled in place
in its file, so writing a model never holds it in anonymous memory either.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"


def mmap_tensor(
    path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int], mode: str = "c"
) -> torch.Tensor:
    """A tensor backed by a mapping of `nbytes` at `offset` in `path`: private copy-on-write
    (mode "c", for reading) or shared, writing through to the file (mode "r+")."""
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.memmap(path, dtype=np.uint8, mode=mode, offset=offset, shape=(nbytes,))
    return torch.from_numpy(raw).view(dtype).reshape(shape)


class HFWeights:
    """Lazy, memory-mapped access to the tensors of a Hugging Face model folder."""

    def __init__(self, hf_dir: str | Path, allow_pickle: bool = False):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir} is not a directory")
        self._where: dict[str, tuple[Path, dict]] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        files = sorted(self.dir.glob("*.safetensors"))
        if files:
            for f in files:
                self._read_header(f)
            return
        bins = sorted(self.dir.glob("*.bin"))
        if not bins:
            raise FileNotFoundError(f"no *.safetensors weights in {self.dir}")
        if not allow_pickle:
            raise ValueError(
                f"{self.dir} has only pickle weights ({bins[0].name}); pickles can run code. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        for f in bins:
            # weights_only refuses arbitrary objects; mmap avoids reading the file up front.
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            self._pickled.update(state)

    def _read_header(self, path: Path) -> None:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
            info = dict(info, data_start=data_start)
            self._where[name] = (path, info)

    def names(self) -> list[str]:
        return list(self._where) + list(self._pickled)

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._pickled

    def get(self, name: str) -> torch.Tensor:
        if name in self._pickled:
            return self._pickled[name]
        if name not in self._where:
            raise KeyError(f"tensor {name!r} missing from the weights in {self.dir}")
        path, info = self._where[name]
        begin, end = info["data_offsets"]
        return mmap_tensor(path, info["data_start"] + begin, end - begin, _DTYPES[info["dtype"]], info["shape"])


class PlannedSafetensorsWriter:
    """Writes a folder of `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_bytes`
    (a larger group gets a shard of its own) plus `model.safetensors.index.json`, for tensors
    whose names, dtypes and shapes are all known before any data is.

    The shards are planned and created up front: each file gets its header (byte offsets
    included) and its final size. A tensor is then filled in place through a writable memory map
    of exactly its bytes in the file (`tensor`, or `span` for several consecutive ones), in any
    order: nothing is buffered, and the mapping goes away with the returned tensor (or the caller
    writes the bytes of a `region` itself, e.g. copying them file to file). `groups`
    lists tensors that stay consecutive in one shard (e.g. the HF parts of one Megatron tensor).
    Use as a context manager: the index, written last and only if every tensor was handed out,
    marks a complete folder.
    """

    def __init__(self, out_dir: str | Path, groups: Iterable[Sequence[tuple[str, torch.dtype, tuple[int, ...]]]],
                 max_shard_bytes: int = 4 << 30):  # fmt: skip
        self.out_dir = Path(out_dir)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = []
        size = 0
        for group in groups:
            specs = [(name, dtype, tuple(shape), math.prod(shape) * dtype.itemsize) for name, dtype, shape in group]
            nbytes = sum(spec[-1] for spec in specs)
            if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
                shards.append([])
                size = 0
            shards[-1].extend(specs)
            size += nbytes
        n = len(shards)
        files = ["model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        # name -> (file, byte offset in the file, dtype, shape, nbytes)
        self._where: dict[str, tuple[str, int, torch.dtype, tuple[int, ...], int]] = {}
        for file, shard in zip(files, shards):
            header = _header(shard)
            offset = len(header)
            for name, dtype, shape, nbytes in shard:
                self._where[name] = (file, offset, dtype, shape, nbytes)
                offset += nbytes
            with open(self.out_dir / file, "wb") as f:
                f.write(header)
                f.truncate(offset)  # the data area: filled in place, tensor by tensor
        self._pending = set(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        """A writable tensor of `name`'s planned dtype and shape, mapped onto its bytes in its file."""
        _, _, _, shape, _ = self._where[name]
        return self.span([name]).view(shape)

    def span(self, names: Sequence[str]) -> torch.Tensor:
        """One writable 1-D tensor mapped onto consecutive tensors of one dtype (e.g. [gate; up])."""
        path, start, nbytes = self.region(names)
        dtype = self._where[names[0]][2]
        return mmap_tensor(path, start, nbytes, dtype, [nbytes // dtype.itemsize], mode="r+")

    def region(self, names: Sequence[str]) -> tuple[Path, int, int]:
        """(file, byte offset, byte count) of consecutive tensors of one dtype, for the caller to
        fill; `tensor` and `span` map it."""
        file, start, dtype, _, _ = self._where[names[0]]
        end = start
        for name in names:
            where = self._where[name]
            if where[:3] != (file, end, dtype):
                raise ValueError(f"{', '.join(names)} are not consecutive {dtype} tensors of one shard")
            end += where[4]
        self._pending.difference_update(names)
        return self.out_dir / file, start, end - start

    def __enter__(self) -> PlannedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        if self._pending:
            raise ValueError(f"{len(self._pending)} planned tensors were never written, e.g. {min(self._pending)!r}")
        weight_map = {name: where[0] for name, where in self._where.items()}
        index = {"metadata": {"total_size": sum(where[4] for where in self._where.values())}, "weight_map": weight_map}
        with open(self.out_dir / INDEX_NAME, "w") as f:
            json.dump(index, f, indent=2)


def _header(shard: list[tuple[str, torch.dtype, tuple[int, ...], int]]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `shard` in order, padded
    with spaces to 8 bytes as the reference writer does (tensor data starts aligned)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in shard:
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
