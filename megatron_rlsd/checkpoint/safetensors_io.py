"""Streaming access to Hugging Face weight folders.

`HFWeights` opens every tensor of a folder (single file, sharded with an index, or pickle `.bin`
files when explicitly allowed) as a memory-mapped, copy-on-write view: nothing is read until a
tensor is used, and pages are file-backed, so converting a model never holds it in anonymous
memory. `ShardedSafetensorsWriter` writes tensors into size-bounded shards plus the standard
`model.safetensors.index.json`, flushing each shard as soon as it is full.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip

INDEX_NAME = "model.safetensors.index.json"


def mmap_tensor(path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor backed by a private (copy-on-write) mapping of `nbytes` at `offset` in `path`."""
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
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


class ShardedSafetensorsWriter:
    """Writes tensors to `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_bytes`."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 4 << 30):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # safetensors refuses tensors that share storage (e.g. the halves of one fc1): those
        # get their own copy; everything else is kept as is.
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().nbytes() != nbytes:
            tensor = tensor.clone()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.out_dir / f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Flush the last shard, give shards their final names and write the index."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{i:05d}.tmp").rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(self.out_dir / INDEX_NAME, "w") as f:
            json.dump(index, f, indent=2)
