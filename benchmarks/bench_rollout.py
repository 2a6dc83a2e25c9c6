"""rollout: generated tokens per second of the colocated engines (what a training step gets) vs
the same vLLM engines alone on the same prompts.

The trainer runs as in teacher_overhead (benchmarks/workers/train_probe.py, grpo and rlsd steps
alternating, the embedded default's model on 4 gloo ranks, one engine per rank; the same run when
both benchmarks run in one invocation). Colocated: tokens generated / (rollout stage + sync stage,
each on its slowest rank) of steps 3.., i.e. with the engines sharing the processes and cores with
Megatron, sleeping after their rollouts and woken and re-weighted by the sync. Alone: after
training, the same engines replay the recorded generate calls of steps 3.. (same prompts, seeds
and sampling) back to back, with nothing else
running and no sync between them (prefix cache reset before each, as a fresh engine would start).
Target: colocated >= 0.9 x alone.
"""

from __future__ import annotations

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
    details = [f"  rollout [tiny default, steps 3..{steps}]: {tokens:.0f} tokens in rollout {gen_s:.1f} s + sync {sync_s:.1f} s; "
               f"alone {alone['alone_tokens']} tokens in {alone['alone_s']:.1f} s"]
    figures = (f"colocated {colocated:.0f} tok/s (rollout stage alone {generation_only:.0f}) vs engine alone "
               f"{alone_tps:.0f} tok/s")
    return Result("rollout", figures, [Check("colocated/alone", colocated / alone_tps, ">=", 0.9)], details)
