"""weight_sync: bytes per second from Megatron TP2 x PP2 shards into the colocated vLLM engines vs a
plain memcpy of the same bytes on the same machine; bucket size swept; peak extra memory.

The real path (benchmarks/workers/weight_sync.py): `rollout/weight_sync.py: iter_hf_buckets`
(TP all-gather, PP broadcast, HF renaming, buckets) consumed by `VLLMEngine.update_weights` (vLLM's
in-place layerwise reload) on 4 gloo ranks, each hosting an engine, as in training. The memcpy
baseline copies the same number of bytes on all 4 ranks at once (same cores, same contention).
Targets: sync bytes/s >= 0.5 x memcpy (best bucket size); peak extra resident memory of a sync <=
one bucket + one layer (at every bucket size).
"""

from __future__ import annotations

import json

from benchmarks.common import REPO, Check, Context, MiB, Result, torchrun


def model_dir(ctx: Context) -> str:
    from megatron_rlsd.models.tiny import build_tiny_qwen3

    d = ctx.dir("weight_sync") / "model"
    if not (d / "config.json").exists():
        layers = 2 if ctx.quick else 8
        build_tiny_qwen3(d, num_layers=layers, hidden_size=1024, num_heads=8, num_kv_heads=4, head_dim=128,
                         intermediate_size=3072, vocab_size=16384, seed=1)  # fmt: skip
    return str(d)


def run(ctx: Context) -> Result:
    buckets = [0, 16, 256] if ctx.quick else [0, 16, 64, 256, 1024]
    out = ctx.dir("weight_sync") / "report.json"
    hf = model_dir(ctx)
    ctx.log("weight_sync: torchrun TP2PP2")
    torchrun(REPO / "benchmarks" / "workers" / "weight_sync.py", hf, str(out), ",".join(map(str, buckets)),
             "1" if ctx.quick else "2", nproc=4, timeout=3600)  # fmt: skip
    rep = json.loads(out.read_text())
    layer = rep["largest_layer"]
    details, ratios, mem, producer = [], {}, {}, {}
    for r in rep["results"]:
        sync_bps, copy_bps = r["bytes"] / r["seconds"], r["bytes"] / r["memcpy_seconds"]
        ratios[r["bucket_mb"]] = sync_bps / copy_bps
        mem[r["bucket_mb"]] = r["extra_peak"] / (r["largest_bucket"] + layer)
        producer[r["bucket_mb"]] = r["export_peak"] / (r["largest_bucket"] + layer)
        details.append(
            f"  weight_sync [bucket {r['bucket_mb']} MiB, {r['buckets']} buckets, {r['bytes'] / MiB:.0f} MiB/engine]: "
            f"{r['seconds']:.2f} s = {sync_bps / MiB:.0f} MiB/s vs memcpy {copy_bps / MiB:.0f} MiB/s ({ratios[r['bucket_mb']]:.3f}x; "
            f"export alone {r['export_seconds']:.2f} s, engine reload the rest); "
            f"peak extra {r['extra_peak'] / MiB:.0f} MiB (producer alone {r['export_peak'] / MiB:.0f}) vs bucket "
            f"{r['largest_bucket'] / MiB:.0f} + layer {layer / MiB:.0f} MiB"
        )
    best = max(ratios, key=ratios.get)
    worst_mem = max(mem, key=mem.get)
    figures = (f"{rep['results'][0]['bytes'] / MiB:.0f} MiB per engine, best bucket {best} MiB: "
               f"{ratios[best]:.3f}x memcpy; peak extra / (bucket + layer) worst {mem[worst_mem]:.2f} at {worst_mem} MiB "
               f"(the producer alone: worst {max(producer.values()):.2f})")
    checks = [
        Check("sync/memcpy bytes/s", ratios[best], ">=", 0.5),
        Check("peak extra / (bucket + layer)", mem[worst_mem], "<=", 1.0),
    ]
    return Result("weight_sync", figures, checks, details)
