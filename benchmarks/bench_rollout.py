"""rollout: generated tokens per second of the colocated engines (what a training step gets) vs
the same vLLM engines alone on the same prompts.

The trainer runs as in teacher_overhead (benchmarks/workers/train_probe.py, grpo and rlsd steps
alternating, the embedded default's model on 4 gloo ranks, one engine per rank; the same run when
both benchmarks run in one invocation). Colocated: tokens generated / (rollout stage + sync stage,
each on its slowest rank) of steps 3.., i.e. with the engines sharing the processes and cores with
Megatron, sleeping after their rollouts and woken and re-weighted by the sync. Alone: in each of
steps 3.., right after its rollout stage and outside every stage timer, the same engines replay
that step's generate calls (same prompts, seeds and sampling, same weights) with nothing else
running and no sync (prefix cache reset first), so both figures are taken under the same machine
load, step by step. Ratio: the median over steps of alone time / colocated time (rollout + sync).
Target: colocated >= 0.9 x alone.
"""

from __future__ import annotations

import statistics

from benchmarks.bench_teacher_overhead import stage, train_run
from benchmarks.common import Check, Context, Result


def run(ctx: Context) -> Result:
    steps = 6 if ctx.quick else 12
    res = train_run(ctx, "tiny default", steps)
    rows, alone = res["rows"], res["alone"]
    if not alone:
        raise RuntimeError("the probed run wrote no engine-alone replay")
    tokens = sum(r["rollout_tokens_per_s"] * r["time_rollout"] for r in rows)  # every engine's
    gen_s = sum(stage(r, "rollout") for r in rows)  # the slowest engine's
    sync_s = sum(stage(r, "sync") for r in rows)
    colocated = tokens / (gen_s + sync_s)
    generation_only = tokens / gen_s
    alone_tps = alone["alone_tokens"] / alone["alone_s"]
    # per step (same tokens both ways): alone time / colocated time; the median shrugs off a
    # step caught by a burst of load on the shared machine
    per_step = [a / (stage(r, "rollout") + stage(r, "sync")) for r, a in zip(rows, alone["per_step_s"])]
    ratio = statistics.median(per_step)
    details = [f"  rollout [tiny default, steps 3..{steps}]: {tokens:.0f} tokens in rollout {gen_s:.1f} s + sync {sync_s:.1f} s; "
               f"alone {alone['alone_tokens']} tokens in {alone['alone_s']:.1f} s; per-step colocated/alone "
               + " ".join(f"{x:.2f}" for x in per_step)]
    figures = (f"colocated {colocated:.0f} tok/s (rollout stage alone {generation_only:.0f}) vs engine alone "
               f"{alone_tps:.0f} tok/s over all steps ({colocated / alone_tps:.2f}x); median per step {ratio:.2f}x")
    return Result("rollout", figures, [Check("colocated/alone, median step", ratio, ">=", 0.9)], details)
