"""The RLSD training loop on Megatron-Core with colocated vLLM rollouts.

One step, top to bottom (DESIGN.md "One training step"):

    next_prompts -> generate_rollouts (vLLM) -> score_rewards -> compute_advantages
      -> score_student (old log-probs, entropy; forward-only pipeline)
      -> score_teacher (privileged-context log-probs; forward-only, teacher weights swapped in)
      -> token_credit (loss mode) -> policy_update (fwd+bwd, optimizer) -> refresh_teacher
      -> sync_weights (Megatron shards -> HF tensors in buckets -> vLLM)

Every rank runs the same code. Rollouts are spread over all ranks (each hosts an engine) and
gathered; each data-parallel rank then trains on its slice of the global batch.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rlsd import algorithms as alg
from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_logprobs_and_entropy
from megatron_rlsd.config import Config, to_dict
from megatron_rlsd.data import EpochSampler
from megatron_rlsd.data.templates import user_message
from megatron_rlsd.data.vision import load_image
from megatron_rlsd.models.forward import model_inputs
from megatron_rlsd.rewards import score_response
from megatron_rlsd.rollout.samples import Sample, pack, response_logits


COMPLETED_MARKER = "COMPLETED"
STOPPED_MARKER = "STOPPED"


def log0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


class StageTimer:
    """Wall time per named stage of one step."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class TeacherState:
    """The teacher's weights: a snapshot of the policy, or the live policy when K = 1."""

    snapshot: list[torch.Tensor] | None
    age: int = 0  # optimizer steps since the snapshot was taken


class Trainer:
    def __init__(self, cfg: Config):
        from megatron_rlsd.trainer_setup import setup

        self.cfg = cfg
        s = setup(cfg)
        self.platform, self.model, self.shape, self.optimizer = s.platform, s.model, s.shape, s.optimizer
        self.tokenizer, self.engine, self.rows, self.templates = s.tokenizer, s.engine, s.rows, s.templates
        self.encoder = s.encoder  # chat messages (+ images) -> prompt ids (+ pixels)
        self.sampler = EpochSampler(len(self.rows), seed=cfg.data.seed)
        self.lam = alg.LambdaSchedule(cfg.algorithm.lambda_init, cfg.algorithm.lambda_decay_steps, cfg.algorithm.lambda_warmup_steps)
        self.step = 0
        self.out_dir = Path(cfg.trainer.output_dir)
        self.teacher = TeacherState(self._snapshot())
        self.metrics_file = None
        self.tb = None
        self.nonfinite_skipped = 0  # total steps whose update was skipped
        self.nonfinite_in_a_row = 0
        self._stop_signal: int | None = None

    # ----------------------------------------------------------------------------- plumbing
    @property
    def module(self):
        return self.model.module  # the GPTModel inside Megatron's DDP wrapper

    def _snapshot(self) -> list[torch.Tensor] | None:
        if self.cfg.algorithm.teacher_refresh_interval == 1:
            return None
        return [p.detach().clone() for p in self.module.parameters()]

    @contextmanager
    def teacher_weights(self):
        """Swap the teacher snapshot into the policy modules (no second model object)."""
        if self.teacher.snapshot is None:
            yield
            return
        params = list(self.module.parameters())
        for p, s in zip(params, self.teacher.snapshot):
            p.data, s.data = s.data, p.data
        try:
            yield
        finally:
            for p, s in zip(params, self.teacher.snapshot):
                p.data, s.data = s.data, p.data

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> None:
        from megatron_rlsd.trainer_setup import load_checkpoint, prepare_output_dir, save_checkpoint, warm_start_sft

        self.out_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if dist.get_rank() == 0:
            prepare_output_dir(self)  # markers, unpublished checkpoints, trainer.resume=never
        dist.barrier()
        resumed = load_checkpoint(self)
        if not resumed and self.cfg.trainer.warmup_sft_steps:
            warm_start_sft(self)
        self.sync_weights()
        self._open_logs()
        self._catch_stop_signals()
        cfg = self.cfg.trainer
        while self.step < cfg.steps:
            metrics = self.train_step()
            self._log(metrics)
            if self._stop_requested():
                save_checkpoint(self)
                self._write_marker(STOPPED_MARKER, f"stopped by signal at step {self.step}; rerun to resume\n")
                log0(f"stopping on signal {self._stop_signal_name()}: checkpoint saved at step {self.step}")
                return
            if cfg.save_interval and self.step % cfg.save_interval == 0 or self.step == cfg.steps:
                save_checkpoint(self)
        self._write_marker(COMPLETED_MARKER, f"completed {self.step} steps\n")
        log0(f"done: {self.step} steps, outputs in {self.out_dir}")

    def _write_marker(self, name: str, text: str) -> None:
        """COMPLETED / STOPPED files in the output directory tell launchers (Slurm requeue) how
        the run ended; a new start clears both."""
        if dist.get_rank() == 0:
            (self.out_dir / name).write_text(text)

    def _catch_stop_signals(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm's pre-timeout signal) ask for a checkpoint at the end of the
        current step and a clean exit; the step in flight is never interrupted."""

        def request(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request)

    def _stop_requested(self) -> bool:
        # any rank may have been signalled: agree collectively so all ranks stop at the same step
        flag = torch.tensor([1 if self._stop_signal is not None else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _stop_signal_name(self) -> str:
        return signal.Signals(self._stop_signal).name if self._stop_signal is not None else "(another rank)"

    def train_step(self) -> dict:
        t = StageTimer()
        with t("rollout"):
            samples, mine = self.generate_rollouts(self.next_prompts())
        with t("reward"):
            self.score_rewards(samples, mine)
            self.compute_advantages(samples)
        batch = self.local_batch(samples)
        with t("student"):
            student = self.score_student(batch)
        with t("teacher"):
            teacher = self.score_teacher(batch)
        credit, credit_metrics = self.token_credit(batch, student, teacher)
        with t("update"):
            update_metrics = self.policy_update(batch, samples, student, teacher, credit)
        self.step += 1
        self.refresh_teacher()
        with t("sync"):
            self.sync_weights()
        return self._step_metrics(samples, student, teacher, credit_metrics, update_metrics, t.times)

    # ----------------------------------------------------------------------------- stages
    def next_prompts(self):
        return [self.rows[i] for i in self.sampler.next_indices(self.cfg.trainer.prompts_per_step)]

    def generate_rollouts(self, rows) -> tuple[list[Sample], list[int]]:
        """Every rank generates an equal share of the G samples per prompt, with per-sample
        seeds (reproducible wherever a sample is generated). Returns all samples, of which this
        rank filled the ones at the returned indices."""
        g = self.cfg.rollout.group_size
        samples, decoded = [], []
        for gi, row in enumerate(rows):
            # student and teacher see the same images (decoded once per prompt, for the processor
            # and the engine); the processor's pixels feed Megatron
            decoded.append([load_image(p) for p in row.images])
            sp, vision = self.encoder.encode(self.templates.student_messages(row), decoded[gi])
            tp, _ = self.encoder.encode(self.templates.teacher_messages(row), decoded[gi])
            samples += [Sample(row=row, group=gi, student_prompt=sp, teacher_prompt=tp, vision=vision) for _ in range(g)]
        mine = np.array_split(np.arange(len(samples)), dist.get_world_size())[dist.get_rank()].tolist()
        seeds = [hash((self.cfg.trainer.seed, self.step, i)) % (2**31) for i in mine]
        r = self.cfg.rollout
        images = [decoded[samples[i].group] for i in mine] if any(decoded) else None
        gens = self.engine.generate(
            [samples[i].student_prompt for i in mine], seeds, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_new_tokens, stop_token_ids=[self.tokenizer.eos_token_id], images=images,
        )  # fmt: skip
        self.engine.sleep()  # GPU: hand the KV cache's memory to training until the next sync
        for i, gen in zip(mine, gens):
            s = samples[i]
            s.response, s.rollout_logprobs, s.finish_reason = gen.response_ids, gen.logprobs, gen.finish_reason
            s.text = self.tokenizer.decode(gen.response_ids, skip_special_tokens=True)
        return samples, mine

    def score_rewards(self, samples: list[Sample], mine: list[int]) -> None:
        """Verify this rank's responses, then share every sample with every rank (sdpo also
        builds its sibling-solution teacher prompts from the shared results)."""
        for i in mine:
            s = samples[i]
            res = score_response(s.text, s.row.answer, self.cfg.reward)
            s.reward, s.correct, s.reward_reason = res.reward, res.correct, res.reason
        # only what this rank filled in travels (prompts and pixels are already everywhere)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [(i, [getattr(samples[i], f) for f in Sample.ROLLOUT_FIELDS]) for i in mine])
        for part in gathered:
            for i, values in part:
                for f, v in zip(Sample.ROLLOUT_FIELDS, values):
                    setattr(samples[i], f, v)
        if self.cfg.algorithm.loss_mode == "sdpo":
            self._sdpo_teacher_prompts(samples)

    def compute_advantages(self, samples: list[Sample]) -> None:
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        adv = alg.group_advantages(rewards, self.cfg.rollout.group_size, self.cfg.algorithm.adv_eps)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a

    def local_batch(self, samples: list[Sample]) -> list[Sample]:
        """This data-parallel rank's contiguous slice of the global batch."""
        idx = np.array_split(np.arange(len(samples)), ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]
        return [samples[i] for i in idx]

    def _forward_scores(self, batch: list[Sample], teacher: bool, keep_logits: bool) -> dict | None:
        """Forward-only over the pipeline: per-token log-probs and entropy of the responses
        [B, R] (and their vocab-parallel logits when a divergence loss needs them). Last stage
        only; None elsewhere."""
        from megatron_rlsd.models.forward import forward_only

        packed = pack(batch, teacher=teacher, pad_id=self.tokenizer.pad_token_id)
        tp_group = ps.get_tensor_model_parallel_group()

        def compute(logits, mb):
            rl = response_logits(logits, mb["resp_pos"])
            lp, ent = vocab_parallel_logprobs_and_entropy(rl, mb["resp_ids"], tp_group=tp_group)
            out = {"logp": lp, "entropy": ent}
            if keep_logits:
                out["logits"] = rl.clone()
            return out

        self.model.eval()
        outs = forward_only(self.model, packed.micro_batches(self.cfg.trainer.micro_batch_size), compute)
        self.model.train()
        if not outs:
            return None
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]} | {"mask": packed.mask}

    def score_student(self, batch):
        return self._forward_scores(batch, teacher=False, keep_logits=False)

    def score_teacher(self, batch):
        needs_logits = self.cfg.algorithm.loss_mode in ("opsd", "grpo_opsd", "sdpo")
        if self.cfg.algorithm.loss_mode == "grpo":
            return None  # GRPO has no teacher
        with self.teacher_weights():
            return self._forward_scores(batch, teacher=True, keep_logits=needs_logits)

    def token_credit(self, batch, student, teacher) -> tuple[torch.Tensor | None, dict]:
        """Token advantages [B, R] for the surrogate (None on non-last stages or pure distillation)."""
        mode = self.cfg.algorithm.loss_mode
        if student is None or mode in ("opsd", "sdpo"):
            return None, {}
        adv = torch.tensor([s.advantage for s in batch], dtype=torch.float32)
        if mode in ("grpo", "grpo_opsd"):
            return adv.unsqueeze(1).expand_as(student["logp"]).clone(), {}
        a = self.cfg.algorithm
        lam = self.lam.value(self.step)
        credit = alg.rlsd_token_advantages(adv, student["logp"], teacher["logp"], lam, a.eps_w)
        low, high = alg.rlsd_clip_fractions(adv, student["logp"], teacher["logp"], student["mask"], a.eps_w)
        return credit, {"clip_low": low.item(), "clip_high": high.item()}

    def policy_update(self, batch, samples, student, teacher, credit) -> dict:
        """One optimizer step over this rank's slice (micro-batched through the pipeline)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        a, mode = self.cfg.algorithm, self.cfg.algorithm.loss_mode
        tp_group = ps.get_tensor_model_parallel_group()
        packed = pack(batch, teacher=False, pad_id=self.tokenizer.pad_token_id)
        b = packed.tokens.shape[0]
        extra = {"adv_seq": torch.tensor([s.advantage for s in batch], dtype=torch.float32),
                 "rollout_logp": _pad_lists([s.rollout_logprobs for s in batch], packed.mask.shape[1]),
                 "teacher_valid": torch.tensor([s.teacher_valid for s in batch])}  # fmt: skip
        if student is not None:
            extra["old_logp"] = student["logp"]
            extra["credit"] = credit if credit is not None else torch.zeros(b, packed.mask.shape[1])
            if teacher is not None and "logits" in teacher:
                extra["teacher_logits"] = teacher["logits"]
        mbs = packed.micro_batches(self.cfg.trainer.micro_batch_size, **extra)
        denominator = self._loss_denominator(samples)
        injected_nan_steps = {int(x) for x in self.cfg.trainer.inject_nan_at_steps.split(",") if x.strip()}
        scale = len(mbs) * ps.get_data_parallel_world_size()  # undo Megatron's mean over both

        def loss_fn(mb, logits):
            rl = response_logits(logits, mb["resp_pos"])
            logp = vocab_parallel_logprobs(rl, mb["resp_ids"], tp_group=tp_group)
            mask = mb["mask"]
            loss = torch.zeros((), dtype=torch.float32)
            metrics = {}
            if mode in ("rlsd", "grpo", "grpo_opsd"):
                tis = None
                if self.cfg.rollout.truncated_is_cap > 0:
                    tis = alg.truncated_is_weights(mb["old_logp"], mb["rollout_logp"], self.cfg.rollout.truncated_is_cap)
                pg, metrics = alg.policy_loss(
                    logp, mb["old_logp"], mb["credit"], mask, eps_low=a.eps_low, eps_high=a.eps_high,
                    dual_clip=a.dual_clip or None, agg=a.loss_agg, denominator=denominator, is_weights=tis,
                )  # fmt: skip
                loss = loss + pg
            if mode in ("opsd", "grpo_opsd"):
                div = alg.opsd_token_divergence(rl, mb["teacher_logits"], divergence=a.opsd_divergence, beta=a.opsd_beta, tp_group=tp_group)
                weight = a.grpo_opsd_alpha if mode == "grpo_opsd" else 1.0
                loss = loss + weight * alg.aggregate(div, mask, a.loss_agg, denominator)
            if mode == "sdpo":
                div = alg.sdpo_token_divergence(rl, mb["teacher_logits"], topk=a.sdpo_topk, beta=a.opsd_beta, tp_group=tp_group)
                loss = loss + alg.aggregate(div, mask & mb["teacher_valid"].unsqueeze(1), a.loss_agg, denominator)
            if self.step + 1 in injected_nan_steps:
                loss = loss * float("nan")
            report = {"loss": loss.detach()} | {k: v.detach() for k, v in metrics.items()}
            return loss * scale, report

        def step_fn(data_iterator, model):
            mb = next(data_iterator)
            args, kwargs = model_inputs(mb)
            return model(*args, **kwargs), lambda logits: loss_fn(mb, logits)

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iter(mbs), model=[self.model], num_microbatches=len(mbs),
            seq_length=packed.tokens.shape[1], micro_batch_size=self.cfg.trainer.micro_batch_size, forward_only=False,
        )  # fmt: skip
        ok, grad_norm = self._guarded_optimizer_step()
        out = {"grad_norm": grad_norm, "update_ok": ok, "nonfinite_skipped": self.nonfinite_skipped}
        if reports:
            out["loss"] = sum(r["loss"].item() for r in reports)
            for k in ("clip_frac", "dual_clip_frac", "approx_kl"):
                if k in reports[0]:
                    out["pg_" + k] = float(np.mean([r[k].item() for r in reports]))
        return out

    def _guarded_optimizer_step(self) -> tuple[bool, float]:
        """Step unless the gradient norm is not finite (a NaN/inf loss makes it so); count skips
        and stop the run after `trainer.max_consecutive_nonfinite` in a row."""
        if self.optimizer.prepare_grads():  # fp16 loss-scale overflow
            grad_norm = float("inf")
        else:
            grad_norm = float(self.optimizer.get_grad_norm())  # all-reduced: every rank agrees
        if math.isfinite(grad_norm):
            self.nonfinite_in_a_row = 0
            ok, grad_norm, _ = self.optimizer.step()
            return bool(ok), float(grad_norm)
        self.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        log0(f"step {self.step + 1}: non-finite gradient norm ({grad_norm}); update skipped "
             f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_skipped} in total)")  # fmt: skip
        if self.nonfinite_in_a_row >= self.cfg.trainer.max_consecutive_nonfinite:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient; stopping. "
                f"The last good checkpoint in {self.out_dir / 'checkpoints'} is intact; lower optim.lr or inspect the data"
            )
        return False, grad_norm

    def _loss_denominator(self, samples: list[Sample]) -> float:
        """Global count of response tokens (token_mean) or sequences, over all DP ranks."""
        if self.cfg.algorithm.loss_agg == "token_mean":
            return float(max(1, sum(len(s.response) for s in samples)))
        return float(max(1, sum(1 for s in samples if s.response)))

    def refresh_teacher(self) -> None:
        k = self.cfg.algorithm.teacher_refresh_interval
        self.teacher.age += 1
        if k > 1 and self.step % k == 0:
            for s, p in zip(self.teacher.snapshot, self.module.parameters()):
                s.copy_(p.detach())
            self.teacher.age = 0

    def sync_weights(self) -> None:
        from megatron_rlsd.rollout.weight_sync import iter_hf_buckets

        self.engine.wake_up()
        for bucket in iter_hf_buckets(self.module, self.shape, self.cfg.rollout.weight_bucket_mb << 20):
            self.engine.load_bucket(bucket)
        self.engine.finish_weight_update()

    # ----------------------------------------------------------------------------- sdpo
    def _sdpo_teacher_prompts(self, samples: list[Sample]) -> None:
        """SDPO's privileged context: a successful sibling ("Correct solution: ..."); groups
        without one are masked out of the loss."""
        by_group: dict[int, list[Sample]] = {}
        for s in samples:
            by_group.setdefault(s.group, []).append(s)
        for group in by_group.values():
            for s in group:
                others = [o for o in group if o.correct and o is not s]
                s.teacher_valid = bool(others)
                if others:
                    best = min(others, key=lambda o: len(o.response))
                    text = f"{s.row.problem}\n\nCorrect solution:\n\n{best.text}\n\nCorrectly solve the original question."
                    s.teacher_prompt, _ = self.encoder.encode([user_message(text, s.row.images)], s.row.images)

    # ----------------------------------------------------------------------------- metrics
    def _step_metrics(self, samples, student, teacher, credit_metrics, update_metrics, times) -> dict:
        m = {
            "step": self.step,
            "lambda": self.lam.value(self.step - 1) if self.cfg.algorithm.loss_mode == "rlsd" else 0.0,
            "reward": float(np.mean([s.reward for s in samples])),
            "accuracy": float(np.mean([s.correct for s in samples])),
            "response_len": float(np.mean([len(s.response) for s in samples])),
        }
        local = {}
        if student is not None:
            mask = student["mask"]
            n = mask.sum().clamp(min=1)
            local["entropy"] = (student["entropy"] * mask).sum().item() / n.item()
            old = student["logp"][mask]
            roll = _pad_lists([s.rollout_logprobs for s in self.local_batch(samples)], mask.shape[1])[mask]
            local["train_rollout_logp_diff"] = (old - roll).abs().mean().item() if old.numel() else 0.0
            local["train_rollout_logp_maxdiff"] = (old - roll).abs().max().item() if old.numel() else 0.0
            if teacher is not None:
                local["teacher_student_gap"] = ((teacher["logp"] - student["logp"]) * mask).sum().item() / n.item()
        local |= credit_metrics | update_metrics
        # the last pipeline stage's TP rank 0 of DP rank 0 owns these; share them with everyone
        owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local if owner else None)
        m |= next(e for e in everyone if e is not None)
        m |= {f"time_{k}": round(v, 3) for k, v in times.items()}
        return m

    def _open_logs(self) -> None:
        """Metrics continue from the resumed step: rows a killed run logged after its last
        checkpoint are dropped (they are redone), and TensorBoard purges them likewise."""
        if dist.get_rank() != 0:
            return
        path = self.out_dir / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _metrics_step(line) <= self.step]
            path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
            path.with_suffix(".tmp").replace(path)
        self.metrics_file = open(path, "a")
        (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=1))
        if self.cfg.trainer.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step + 1)

    def _log(self, m: dict) -> None:
        if dist.get_rank() != 0:
            return
        times = " ".join(f"{k[5:]}={v:.1f}s" for k, v in m.items() if k.startswith("time_"))
        print(
            f"step {m['step']:4d} | reward {m['reward']:.3f} acc {m['accuracy']:.3f} | "
            f"entropy {m.get('entropy', float('nan')):.3f} | clip lo/hi {m.get('clip_low', 0):.3f}/{m.get('clip_high', 0):.3f} | "
            f"lambda {m['lambda']:.3f} | T-S gap {m.get('teacher_student_gap', float('nan')):+.3f} | "
            f"len {m['response_len']:.1f} | loss {m.get('loss', float('nan')):+.4f} gnorm {m.get('grad_norm', float('nan')):.3f} | {times}",
            flush=True,
        )  # fmt: skip
        self.metrics_file.write(json.dumps(m) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, m["step"])
            self.tb.flush()


def _metrics_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill


def _pad_lists(values: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(values), width, dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v[:width], dtype=torch.float32)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
