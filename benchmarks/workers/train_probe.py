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
* every rollout's engine.generate call (prompts, seeds, sampling) is recorded; after training the
  recorded calls of steps 3.. are replayed on the same engines with nothing else running (no
  training, no sync between them; prefix cache reset before each, as a fresh engine would start):
  the engine alone. Rank 0 writes {"alone_s", "alone_tokens", "steps"} to ALONE_JSON.

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

CALLS: list[tuple[int, tuple, dict]] = []
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
                CALLS.append((self.step, (list(prompts), list(seeds)), kw))
                return generate(prompts, seeds, **kw)

            engine.generate, engine._probe_wrapped, engine._probe_generate = recording, True, generate
        return original_rollouts(self, rows)

    Trainer.train_step, Trainer.score_teacher = train_step, score_teacher
    Trainer.learn_from, Trainer.generate_rollouts = learn_from, generate_rollouts

    original_close = Trainer.close

    def close(self):
        original_close(self)
        replay_alone(self)

    Trainer.close = close


def replay_alone(trainer) -> None:
    """The recorded rollouts of steps 3.. again, on the engines alone."""
    engine = trainer.c.engine
    generate = getattr(engine, "_probe_generate", None)
    calls = [c for c in CALLS if c[0] >= WARMUP_STEPS]
    if generate is None or not calls:
        return
    engine._asleep = False  # CPU: sleep() only flags the engine; nothing was released
    tokens, elapsed = 0, 0.0
    for _, (prompts, seeds), kw in calls:
        engine.llm.reset_prefix_cache()
        dist.barrier()
        t0 = time.perf_counter()
        gens = generate(prompts, seeds, **kw)
        dist.barrier()
        elapsed += time.perf_counter() - t0
        tokens += sum(len(g.response_ids) for g in gens)
    per_engine = trainer.cfg.rollout.vllm_tensor_parallel_size
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, tokens if dist.get_rank() % per_engine == 0 else 0)
    if dist.get_rank() == 0:
        Path(ALONE_JSON).write_text(json.dumps({"alone_s": elapsed, "alone_tokens": sum(counts), "steps": len(calls)}))


if __name__ == "__main__":
    ALONE_JSON = sys.argv[1]
    args = sys.argv[2:]
    alternate = "--alternate" in args
    install_probes(alternate)
    sys.exit(train_main.main([a for a in args if a != "--alternate"]))
