"""torchrun worker (TP ranks, gloo): time and extra peak memory of log-prob + entropy, forward +
backward, over [N, V/TP] bf16 logits.

    torchrun --nproc-per-node TP benchmarks/workers/logprob_kernel.py MODE N V OUT.json

MODE `kernel`: megatron_rlsd.algorithms.vocab_parallel.vocab_parallel_logprobs_and_entropy over the
TP group. MODE `naive` (one rank): log_softmax of the fp32 logits, gather, entropy from the same
log-probs, as one would write it. One untimed warm-up iteration, then a timed one whose peak
resident memory is read from VmHWM after resetting it (/proc/self/clear_refs): extra memory = peak
- resident before the iteration - the logits' gradient (the output any method must produce).
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import proc_status, reset_peak_rss  # noqa: E402
from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs_and_entropy  # noqa: E402

TEMPERATURE = 1.0


def naive(logits, target):
    lp = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    logp = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1)
    return logp, ent


def main(mode: str, n: int, vocab: int, out: str) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD if world > 1 else None
    g = torch.Generator().manual_seed(1234 + rank)
    logits = (torch.randn(n, vocab // world, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(7))
    weights = torch.rand(n, generator=torch.Generator().manual_seed(8))

    def iteration():
        if mode == "naive":
            logp, ent = naive(logits, target)
        else:
            logp, ent = vocab_parallel_logprobs_and_entropy(logits, target, tp_group=group, temperature=TEMPERATURE)
        ((logp * weights).sum() + 0.01 * ent.sum()).backward()
        return logp.detach(), ent.detach()

    iteration()
    logits.grad = None
    dist.barrier()
    before = proc_status()["VmRSS"]
    reset_peak_rss()
    t0 = time.perf_counter()
    iteration()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    peak = proc_status()["VmHWM"]
    grad_bytes = logits.grad.numel() * logits.grad.element_size()
    rec = {"seconds": elapsed, "extra_bytes": peak - before - grad_bytes, "peak_bytes": peak,
           "logits_bytes": logits.numel() * logits.element_size(), "grad_bytes": grad_bytes}  # fmt: skip
    gathered = [None] * world
    dist.all_gather_object(gathered, rec)
    if rank == 0:
        Path(out).write_text(json.dumps({"per_rank": gathered, "world": world, "mode": mode, "n": n, "vocab": vocab}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
