"""logprob_kernel: vocab-parallel log-prob + entropy (forward + backward) vs plain log_softmax +
gather, at the Qwen vocabulary (151,936), bf16 logits: extra peak memory and time, TP 1/2/4 (gloo).

Each measurement is a fresh process group (benchmarks/workers/logprob_kernel.py): the kernel is
megatron_rlsd.algorithms.vocab_parallel.vocab_parallel_logprobs_and_entropy, exactly as the trainer
calls it; the naive version runs on one rank with the full vocabulary. Extra memory: peak resident
memory of the iteration above what was resident before it, minus the logits' gradient (the output
any method produces). Targets: kernel extra <= 0.25 x naive extra; per-rank extra falling as 1/TP
(TP4 extra x 4 / TP1 extra <= 1.25); kernel time <= 1.0 x naive at TP1 (same cores, one thread).
"""

from __future__ import annotations

import json

from benchmarks.common import REPO, Check, Context, MiB, Result, torchrun

VOCAB = 151936


def measure(ctx: Context, mode: str, n: int, tp: int) -> dict:
    out = ctx.dir("logprob_kernel") / f"{mode}_{n}_{tp}.json"
    ctx.log(f"logprob_kernel: {mode} N={n} TP{tp}")
    torchrun(REPO / "benchmarks" / "workers" / "logprob_kernel.py", mode, str(n), str(VOCAB), str(out), nproc=tp, timeout=1800)
    d = json.loads(out.read_text())
    ranks = d["per_rank"]
    return {"seconds": max(r["seconds"] for r in ranks), "extra": max(r["extra_bytes"] for r in ranks),
            "logits": ranks[0]["logits_bytes"]}  # fmt: skip


def run(ctx: Context) -> Result:
    kernel_sizes = [2048] if ctx.quick else [2048, 8192]
    naive_sizes = [2048] if ctx.quick else [2048, 4096]  # 8192: ~22 GB for the naive version on a 24 GB machine
    naive = {n: measure(ctx, "naive", n, 1) for n in naive_sizes}
    kern = {(n, tp): measure(ctx, "kernel", n, tp) for n in kernel_sizes for tp in (1, 2, 4)}
    details = []
    for n in sorted(set(kernel_sizes) | set(naive_sizes)):
        parts = []
        if n in naive:
            parts.append(f"naive {naive[n]['seconds']:.1f} s, extra {naive[n]['extra'] / MiB:.0f} MiB")
        for tp in (1, 2, 4):
            if (n, tp) in kern:
                k = kern[(n, tp)]
                parts.append(f"TP{tp} {k['seconds']:.1f} s, extra {k['extra'] / MiB:.0f} MiB/rank")
        details.append(f"  logprob_kernel [N={n}, V={VOCAB}, bf16, fwd+bwd]: " + "; ".join(parts))
    n0 = 2048
    k1, k4, nv = kern[(n0, 1)], kern[(n0, 4)], naive[n0]
    checks = [
        Check("extra memory kernel/naive", k1["extra"] / nv["extra"], "<=", 0.25),
        Check("time kernel/naive", k1["seconds"] / nv["seconds"], "<=", 1.0),
        Check("TP4 extra x4 / TP1 extra", 4 * k4["extra"] / k1["extra"], "<=", 1.25),
    ]
    figures = (f"N={n0}: kernel TP1 {k1['seconds']:.1f} s / {k1['extra'] / MiB:.0f} MiB extra vs naive "
               f"{nv['seconds']:.1f} s / {nv['extra'] / MiB:.0f} MiB; TP2 {kern[(n0, 2)]['extra'] / MiB:.0f}, "
               f"TP4 {k4['extra'] / MiB:.0f} MiB/rank")  # fmt: skip
    if not ctx.quick:
        n1 = 8192
        projected = 2 * naive[4096]["extra"]  # the naive version's memory is linear in N
        kb = kern[(n1, 1)]
        figures += (f"; N={n1}: kernel TP1 {kb['seconds']:.1f} s / {kb['extra'] / MiB:.0f} MiB extra "
                    f"(naive projected {projected / MiB:.0f} MiB: {kb['extra'] / projected:.2f}x), "
                    f"TP4 {kern[(n1, 4)]['extra'] / MiB:.0f} MiB/rank")  # fmt: skip
        checks.append(Check(f"N={n1} TP4 extra x4 / TP1 extra", 4 * kern[(n1, 4)]["extra"] / kb["extra"], "<=", 1.25))
    return Result("logprob_kernel", figures, checks, details)
