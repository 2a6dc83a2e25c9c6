"""The RLSD training loop on Megatron-Core with colocated vLLM rollouts.

One step, top to bottom (`Trainer.train_step`):

    next_prompts -> generate_rollouts (vLLM) -> score_rewards -> compute_advantages
      -> score_student (old log-probs, entropy; forward-only pipeline)
      -> score_teacher (privileged-context log-probs; forward-only, teacher weights swapped in)
      -> token_credit (the loss mode) -> policy_update (fwd+bwd, optimizer step)
      -> teacher.after_update -> sync_weights (Megatron shards -> HF tensors in buckets -> vLLM)

Every rank runs the same code. Rollouts are spread over all ranks (each hosts an engine) and
gathered; each data-parallel rank then trains on its slice of the global batch. What the loss
mode needs (teacher pass, teacher distribution, token credit, loss) it says itself
(algorithms/loss_modes.py); building, checkpoints and metrics are components the trainer is given
or owns (build.py, checkpointer.py, metrics.py).
"""

from __future__ import annotations

import signal

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rlsd.algorithms import MicroBatch, group_advantages, make_loss_mode
from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_logprobs_and_entropy
from megatron_rlsd.build import Components
from megatron_rlsd.checkpointer import COMPLETED_MARKER, STOPPED_MARKER, Checkpointer
from megatron_rlsd.config import Config
from megatron_rlsd.data import EpochSampler
from megatron_rlsd.data.vision import load_image
from megatron_rlsd.fault_injection import FaultInjector
from megatron_rlsd.metrics import Accumulator, MetricsLogger, StageTimer
from megatron_rlsd.models.forward import forward_only, model_device
from megatron_rlsd.optimizer import update
from megatron_rlsd.parallel import all_reduce_scalar
from megatron_rlsd.rewards import score_response
from megatron_rlsd.rollout.samples import Sample, pack, pad_lists, response_logits
from megatron_rlsd.rollout.weight_sync import iter_hf_buckets
from megatron_rlsd.teacher import TeacherWeights
from megatron_rlsd.warm_start import warm_start


def log0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


class Trainer:
    def __init__(self, cfg: Config, components: Components):
        self.cfg, self.c = cfg, components
        a = cfg.algorithm
        self.mode = make_loss_mode(a, cfg.rollout.truncated_is_cap)
        self.sampler = EpochSampler(len(components.rows), seed=cfg.data.seed)
        self.teacher = TeacherWeights(self.module, a.teacher_refresh_interval, a.teacher_ema_rate)
        self.faults = FaultInjector(cfg.test_faults)
        self.checkpointer = Checkpointer(cfg, self.module, components.optimizer, self.teacher, self.faults,
                                         cuda_rng=not components.platform.is_cpu)  # fmt: skip
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.temperature = cfg.rollout.temperature
        self.step = 0  # optimizer steps taken
        self.nonfinite_skipped = 0  # steps whose update was skipped, in total
        self.nonfinite_in_a_row = 0
        self.metrics: MetricsLogger | None = None
        self._stop_signal: int | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self.c.model.module  # this rank's stage inside Megatron's DDP wrapper

    @property
    def owns_metrics(self) -> bool:
        """One rank per data-parallel slice reports what the last stage computed."""
        return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """What a checkpoint must hold besides the model, optimizer, teacher weights and RNG
        states (lambda's schedule and the rollout seeds derive from the step)."""
        return {"step": self.step, "sampler": self.sampler.state_dict(), "teacher": self.teacher.state_dict(),
                "nonfinite_skipped": self.nonfinite_skipped, "nonfinite_in_a_row": self.nonfinite_in_a_row}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.teacher.load_state_dict(state["teacher"])
        self.nonfinite_skipped, self.nonfinite_in_a_row = state["nonfinite_skipped"], state["nonfinite_in_a_row"]

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step, self.state_dict())

    # ----------------------------------------------------------------------------- the loop
    def start(self) -> None:
        """Prepare the output directory, resume (or warm-start a fresh run), give the engines the
        policy's weights, open the logs."""
        self.checkpointer.prepare_output_dir()
        state = self.checkpointer.load()
        if state is not None:
            self.load_state_dict(state)
        elif self.cfg.trainer.warmup_sft_steps:
            warm_start(self.c, self.cfg)
            self.teacher.copy_policy()  # the teacher starts from the warmed-up policy
        self.sync_weights()
        self.metrics = MetricsLogger(self.cfg.trainer.output_dir, self.cfg.trainer.tensorboard, self.step)
        self._catch_stop_signals()

    def run(self) -> None:
        self.start()
        t = self.cfg.trainer
        log0(f"training: steps {self.step + 1}..{t.steps}, loss mode {self.mode.name}, outputs in {t.output_dir}")
        while self.step < t.steps:
            self.metrics.log(self.train_step())
            if self._stop_requested():
                self.save_checkpoint()
                self.checkpointer.write_marker(STOPPED_MARKER, f"stopped by signal at step {self.step}; rerun to resume\n")
                log0(f"stopping on signal {self._stop_signal_name()}: checkpoint saved at step {self.step}")
                return
            if t.save_interval and self.step % t.save_interval == 0 or self.step == t.steps:
                self.save_checkpoint()
        self.checkpointer.write_marker(COMPLETED_MARKER, f"completed {self.step} steps\n")
        log0(f"done: {self.step} steps, outputs in {t.output_dir}")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def _catch_stop_signals(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm's pre-timeout signal) ask for a checkpoint at the end of the
        current step and a clean exit; the step in flight is never interrupted."""

        def request(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request)

    def _stop_requested(self) -> bool:
        # any rank may have been signalled: agree collectively so all ranks stop at the same step
        return all_reduce_scalar(1.0 if self._stop_signal is not None else 0.0, op=dist.ReduceOp.MAX) > 0

    def _stop_signal_name(self) -> str:
        return signal.Signals(self._stop_signal).name if self._stop_signal is not None else "(another rank)"

    def train_step(self) -> dict:
        t = StageTimer()
        with t("rollout"):
            samples, mine = self.generate_rollouts(self.next_prompts())
        return self.learn_from(samples, mine, t)

    def learn_from(self, samples: list[Sample], mine: list[int], t: StageTimer | None = None) -> dict:
        """Everything after the rollouts: rewards, scoring passes, credit, the update, the teacher
        and the weight sync. `mine`: the samples this rank generated. Returns the step's metrics."""
        t, acc = t or StageTimer(), Accumulator()
        with t("reward"):
            self.score_rewards(samples, mine)
            self.compute_advantages(samples)
        batch = self.local_batch(samples)
        with t("student"):
            student = self.score_student(batch, acc)
        with t("teacher"):
            teacher = self.score_teacher(batch, student, acc)
        credit = self.token_credit(batch, student, teacher, acc)
        with t("update"):
            update_metrics = self.policy_update(batch, samples, student, teacher, credit, acc)
        self.step += 1
        self.teacher.after_update(self.step)
        with t("sync"):
            self.sync_weights()
        return self.step_metrics(samples, acc, update_metrics, t.times)

    # ----------------------------------------------------------------------------- stages
    def next_prompts(self):
        return [self.c.rows[i] for i in self.sampler.next_indices(self.cfg.trainer.prompts_per_step)]

    def generate_rollouts(self, rows) -> tuple[list[Sample], list[int]]:
        """Every rank generates an equal share of the G samples per prompt, with per-sample
        seeds (reproducible wherever a sample is generated). Returns all samples, of which this
        rank filled the ones at the returned indices."""
        c, r, g = self.c, self.cfg.rollout, self.cfg.rollout.group_size
        samples, decoded = [], []
        for gi, row in enumerate(rows):
            # student and teacher see the same images, decoded once per prompt for the processor
            # and the engine; the processor's pixels feed Megatron
            decoded.append([load_image(p) for p in row.images])
            sp, vision = c.encoder.encode(c.templates.student_messages(row), decoded[gi])
            tp = c.encoder.encode(c.templates.teacher_messages(row), decoded[gi])[0] if self.mode.teacher_pass else []
            samples += [Sample(row=row, group=gi, student_prompt=sp, teacher_prompt=tp, vision=vision) for _ in range(g)]
        mine = np.array_split(np.arange(len(samples)), dist.get_world_size())[dist.get_rank()].tolist()
        seeds = [hash((self.cfg.trainer.seed, self.step, i)) % (2**31) for i in mine]
        images = [decoded[samples[i].group] for i in mine] if any(decoded) else None
        gens = c.engine.generate(
            [samples[i].student_prompt for i in mine], seeds, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_new_tokens, stop_token_ids=[c.tokenizer.eos_token_id], images=images,
        )  # fmt: skip
        c.engine.sleep()  # GPU: hand the engine's memory to training until the next sync
        for i, gen in zip(mine, gens):
            s = samples[i]
            s.response, s.rollout_logprobs, s.finish_reason = gen.response_ids, gen.logprobs, gen.finish_reason
            s.text = c.tokenizer.decode(gen.response_ids, skip_special_tokens=True)
        return samples, mine

    def score_rewards(self, samples: list[Sample], mine: list[int]) -> None:
        """Verify this rank's responses, then share what every rank filled in with every rank
        (prompts and pixels are already everywhere); the loss mode may then build its own
        teacher prompts from the shared results (SDPO)."""
        for i in mine:
            s = samples[i]
            res = score_response(s.text, s.row.answer, self.cfg.reward)
            s.reward, s.correct, s.format_ok = res.reward, res.correct, res.format_ok
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [(i, [getattr(samples[i], f) for f in Sample.ROLLOUT_FIELDS]) for i in mine])
        for part in gathered:
            for i, values in part:
                for f, v in zip(Sample.ROLLOUT_FIELDS, values):
                    setattr(samples[i], f, v)
        self.mode.teacher_prompts(samples, self.c.templates, self.c.encoder.encode)

    def compute_advantages(self, samples: list[Sample]) -> None:
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        adv = group_advantages(rewards, self.cfg.rollout.group_size, self.cfg.algorithm.adv_eps)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a

    def local_batch(self, samples: list[Sample]) -> list[Sample]:
        """This data-parallel rank's contiguous slice of the global batch."""
        idx = np.array_split(np.arange(len(samples)), ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]
        return [samples[i] for i in idx]

    def _score(self, batch: list[Sample], teacher: bool, keep_logits: bool) -> dict | None:
        """Forward-only over the pipeline: log-probs and entropy of the response tokens [B, R] at
        the rollout temperature (and their vocab-parallel logits when the loss mode needs the
        distribution), on the model's device. Last stage only; None elsewhere."""
        packed = pack(batch, teacher=teacher, pad_id=self.c.tokenizer.pad_token_id)

        def compute(logits, mb):
            rl = response_logits(logits, mb["resp_pos"])
            lp, ent = vocab_parallel_logprobs_and_entropy(rl, mb["resp_ids"], tp_group=self.tp_group, temperature=self.temperature)
            return {"logp": lp, "entropy": ent} | ({"logits": rl} if keep_logits else {})

        outs = forward_only(self.c.model, packed.micro_batches(self.cfg.trainer.micro_batch_size), compute)
        if not outs:
            return None
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]} | {"mask": packed.mask.to(model_device(self.c.model))}

    def score_student(self, batch: list[Sample], acc: Accumulator) -> dict | None:
        student = self._score(batch, teacher=False, keep_logits=False)
        if student is not None and self.owns_metrics:
            mask = student["mask"]
            n = mask.sum()
            roll = pad_lists([s.rollout_logprobs for s in batch], mask.shape[1]).to(mask.device)
            gap = torch.where(mask, (student["logp"] - roll).abs(), 0.0)
            acc.add_mean("entropy", _masked_mean(student["entropy"], mask), n)
            acc.add_mean("train_rollout_logp_diff", _masked_mean(gap, mask), n)
            acc.add_max("train_rollout_logp_maxdiff", gap.max())
        return student

    def score_teacher(self, batch: list[Sample], student: dict | None, acc: Accumulator) -> dict | None:
        if not self.mode.teacher_pass:
            return None
        with self.teacher.swapped_in():
            teacher = self._score(batch, teacher=True, keep_logits=self.mode.teacher_logits)
        if teacher is not None and self.owns_metrics:
            mask = student["mask"]
            acc.add_mean("teacher_student_gap", _masked_mean(teacher["logp"] - student["logp"], mask), mask.sum())
        return teacher

    def token_credit(self, batch, student, teacher, acc: Accumulator) -> torch.Tensor | None:
        """Token advantages [B, R] for the surrogate (None on other stages or without one)."""
        if student is None:
            return None
        adv = torch.tensor([s.advantage for s in batch], dtype=torch.float32, device=student["logp"].device)
        teacher_logp = teacher["logp"] if teacher is not None else student["logp"]
        credit, metrics = self.mode.token_credit(self.step + 1, adv, student["logp"], teacher_logp, student["mask"])
        if self.owns_metrics:
            for k, v in metrics.items():
                acc.add_mean(k, v, student["mask"].sum())
        return credit

    def policy_update(self, batch, samples, student, teacher, credit, acc: Accumulator) -> dict:
        """One optimizer step over this rank's slice (micro-batched through the pipeline)."""
        micro_batches, loss_fn = self.update_inputs(batch, samples, student, teacher, credit)
        reports, result = update(self.c.model, self.c.optimizer, micro_batches, loss_fn)
        if self.owns_metrics:
            for r in reports:
                acc.add("loss", r["loss"])
                for k in ("clip_frac", "dual_clip_frac", "approx_kl", "tis_weight"):
                    if k in r:
                        acc.add_mean("pg_" + k, r[k], r["tokens"])
        self._count_nonfinite(result.applied, result.grad_norm)
        return {"grad_norm": result.grad_norm, "update_ok": result.applied, "nonfinite_skipped": self.nonfinite_skipped}

    def update_inputs(self, batch, samples, student, teacher, credit):
        """The update's micro-batches (host tensors, plus what the last stage computed on the
        device) and its loss function `loss_fn(logits, micro_batch) -> (loss, report)`."""
        packed = pack(batch, teacher=False, pad_id=self.c.tokenizer.pad_token_id)
        width = packed.mask.shape[1]
        extra = {"in_loss": torch.tensor([self.mode.in_loss(s) for s in batch])}
        if student is not None:  # the last stage: what the loss reads
            extra |= {"old_logp": student["logp"], "rollout_logp": pad_lists([s.rollout_logprobs for s in batch], width)}
            if credit is not None:
                extra["credit"] = credit
            if teacher is not None and "logits" in teacher:
                extra["teacher_logits"] = teacher["logits"]
        denominator = self.mode.denominator(samples)
        step = self.step + 1

        def loss_fn(logits, mb):
            rl = response_logits(logits, mb["resp_pos"])
            logp = vocab_parallel_logprobs(rl, mb["resp_ids"], tp_group=self.tp_group, temperature=self.temperature)
            mask = mb["mask"] & mb["in_loss"].unsqueeze(1)
            loss, metrics = self.mode.loss(MicroBatch(
                logits=rl, logp=logp, mask=mask, old_logp=mb["old_logp"], rollout_logp=mb["rollout_logp"],
                credit=mb.get("credit"), teacher_logits=mb.get("teacher_logits"), denominator=denominator,
                tp_group=self.tp_group, temperature=self.temperature,
            ))  # fmt: skip
            loss = self.faults.loss(step, loss)
            return loss, {"loss": loss.detach(), "tokens": mask.sum()} | {k: v.detach() for k, v in metrics.items()}

        return packed.micro_batches(self.cfg.trainer.micro_batch_size, **extra), loss_fn

    def _count_nonfinite(self, applied: bool, grad_norm: float) -> None:
        """Count skipped updates; stop the run after `trainer.max_consecutive_nonfinite` in a row."""
        if applied:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        log0(f"step {self.step + 1}: non-finite gradient norm ({grad_norm}); update skipped "
             f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_skipped} in total)")  # fmt: skip
        if self.nonfinite_in_a_row >= self.cfg.trainer.max_consecutive_nonfinite:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient; stopping. The last good "
                f"checkpoint in {self.checkpointer.root} is intact; lower optim.lr or inspect the data"
            )

    def sync_weights(self) -> None:
        buckets = iter_hf_buckets(self.module, self.c.shape, self.cfg.rollout.weight_bucket_mb << 20)
        self.c.engine.update_weights(buckets)

    # ----------------------------------------------------------------------------- metrics
    def step_metrics(self, samples: list[Sample], acc: Accumulator, update_metrics: dict, times: dict) -> dict:
        """The step's row: batch statistics (every rank has every sample) plus the reduced
        per-rank partials (collective)."""
        m = {
            "step": self.step,
            "lambda": self.mode.lam(self.step),
            "reward": float(np.mean([s.reward for s in samples])),
            "accuracy": float(np.mean([s.correct for s in samples])),
            "format_ok": float(np.mean([s.format_ok for s in samples])),
            "truncated": float(np.mean([s.finish_reason == "length" for s in samples])),
            "response_len": float(np.mean([len(s.response) for s in samples])),
        }
        m |= acc.reduce() | update_metrics
        return m | {f"time_{k}": round(v, 3) for k, v in times.items()}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over `mask` without a host sync (0 for an empty mask)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)
