"""torchrun worker (4 ranks, TP2PP2, gloo): Megatron -> vLLM weight sync.

Every rank hosts a vLLM engine (external_launcher). After a sync, every engine's log-probs of
fixed sequences equal Megatron's; after the Megatron weights change and are synced again, the
engines follow. Writes a JSON report on rank 0.

    torchrun --nproc-per-node 4 tests/workers/weight_sync.py CKPT_ROOT REPORT.json VLLM_LOG
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs  # noqa: E402
from megatron_rlsd.checkpoint import dist as ckpt  # noqa: E402
from megatron_rlsd.config import RolloutConfig  # noqa: E402
from megatron_rlsd.models.forward import forward_only  # noqa: E402
from megatron_rlsd.models.registry import build_pipeline_stage  # noqa: E402
from megatron_rlsd.parallel import ParallelConfig, init_distributed, seed_model_parallel_rng  # noqa: E402
from megatron_rlsd.rollout.vllm_engine import VLLMEngine  # noqa: E402
from megatron_rlsd.rollout.weight_sync import iter_hf_buckets  # noqa: E402


def megatron_logprobs(model, seqs):
    from megatron.core import parallel_state as ps

    def lp(logits, mb):
        t = mb["tokens"]
        return vocab_parallel_logprobs(logits[:, :-1], t[:, 1:], tp_group=ps.get_tensor_model_parallel_group())

    out = forward_only(model, [{"tokens": seqs}], lp)
    mine = torch.cat(out) if out and ps.get_tensor_model_parallel_rank() == 0 else None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return next(g for g in gathered if g is not None)


def sync(model, shape, engine, bucket_mb, held=None):
    """One update_weights; returns how many buckets it consumed. `held`: a list that receives, at
    every handover, (bytes the sync has allocated and not handed over, counting this bucket as
    handed; the bytes of the distinct buffers this bucket's tensors live in), then a last entry
    (bytes allocated and never handed over, 0): what a sync holds beyond what vLLM is given."""
    from megatron_rlsd.rollout import weight_sync

    counted, allocated, handed = [0], [0], [0]
    original = weight_sync._empty

    def counting_empty(numel, dtype, device):
        t = original(numel, dtype, device)
        allocated[0] += t.numel() * t.element_size()
        return t

    def counting(buckets):
        for b in buckets:
            counted[0] += 1
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for _, t in b}
            handed[0] += sum(storages.values())
            if held is not None:
                held.append((allocated[0] - handed[0], sum(storages.values())))
            yield b
        if held is not None:
            held.append((allocated[0] - handed[0], 0))

    weight_sync._empty = counting_empty
    try:
        engine.update_weights(counting(iter_hf_buckets(model, shape, bucket_mb << 20)))
    finally:
        weight_sync._empty = original
    return counted[0]


def main(ckpt_root, report_path, vllm_log):
    platform = init_distributed(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    seed_model_parallel_rng(7)
    hf_dir = ckpt.hf_dir_of(ckpt.resolve_step_dir(ckpt_root))
    hf_config = json.loads((hf_dir / "config.json").read_text())
    model, shape = build_pipeline_stage(hf_config, platform, init_weights=False)
    ckpt.load_model_weights(model, ckpt_root)
    model.eval()

    engine = VLLMEngine(str(hf_dir), RolloutConfig(kv_cache_mb=64), platform, max_model_len=128, seed=0,
                        log_file=vllm_log)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(3, 600, (3, 20), generator=g)
    report = {}

    # perturb first so that only a sync can give the engines these weights (they start from dummy ones)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    before = torch.tensor(engine.score(seqs.tolist()))
    held = []
    report["buckets"] = sync(model, shape, engine, bucket_mb=0, held=held)  # 0 MB: one layer per bucket
    shard = max(p.numel() * p.element_size() for p in model.parameters())  # bounds the scratch buffer
    held_all = [None] * dist.get_world_size()
    dist.all_gather_object(held_all, {"held": held, "largest_shard": shard})
    report["sync_memory_per_rank"] = held_all
    ref = megatron_logprobs(model, seqs)
    after = torch.tensor(engine.score(seqs.tolist()))
    report["stale_diff"] = (before - ref).abs().max().item()
    diffs = [None] * dist.get_world_size()
    dist.all_gather_object(diffs, (after - ref).abs().max().item())
    report["synced_diff_per_rank"] = diffs

    # a second change, synced with one big bucket after the engines slept (as after rollouts,
    # when an asleep engine refuses requests): engines follow again
    engine.sleep()
    try:
        engine.score(seqs.tolist())
        report["asleep_refusal"] = None
    except RuntimeError as e:
        report["asleep_refusal"] = str(e)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    ref2 = megatron_logprobs(model, seqs)
    sync(model, shape, engine, bucket_mb=1024)
    after2 = torch.tensor(engine.score(seqs.tolist()))
    diffs2 = [None] * dist.get_world_size()
    dist.all_gather_object(diffs2, (after2 - ref2).abs().max().item())
    report["second_sync_diff_per_rank"] = diffs2
    report["changed_by_second_update"] = (ref2 - ref).abs().max().item()
    dist.barrier()  # every rank's vLLM records are in the shared log
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
