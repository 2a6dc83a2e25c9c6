"""torchrun worker (4 ranks, TP2 x PP2, gloo): the real weight sync (rollout/weight_sync.py
iter_hf_buckets -> VLLMEngine.update_weights) into a colocated vLLM engine on every rank, per
bucket size, vs a plain memcpy of the same bytes on every rank at once.

    torchrun --nproc-per-node 4 benchmarks/workers/weight_sync.py HF_DIR OUT.json BUCKETS_MB [REPEATS]

Per bucket size: the best of REPEATS syncs (and of REPEATS runs of the bucket producer alone, its
buckets dropped: what the engine's reload adds is the difference) (wall time, barrier to barrier,
slowest rank), the bytes each engine received, and the peak extra resident memory of the sync and
of the producer alone (VmHWM after a reset, minus the resident set before it; max over ranks),
next to the largest bucket (the memory its tensors live in) and the largest layer group of full
tensors.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import proc_status, reset_peak_rss  # noqa: E402
from megatron_rlsd.config import RolloutConfig  # noqa: E402
from megatron_rlsd.models.registry import build_pipeline_stage  # noqa: E402
from megatron_rlsd.parallel import ParallelConfig, init_distributed, seed_model_parallel_rng  # noqa: E402
from megatron_rlsd.rollout.vllm_engine import VLLMEngine  # noqa: E402
from megatron_rlsd.rollout.weight_sync import iter_hf_buckets  # noqa: E402


def timed_sync(model, shape, engine, bucket_mb):
    stats = {"bytes": 0, "largest_bucket": 0, "buckets": 0}

    def counting(buckets):
        for b in buckets:
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for _, t in b}
            nbytes = sum(storages.values())  # memory, not names: a tied lm_head is the embedding
            stats["bytes"] += nbytes
            stats["largest_bucket"] = max(stats["largest_bucket"], nbytes)
            stats["buckets"] += 1
            yield b

    dist.barrier()
    before = proc_status()["VmRSS"]
    reset_peak_rss()
    t0 = time.perf_counter()
    engine.update_weights(counting(iter_hf_buckets(model, shape, bucket_mb << 20)))
    dist.barrier()
    stats["seconds"] = time.perf_counter() - t0
    stats["extra_peak"] = proc_status()["VmHWM"] - before
    return stats


def timed_export(model, shape, bucket_mb) -> tuple[float, int]:
    """The bucket producer alone (gather, broadcast, HF renaming), its buckets dropped: (wall
    time, peak extra resident memory)."""
    dist.barrier()
    before = proc_status()["VmRSS"]
    reset_peak_rss()
    t0 = time.perf_counter()
    for bucket in iter_hf_buckets(model, shape, bucket_mb << 20):
        del bucket
    dist.barrier()
    return time.perf_counter() - t0, proc_status()["VmHWM"] - before


def timed_memcpy(nbytes: int) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)
    dst.copy_(src)  # touch both
    dist.barrier()
    t0 = time.perf_counter()
    dst.copy_(src)
    dist.barrier()
    return time.perf_counter() - t0


def main(hf_dir, out, buckets_mb, repeats):
    platform = init_distributed(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    seed_model_parallel_rng(7)
    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    model, shape = build_pipeline_stage(hf_config, platform, init_weights=True)
    model.eval()
    engine = VLLMEngine(hf_dir, RolloutConfig(kv_cache_mb=32), platform, max_model_len=256, seed=0, log_file=None)
    from megatron_rlsd.checkpoint.hf_mapping import layer_group_key
    from megatron_rlsd.models.registry import hf_mapping

    mapping = hf_mapping(shape)
    layers = {}  # full (TP-merged) bytes of each of this stage's layer groups
    tp = 2
    for name, prm in model.named_parameters():
        key = layer_group_key(mapping.canonical_name(name, 0))
        full = prm.numel() * prm.element_size() * (tp if mapping.tp_dim(mapping.canonical_name(name, 0)) is not None else 1)
        layers[key] = layers.get(key, 0) + full
    timed_sync(model, shape, engine, 16)  # warm-up: the engine's first reload
    results = []
    for mb in buckets_mb:
        runs = [timed_sync(model, shape, engine, mb) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        memcpy = min(timed_memcpy(best["bytes"]) for _ in range(repeats))
        exports = [timed_export(model, shape, mb) for _ in range(repeats)]
        rec = best | {"bucket_mb": mb, "memcpy_seconds": memcpy, "export_seconds": min(e[0] for e in exports),
                      "export_peak": max(e[1] for e in exports), "extra_peak": max(r["extra_peak"] for r in runs)}  # fmt: skip
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rec)
        results.append({
            "bucket_mb": mb,
            "bytes": gathered[0]["bytes"],
            "buckets": gathered[0]["buckets"],
            "seconds": max(g["seconds"] for g in gathered),
            "memcpy_seconds": max(g["memcpy_seconds"] for g in gathered),
            "export_seconds": max(g["export_seconds"] for g in gathered),
            "extra_peak": max(g["extra_peak"] for g in gathered),
            "export_peak": max(g["export_peak"] for g in gathered),
            "largest_bucket": max(g["largest_bucket"] for g in gathered),
        })  # fmt: skip
    largest = [None] * dist.get_world_size()
    dist.all_gather_object(largest, max(layers.values()))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"results": results, "largest_layer": max(largest)}))
    dist.barrier()
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4]) if len(sys.argv) > 4 else 2)
