"""conversion: a random bf16 checkpoint with Qwen3-8B's exact shapes (~16 GB, sharded safetensors;
examples/model_configs/qwen3-8b/config.json), HF -> Megatron -> HF through the real tools
(tools/convert_hf_to_megatron.py, tools/convert_megatron_to_hf.py, each a fresh process):
throughput vs `cp` of the same files, peak anonymous memory, bit-exact output. `--quick`: a
Qwen3-1.7B shape (~4 GB).

Peak anonymous memory: the largest RssAnon (heap and tensors; not the page cache of the files it
maps) of the tool's process tree, sampled every 20 ms. Throughput: checkpoint bytes / wall time of
each tool, against `cp -r` of the HF folder (bytes / cp's wall time), right before. Bit-exact: every
tensor of the round trip equals the original bit for bit (compared as integers). The files are
removed afterwards. Targets: peak anonymous memory <= 4 GiB; each direction >= 0.3 x cp. Both sides are timed to durable
files: HF -> Megatron's writer (Megatron's dist_checkpointing) fsyncs what it writes, Megatron -> HF's
output is fsynced after the tool (and timed), and cp is timed with its copy fsynced too (the
page-cache-only cp ratio is printed beside it). Each tool's time
includes its interpreter start-up and Megatron import, as a user runs it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, Check, Context, GiB, Result, rmtree, run_measured

QWEN3_1P7B = {  # Qwen/Qwen3-1.7B's config.json shapes
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "dtype": "bfloat16", "use_sliding_window": False,
}  # fmt: skip
SHARD_BYTES = 4 << 30
BLOCK = 64 << 20  # random bytes generated and written at a time


def hf_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor an HF checkpoint of this config stores."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    names = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    if config.get("tie_word_embeddings"):
        names = [(n, s) for n, s in names if n != "lm_head.weight"]
    return names


def write_random_checkpoint(out: Path, config: dict, seed: int = 0) -> int:
    """Sharded bf16 safetensors of random values (|x| < 2, no NaN/inf: the top exponent bit
    cleared), streamed to disk; returns the total tensor bytes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    # one random block, varied per block by an XOR with a per-block constant: random-looking
    # contents (blocks all differ, so a misplaced block shows) at disk speed on a slow CPU
    base = np.frombuffer(np.random.default_rng(seed).bytes(BLOCK), dtype=np.uint16)
    counter = 0
    shards, current, size = [], [], 0
    for name, shape in hf_shapes(config):
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape, nbytes in shard:
                left = nbytes
                while left:
                    n = min(BLOCK, left)
                    counter += 1
                    block = np.bitwise_xor(base[: n // 2], np.uint16((counter * 40503) & 0xFFFF))
                    block &= np.uint16(0xBFFF)
                    f.write(memoryview(block))
                    left -= n
        total += offset
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def bit_exact(a: Path, b: Path) -> tuple[bool, str]:
    """Every tensor of folder `a` equals folder `b`'s bit for bit (same names)."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False, f"names differ: {sorted(set(ia) ^ set(ib))[:3]}"
    handles = {}
    try:
        for name in sorted(ia):
            for idx in (ia, ib):
                if idx[name] not in handles:
                    handles[idx[name]] = safe_open(str(idx[name]), framework="pt").__enter__()
            x, y = handles[ia[name]].get_tensor(name), handles[ib[name]].get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.int16), y.view(torch.int16)):
                return False, f"{name} differs"
            del x, y
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return True, f"{len(ia)} tensors equal"


def fsync_tree(path: Path) -> None:
    """Every file under `path` on disk (the converters' writer fsyncs what it writes)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(ctx: Context) -> Result:
    if ctx.quick:
        config, label = QWEN3_1P7B, "Qwen3-1.7B shapes"
    else:
        config, label = json.loads((REPO / "examples/model_configs/qwen3-8b/config.json").read_text()), "Qwen3-8B shapes"
    work = ctx.dir("conversion")
    hf, mg, back, copied = work / "hf", work / "megatron", work / "hf_back", work / "cp"
    try:
        ctx.log(f"conversion: writing a random {label} checkpoint")
        nbytes = write_random_checkpoint(hf, config)
        files = du(hf)
        fsync_tree(hf)  # nothing of the input left to write back while the timed copies run
        ctx.log("conversion: cp")
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(hf), str(copied)], check=True)
        cp_s = time.perf_counter() - t0
        fsync_tree(copied)
        cp_sync_s = time.perf_counter() - t0
        rmtree(copied)
        tools = REPO / "tools"
        ctx.log("conversion: hf -> megatron")
        to_mg_s, to_mg_anon, _ = run_measured([sys.executable, str(tools / "convert_hf_to_megatron.py"), "--hf-dir", str(hf),
                                               "--out", str(mg), "--quiet"])  # fmt: skip
        ctx.log("conversion: megatron -> hf")
        to_hf_s, to_hf_anon, _ = run_measured([sys.executable, str(tools / "convert_megatron_to_hf.py"), "--ckpt", str(mg),
                                               "--out", str(back), "--quiet"])  # fmt: skip
        t0 = time.perf_counter()
        fsync_tree(back)  # this tool's writer leaves its files in the page cache: timed to disk like the others
        to_hf_s += time.perf_counter() - t0
        ctx.log("conversion: comparing")
        exact, why = bit_exact(hf, back)
    finally:
        for d in (hf, mg, back, copied):
            rmtree(d)
    cp_bps = files / cp_sync_s  # cp with its copy on disk, as the converters' output is
    r_to_mg, r_to_hf = (nbytes / to_mg_s) / cp_bps, (nbytes / to_hf_s) / cp_bps
    r_page_cache = (nbytes / max(to_mg_s, to_hf_s)) / (files / cp_s)
    peak = max(to_mg_anon, to_hf_anon)
    details = [f"  conversion [{label}, {nbytes / GiB:.1f} GiB]: cp {cp_s:.0f} s into the page cache, {cp_sync_s:.0f} s "
               f"with its files fsynced ({cp_bps / GiB:.2f} GiB/s); "
               f"hf->megatron {to_mg_s:.0f} s, peak anon {to_mg_anon / GiB:.2f} GiB; megatron->hf {to_hf_s:.0f} s, "
               f"peak anon {to_hf_anon / GiB:.2f} GiB; round trip: {why}"]  # fmt: skip
    figures = (f"{label} {nbytes / GiB:.1f} GiB: hf->megatron {r_to_mg:.2f}x cp, megatron->hf {r_to_hf:.2f}x cp, "
               f"(vs cp into the page cache, no fsync: {r_page_cache:.2f}x), peak anon {peak / GiB:.2f} GiB, "
               f"bit-exact {'yes' if exact else 'NO'}")
    checks = [
        Check("slower direction / cp", min(r_to_mg, r_to_hf), ">=", 0.3),
        Check("peak anon GiB", peak / GiB, "<=", 4.0),
        Check("bit-exact", 1.0 if exact else 0.0, ">=", 1.0),
    ]
    return Result("conversion", figures, checks, details)
