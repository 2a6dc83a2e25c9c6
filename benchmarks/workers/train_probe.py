"""torchrun worker: the real trainer (megatron_rlsd.train's start-up, build and Trainer.run) with
probes added, none of which changes what a step computes or how its stages are timed:

* `--alternate`: the step's loss mode alternates between `grpo` (odd steps) and the configured
  mode (even steps), same config, seed and batch pipeline, so that the two are measured side by
  side under the same machine load (`probe_mode` in each metrics row);
* after each step of a mode with a teacher pass, its teacher pass (`Trainer.score_teacher`) and a
  forward-only student pass (`Trainer.score_student`) over the same batch, back to back between
  barriers, in alternating order: `probe_teacher_s`, `probe_student_s`;
* every rank's stage times: `probe_rank_times` (rank 0's are the `time_<stage>` metrics; a rank
  that finishes its rollouts early waits in the next stage's collective);
* the engine alone: from step 3 on, the step's engine.generate calls (prompts, seeds, sampling)
  are replayed on the same engine right after the rollout stage, between barriers, with nothing
  else running (no training, no sync; prefix cache reset first, as after a sync), so that the
  colocated and the alone figures are taken under the same machine load, step by step. The
  replay runs outside every stage timer, before the sync, and its results are dropped: the step
  computes what it would without it.
  Rank 0 writes {"alone_s", "alone_tokens", "steps", "per_step_s"} to ALONE_JSON at the end.

    torchrun --nproc-per-node 4 benchmarks/workers/train_probe.py ALONE_JSON [--alternate] --config CFG [overrides]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from megatron_rlsd import train as train_main  # noqa: E402
from megatron_rlsd import trainer as trainer_module  # noqa: E402

ALONE = {"s": 0.0, "tokens": 0, "steps": 0, "per_step_s": []}  # the replays, this rank
WARMUP_STEPS = 2  # steps 1-2 (one of each mode when alternating) pay one-time costs


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def install_probes(alternate: bool) -> None:
    Trainer = trainer_module.Trainer
    original_step, original_teacher = Trainer.train_step, Trainer.score_teacher
    original_learn, original_rollouts = Trainer.learn_from, Trainer.generate_rollouts

    def train_step(self):
        if not hasattr(self, "_probe_modes"):
            from megatron_rlsd.algorithms.loss_modes import make_loss_mode

            grpo = make_loss_mode(dataclasses.replace(self.cfg.algorithm, loss_mode="grpo"), self.cfg.rollout.truncated_is_cap)
            self._probe_modes = (grpo, self.mode) if alternate else (self.mode, self.mode)
        self.mode = self._probe_modes[self.step % 2 == 1]  # steps counted from 1: odd grpo, even configured
        return original_step(self)

    def score_teacher(self, batch):
        self._probe_batch = batch
        return original_teacher(self, batch)

    def learn_from(self, samples, mine, t=None):
        if self.step >= WARMUP_STEPS:
            replay_alone(self)  # outside every stage timer, before the sync changes the weights
        metrics = original_learn(self, samples, mine, t)
        extra = {"probe_mode": self.mode.name}
        if self.mode.teacher_pass:
            batch = self._probe_batch
            passes = [("teacher", lambda: original_teacher(self, batch)), ("student", lambda: self.score_student(batch))]
            if self.step % 4 == 0:
                passes.reverse()
            for name, fn in passes:
                extra[f"probe_{name}_s"] = round(_timed(fn), 4)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {k: round(v, 3) for k, v in (t.times if t is not None else {}).items()})
        return metrics | extra | {"probe_rank_times": per_rank}

    def generate_rollouts(self, rows):
        engine = self.c.engine
        if not getattr(engine, "_probe_wrapped", False):
            generate = engine.generate

            def recording(prompts, seeds, **kw):
                self._probe_calls.append((list(prompts), list(seeds), kw))
                return generate(prompts, seeds, **kw)

            engine.generate, engine._probe_wrapped, engine._probe_generate = recording, True, generate
        self._probe_calls = []
        return original_rollouts(self, rows)

    Trainer.train_step, Trainer.score_teacher = train_step, score_teacher
    Trainer.learn_from, Trainer.generate_rollouts = learn_from, generate_rollouts

    original_close = Trainer.close

    def close(self):
        write_alone(self)
        original_close(self)

    Trainer.close = close


def replay_alone(trainer) -> None:
    """This step's generate calls again, on the engine alone (see the module docstring)."""
    engine = trainer.c.engine
    asleep, engine._asleep = engine._asleep, False  # CPU: sleep() only flags the engine
    s0 = ALONE["s"]
    for prompts, seeds, kw in trainer._probe_calls:
        engine.llm.reset_prefix_cache()
        dist.barrier()
        t0 = time.perf_counter()
        gens = engine._probe_generate(prompts, seeds, **kw)
        dist.barrier()
        ALONE["s"] += time.perf_counter() - t0
        ALONE["tokens"] += sum(len(g.response_ids) for g in gens)
    ALONE["steps"] += 1
    ALONE["per_step_s"].append(ALONE["s"] - s0)
    engine._asleep = asleep


def write_alone(trainer) -> None:
    """Every engine's replayed tokens and the slowest rank's replay time, on rank 0."""
    per_engine = trainer.cfg.rollout.vllm_tensor_parallel_size
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, ALONE["tokens"] if dist.get_rank() % per_engine == 0 else 0)
    if dist.get_rank() == 0 and ALONE["steps"]:
        Path(ALONE_JSON).write_text(json.dumps({"alone_s": ALONE["s"], "alone_tokens": sum(counts), "steps": ALONE["steps"],
                                                "per_step_s": ALONE["per_step_s"]}))  # fmt: skip


if __name__ == "__main__":
    ALONE_JSON = sys.argv[1]
    args = sys.argv[2:]
    alternate = "--alternate" in args
    install_probes(alternate)
    sys.exit(train_main.main([a for a in args if a != "--alternate"]))
