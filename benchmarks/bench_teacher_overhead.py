"""teacher_overhead: step time of `rlsd` vs `grpo`, same config and seed, per stage.

One run of the real trainer under torchrun (benchmarks/workers/train_probe.py: megatron_rlsd.train
with probes) whose steps alternate between `grpo` and `rlsd` (same config, seed and batches'
pipeline; side by side under the same machine load, which on a shared 2-core machine drifts more
than the difference measured). The model is the embedded default's (examples/tiny_cpu.yaml, TP2 x
PP2, 4 gloo ranks) without its warm start (the step's work does not depend on the weights); the
full run adds the largest model this machine steps in well under a minute (hidden 512, 8 layers).
Steps 1-2 (one-time costs) are left out. Step time: rank 0's wall time (sum of its stages); a
stage: its slowest rank's time (a rank that finished its rollouts early waits in the reward
stage's collective); medians per mode. The teacher/student check pairs, after every rlsd step,
the teacher pass and a forward-only student pass over the same batch, back to back.

RLSD should add exactly one forward (the teacher's, over prompts longer by the reference answer)
and nothing else:
  (rlsd - grpo step time) <= 1.1 x rlsd's teacher stage   (nothing else got slower)
  teacher stage <= 1.1 x a student forward of the same batch   (the teacher pass is one forward)
rlsd/grpo itself is reported, and projected for the paper's recipe from FLOPs
(examples/qwen3_8b_rlsd.yaml shapes and knobs, lengths as in the padding benchmark).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.common import REPO, Check, Context, Result, torchrun

STAGES = ("rollout", "reward", "teacher", "update", "sync")
WARMUP = 2  # steps 1-2 (one of each mode) pay one-time costs

SIZES = {  # name: demo overrides
    "tiny default": [],
    "h512 L8": ["demo.tiny_hidden=512", "demo.tiny_layers=8", "demo.tiny_heads=8", "demo.tiny_kv_heads=4"],
}


def train_run(ctx: Context, size: str, steps: int) -> dict:
    """One probed trainer run alternating grpo (odd steps) and rlsd (even steps); cached per
    (size, steps) in this invocation (the rollout benchmark reads the same run). Returns
    {"rows": metrics rows of steps 3.., "alone": the engine-alone replay}."""
    key = ("train", size, steps)
    if key in ctx.cache:
        return ctx.cache[key]
    slug = size.replace(" ", "_")
    base = ctx.dir(f"train_{slug}")
    out = base / f"alternating_{steps}"
    ctx.log(f"trainer: {size}, grpo/rlsd alternating, {steps} steps")
    args = ["--alternate", "--config", str(REPO / "examples" / "tiny_cpu.yaml"),
            f"model.hf_dir={base / 'model'}", f"data.train_file={base / 'add.jsonl'}",
            f"trainer.output_dir={out}", f"trainer.steps={steps}", "trainer.warmup_sft_steps=0",
            "trainer.save_interval=0", "trainer.tensorboard=false", "trainer.resume=never",
            "algorithm.loss_mode=rlsd", *SIZES[size]]  # fmt: skip
    torchrun(REPO / "benchmarks" / "workers" / "train_probe.py", str(out / "alone.json"), *args, nproc=4, timeout=3600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    alone = json.loads((out / "alone.json").read_text()) if (out / "alone.json").exists() else None
    ctx.cache[key] = {"rows": rows[WARMUP:], "alone": alone}
    return ctx.cache[key]


def stage(row: dict, name: str) -> float:
    """A stage's time on its slowest rank (a rank done early waits in the next stage)."""
    return max(r.get(name, 0.0) for r in row["probe_rank_times"])


def medians(rows: list[dict], mode: str) -> dict:
    rows = [r for r in rows if r["probe_mode"] == mode]
    m = {s: statistics.median(stage(r, s) for r in rows) for s in STAGES}
    m["step"] = statistics.median(sum(r.get(f"time_{s}", 0.0) for s in STAGES) for r in rows)  # rank 0's wall time
    m["steps"] = len(rows)
    if mode != "grpo":
        m["probe_teacher"] = statistics.median(r["probe_teacher_s"] for r in rows)
        m["probe_student"] = statistics.median(r["probe_student_s"] for r in rows)
    return m


def paper_projection() -> tuple[float, float]:
    """rlsd/grpo of the paper's recipe from FLOPs: (rollout at the update's efficiency, no rollout).

    Per sample, with lengths P (prompt), A (reference answer), R (response): a forward costs
    2 x (decoder params) per token + 2 x V x h per response token (the output layer runs on
    response positions only) + causal attention 2 x L x q_dim x T^2. The update is forward +
    backward (3 forwards) + full recompute (1), the teacher one forward over P + A + R, the
    rollout about one forward over P + R (prefill + decode, counted at the same efficiency,
    which decode on a GPU does not reach: the real ratio is lower)."""
    import numpy as np

    from benchmarks.bench_padding import paper_like_lengths
    from megatron_rlsd.memory_plan import Model

    hf = json.loads((REPO / "examples" / "model_configs" / "qwen3-8b" / "config.json").read_text())
    model = Model.from_hf_config(hf)
    s = model.decoder
    layer_params = sum(model._decoder_layer()) * s.layers
    q_dim = s.heads * s.head_dim

    def forward(t, r):
        return 2 * layer_params * t + 2 * model.vocab * s.hidden * r + 2 * s.layers * q_dim * t * t

    p, r, a = paper_like_lengths(8 * 2048, np.random.default_rng(0))
    p, r, a = p.astype(float), r.astype(float), a.astype(float)
    student = forward(p + r, r).sum()
    teacher = forward(p + a + r, r).sum()
    update = 4 * student
    rollout = student
    return (update + rollout + teacher) / (update + rollout), (update + teacher) / update


def run(ctx: Context) -> Result:
    sizes = {"tiny default": 6} if ctx.quick else {"tiny default": 12, "h512 L8": 6}
    figures, details, checks = [], [], []
    for size, steps in sizes.items():
        rows = train_run(ctx, size, steps)["rows"]
        g, r = medians(rows, "grpo"), medians(rows, "rlsd")
        extra = r["step"] - g["step"]
        details.append(f"  teacher_overhead [{size}, grpo/rlsd alternating, {g['steps']}+{r['steps']} steps after 2 warm-up, "
                       "medians, s, grpo/rlsd]: "
                       + " ".join(f"{k} {g[k]:.2f}/{r[k]:.2f}" for k in (*STAGES, "step"))
                       + f"; paired passes over the rlsd batch: teacher {r['probe_teacher']:.2f}, student {r['probe_student']:.2f}")  # fmt: skip
        figures.append(f"{size}: rlsd/grpo {r['step'] / g['step']:.2f} ({r['step']:.2f} s vs {g['step']:.2f} s), "
                       f"teacher stage {r['teacher']:.2f} s")  # fmt: skip
        tag = "" if size == "tiny default" else f"[{size}] "
        checks += [
            Check(f"{tag}(rlsd-grpo)/teacher", extra / r["teacher"], "<=", 1.1),
            Check(f"{tag}teacher/student fwd", r["probe_teacher"] / r["probe_student"], "<=", 1.1),
        ]
    with_rollout, without = paper_projection()
    figures.append(f"paper recipe (Qwen3-8B, FLOPs): rlsd/grpo {with_rollout:.2f} ({without:.2f} without rollout)")
    return Result("teacher_overhead", "; ".join(figures), checks, details)
