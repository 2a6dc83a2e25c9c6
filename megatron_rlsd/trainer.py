"""The RLSD training loop on Megatron-Core with colocated vLLM rollouts.

One step, top to bottom (`Trainer.train_step`):

    next_prompts -> generate_rollouts (vLLM) -> score_rewards -> compute_advantages
      -> score_teacher (privileged-context log-probs; forward-only, teacher weights swapped in)
      -> policy_update (fwd+bwd: the student's log-probs, the loss mode's token credit and loss;
                        one optimizer step per mini-batch)
      -> teacher.after_update -> sync_weights (Megatron shards -> HF tensors in buckets -> vLLM)

With one optimizer step per rollout batch (the paper's setting) the old log-probs are the current
ones: they come, detached, from the update's own forward, and RLSD costs GRPO plus exactly one
forward, the teacher's. A separate student pass (score_student) runs only for several
mini-batches per step (PPO-style), where the policy moves between them.

Every rank runs the same code. Rollouts are spread over the engines (each spans
rollout.vllm_tensor_parallel_size ranks) and gathered; each data-parallel rank then trains on its
slice of the global batch. What the loss
mode needs (teacher pass, teacher distribution, token credit, loss) it says itself
(algorithms/loss_modes.py); building, checkpoints and metrics are components the trainer is given
or owns (build.py, checkpointer.py, metrics.py).
"""

from __future__ import annotations

import math
import signal

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rlsd.algorithms import MicroBatch, group_advantages, make_loss_mode
from megatron_rlsd.algorithms.losses import TeacherTopk, teacher_topk
from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_logprobs_and_entropy
from megatron_rlsd.build import Components
from megatron_rlsd.checkpointer import COMPLETED_MARKER, STOPPED_MARKER, Checkpointer
from megatron_rlsd.config import Config
from megatron_rlsd.data import EpochSampler
from megatron_rlsd.data.vision import load_image
from megatron_rlsd.fault_injection import FaultInjector
from megatron_rlsd.leakage import LeakageDetector
from megatron_rlsd.metrics import Accumulator, MetricsLogger, StageTimer
from megatron_rlsd.models.forward import forward_only
from megatron_rlsd.offload import Offloader
from megatron_rlsd.optimizer import update
from megatron_rlsd.parallel import all_reduce_scalar
from megatron_rlsd.rewards import score_response
from megatron_rlsd.rollout.samples import (
    Sample,
    gather_rows,
    micro_batches,
    pad_lists,
    padding_efficiency,
    plan_micro_batches,
)
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
        self.teacher = TeacherWeights(self.module, a.teacher_refresh_interval, a.teacher_ema_rate,
                                      on_host=cfg.offload.teacher)  # fmt: skip
        self.offloader = Offloader(cfg.offload, components.model, components.optimizer)
        self.faults = FaultInjector(cfg.test_faults)
        self.leakage = LeakageDetector(cfg.trainer.leakage_patterns)
        self.checkpointer = Checkpointer(cfg, self.module, components.optimizer, self.teacher, self.faults,
                                         cuda_rng=not components.platform.is_cpu)  # fmt: skip
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
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
                "nonfinite_skipped": self.nonfinite_skipped, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "loss_mode": self.mode.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.teacher.load_state_dict(state["teacher"])
        self.nonfinite_skipped, self.nonfinite_in_a_row = state["nonfinite_skipped"], state["nonfinite_in_a_row"]
        self.mode.load_state_dict(state.get("loss_mode", {}))

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
        """Everything after the rollouts: rewards, the teacher pass, the update(s), the teacher's
        refresh and the weight sync. `mine`: the samples this rank generated. Returns the step's
        metrics."""
        t, acc = t or StageTimer(), Accumulator()
        self.offloader.for_training()
        with t("reward"):
            self.score_rewards(samples, mine)
            self.compute_advantages(samples)
        batch = self.local_batch(samples)
        with t("teacher"):
            teacher = self.score_teacher(batch)
            if self.mode.entropy_gate:
                self.mode.begin_step(self.teacher_entropy_median(batch, teacher))
        with t("update"):
            update_metrics = self.policy_update(batch, samples, teacher, acc)
        self.step += 1
        self.teacher.after_update(self.step)
        self.offloader.for_rollout()
        with t("sync"):
            self.sync_weights()
        evaluated = {}
        if self.cfg.trainer.eval_interval and self.step % self.cfg.trainer.eval_interval == 0:
            with t("eval"):
                evaluated = self.evaluate()
        return self.step_metrics(samples, acc, update_metrics | evaluated, t.times)

    # ----------------------------------------------------------------------------- stages
    def next_prompts(self):
        return [self.c.rows[i] for i in self.sampler.next_indices(self.cfg.trainer.prompts_per_step)]

    def generate_rollouts(self, rows) -> tuple[list[Sample], list[int]]:
        """Every engine generates an equal share of the G samples per prompt, with per-sample
        seeds (reproducible wherever a sample is generated). An engine spans
        rollout.vllm_tensor_parallel_size consecutive ranks, which all send it the same requests
        and all receive the results. Returns all samples, and the indices of those this rank
        reports (one rank per engine: the group's first)."""
        c, r, g = self.c, self.cfg.rollout, self.cfg.rollout.group_size
        samples, decoded = [], []
        for gi, row in enumerate(rows):
            # student and teacher see the same images, decoded once per prompt for the processor
            # and the engine; the processor's pixels feed Megatron
            decoded.append([load_image(p) for p in row.images])
            sp, vision = c.encoder.encode(c.templates.student_messages(row), decoded[gi])
            tp = []
            if self.mode.teacher_pass:
                tp = c.encoder.encode(c.templates.teacher_messages(row, self.mode.privileged_context(row)), decoded[gi])[0]
            samples += [Sample(row=row, group=gi, student_prompt=sp, teacher_prompt=tp, vision=vision) for _ in range(g)]
        per_engine = r.vllm_tensor_parallel_size
        engine, leader = divmod(dist.get_rank(), per_engine)
        mine = np.array_split(np.arange(len(samples)), dist.get_world_size() // per_engine)[engine].tolist()
        seeds = [hash((self.cfg.trainer.seed, self.step, i)) % (2**31) for i in mine]
        images = [decoded[samples[i].group] for i in mine] if any(decoded) else None
        gens = c.engine.generate(
            [samples[i].student_prompt for i in mine], seeds, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_new_tokens, stop_token_ids=[c.tokenizer.eos_token_id], images=images,
        )  # fmt: skip
        c.engine.sleep()  # GPU: hand the engine's memory to training until the next sync
        if leader:  # the engine's other ranks got the same results; its first rank reports them
            return samples, []
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

    def local_batch(self, samples: list[Sample], dp_rank: int | None = None) -> list[Sample]:
        """A data-parallel rank's contiguous slice of the global batch (default: this rank's)."""
        dp_rank = ps.get_data_parallel_rank() if dp_rank is None else dp_rank
        return [samples[i] for i in np.array_split(np.arange(len(samples)), ps.get_data_parallel_world_size())[dp_rank]]

    def _groups(self, batch: list[Sample], teacher: bool) -> list[list[int]]:
        """Micro-batches of `batch` (sample indices): trainer.micro_batch_size rows, or a token
        budget (trainer.max_tokens_per_microbatch) over the prompt + response lengths."""
        t = self.cfg.trainer
        lengths = [len(s.teacher_prompt if teacher else s.student_prompt) + len(s.response) for s in batch]
        return plan_micro_batches(lengths, t.micro_batch_size, t.max_tokens_per_microbatch)

    def _forward_scores(self, batch: list[Sample], teacher: bool, compute) -> dict | None:
        """Forward-only over the pipeline; `compute(logits [b, R, V/tp], mb) -> {name: [b, R, ...]}`
        on the last stage, gathered back in sample order ([B, R, ...] on the model's device; None
        on other stages)."""
        groups = self._groups(batch, teacher)
        mbs = micro_batches(batch, groups, teacher=teacher, pad_id=self.c.tokenizer.pad_token_id)

        outs = forward_only(self.c.model, mbs, compute)  # logits of the response positions only
        if not outs:
            return None
        return {k: gather_rows([o[k] for o in outs], groups, len(batch)) for k in outs[0]}

    def _logprobs(self, rl: torch.Tensor, mb: dict) -> torch.Tensor:
        return vocab_parallel_logprobs(rl, mb["resp_ids"], tp_group=self.tp_group, temperature=self.temperature)

    def score_student(self, batch: list[Sample]) -> dict | None:
        """The old policy's log-probs of the response tokens, before any update of this step
        (needed only with several mini-batches per step)."""
        return self._forward_scores(batch, teacher=False, compute=lambda rl, mb: {"logp": self._logprobs(rl, mb)})

    def score_teacher(self, batch: list[Sample]) -> dict | None:
        """The teacher's log-probs of the response tokens (privileged prompt, teacher weights), and
        its distribution's top-k (or its logits with algorithm.distill_topk=0) when the loss mode
        distils it: computed per micro-batch, the batch's vocabulary is never held at once."""
        if not self.mode.teacher_pass:
            return None
        k = self.cfg.algorithm.distill_topk

        def compute(rl, mb):
            if self.mode.teacher_entropy:
                logp, entropy = vocab_parallel_logprobs_and_entropy(rl, mb["resp_ids"], tp_group=self.tp_group,
                                                                    temperature=self.temperature)  # fmt: skip
                out = {"logp": logp, "entropy": entropy}
            else:
                out = {"logp": self._logprobs(rl, mb)}
            if self.mode.teacher_logits and k:
                top = teacher_topk(rl, k, tp_group=self.tp_group, temperature=self.temperature)
                out |= {"topk_ids": top.ids, "topk_logp": top.logp} | ({"topk_tail": top.tail} if top.tail is not None else {})
            elif self.mode.teacher_logits:
                out["logits"] = rl
            return out

        with self.teacher.swapped_in():
            return self._forward_scores(batch, teacher=True, compute=compute)

    def teacher_entropy_median(self, batch: list[Sample], teacher: dict | None) -> float:
        """The median of the teacher's entropy over every response token of the global batch, on
        every rank (collectives: the last stage's data-parallel group gathers its ranks' tokens on
        the model's device; then a world max on the backend's device hands the value to every
        stage)."""
        value = -math.inf
        if teacher is not None:  # the last pipeline stage
            lengths = torch.tensor([len(s.response) for s in batch], device=teacher["entropy"].device)
            valid = torch.arange(teacher["entropy"].shape[1], device=lengths.device) < lengths.unsqueeze(1)
            mine = teacher["entropy"][valid].double()
            group = ps.get_data_parallel_group()
            width = int(all_reduce_scalar(mine.numel(), dist.ReduceOp.MAX))
            padded = torch.full((max(1, width),), math.nan, dtype=torch.float64, device=mine.device)
            padded[: mine.numel()] = mine
            parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, padded, group=group)
            everyone = torch.cat(parts)
            everyone = everyone[~everyone.isnan()]
            # quantile(0.5) averages the two middle values (torch.median would take the lower one)
            value = float(everyone.quantile(0.5)) if everyone.numel() else 0.0
        else:
            all_reduce_scalar(0, dist.ReduceOp.MAX)  # the last stage's width reduction
        return all_reduce_scalar(value, dist.ReduceOp.MAX)

    def mini_batches(self, batch: list[Sample]) -> list[list[int]]:
        """A rank's slice split into trainer.mini_batches_per_step optimizer steps."""
        return [part.tolist() for part in np.array_split(np.arange(len(batch)), self.cfg.trainer.mini_batches_per_step)]

    def policy_update(self, batch: list[Sample], samples: list[Sample], teacher: dict | None, acc: Accumulator) -> dict:
        """The optimizer step(s) over this rank's slice, micro-batched through the pipeline."""
        minis = self.mini_batches(batch)
        old = self.score_student(batch) if len(minis) > 1 else None  # else: from the update's own forward
        slices = [self.local_batch(samples, dp_rank) for dp_rank in range(ps.get_data_parallel_world_size())]
        interval = self.cfg.trainer.dump_credit_interval
        captured = [] if interval and (self.step + 1) % interval == 0 else None  # credit of the first mini-batch
        norms, applied = [], []
        for j, rows in enumerate(minis):
            # the normalisation counts the j-th mini-batch of every data-parallel rank
            everyone = [sl[i] for sl in slices for i in self.mini_batches(sl)[j]]
            mbs, loss_fn = self.update_inputs([batch[i] for i in rows], self.mode.denominator(everyone), _pick(old, rows),
                                              _pick(teacher, rows), acc, capture=captured if j == 0 else None)  # fmt: skip
            reports, result = update(self.c.model, self.c.optimizer, mbs, loss_fn)
            if self.owns_metrics:
                for r in reports:
                    acc.add("loss", r.pop("loss") / len(minis))
                    acc.add_max("train_rollout_logp_maxdiff", r.pop("logp_maxdiff"))
                    tokens = r.pop("tokens")
                    for k, v in r.items():
                        acc.add_mean(k, v, tokens)
            self._count_nonfinite(result.applied, result.grad_norm)
            norms.append(result.grad_norm)
            applied.append(result.applied)
        if captured is not None:
            self.dump_credit([batch[i] for i in minis[0]], captured)
        return {"grad_norm": float(np.mean(norms)), "update_ok": all(applied), "nonfinite_skipped": self.nonfinite_skipped}

    def dump_credit(self, batch: list[Sample], captured: list) -> None:
        """Collective: a few samples' per-token credit and Delta (what the loss used) written by
        rank 0 to OUTPUT/credit/step_N.jsonl, for tools/credit_heatmap.py."""
        from megatron_rlsd.credit_dump import credit_dump_path, credit_rows, write_credit_dump

        rows = []
        if captured and self.owns_metrics:
            groups = [mb_rows.tolist() for mb_rows, *_ in captured]
            credit, delta, mask = (gather_rows([c[k] for c in captured], groups, len(batch)) if captured[0][k] is not None
                                   else None for k in (1, 2, 3))  # fmt: skip
            rows = credit_rows(self.step + 1, batch, credit, delta, mask, self.c.tokenizer, self.cfg.trainer.dump_credit_samples)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, rows)
        rows = [row for part in everyone for row in part]
        if dist.get_rank() == 0 and rows:
            write_credit_dump(credit_dump_path(self.cfg.trainer.output_dir, self.step + 1), rows)

    def update_inputs(self, batch: list[Sample], denominator: float, old: dict | None, teacher: dict | None,
                      acc: Accumulator, capture: list | None = None):  # fmt: skip
        """One optimizer step's micro-batches (host tensors, plus what the last stage computed on
        the device) and its loss function `loss_fn(logits, micro_batch) -> (loss, report)`.
        `capture`: receives each micro-batch's (rows, credit, Delta, mask) for a credit dump."""
        groups = self._groups(batch, teacher=False)
        useful, computed = padding_efficiency(batch, groups)
        acc.add_mean("padding_efficiency", useful / computed, computed)
        width = max(1, max(len(s.response) for s in batch))
        extra = {"in_loss": torch.tensor([self.mode.in_loss(s) for s in batch]),
                 "adv": torch.tensor([s.advantage for s in batch], dtype=torch.float32),
                 "correct": torch.tensor([s.correct for s in batch]),
                 "rollout_logp": pad_lists([s.rollout_logprobs for s in batch], width)}  # fmt: skip
        extra |= {f"old_{k}": v for k, v in (old or {}).items()} | {f"teacher_{k}": v for k, v in (teacher or {}).items()}
        mbs = micro_batches(batch, groups, teacher=False, pad_id=self.c.tokenizer.pad_token_id, extra=extra)
        step = self.step + 1

        def loss_fn(rl, mb):  # rl: logits of the response positions [b, R, V/tp]
            logp, entropy = vocab_parallel_logprobs_and_entropy(rl, mb["resp_ids"], tp_group=self.tp_group,
                                                                temperature=self.temperature)  # fmt: skip
            valid = mb["mask"]
            old_logp = mb["old_logp"] if "old_logp" in mb else logp.detach()  # one step per batch: old = current
            teacher_logp = mb.get("teacher_logp", old_logp)
            credit, credit_metrics = self.mode.token_credit(
                step, mb["adv"], old_logp, teacher_logp, valid, correct=mb["correct"],
                teacher_entropy=mb.get("teacher_entropy"), vocab_size=rl.shape[-1] * self.tp_size)  # fmt: skip
            if capture is not None and credit is not None:
                delta = (teacher_logp - old_logp).detach() if "teacher_logp" in mb else None
                capture.append((mb["rows"], credit.detach(), delta, valid))
            top = None
            if "teacher_topk_ids" in mb:
                top = TeacherTopk(mb["teacher_topk_ids"], mb["teacher_topk_logp"], mb.get("teacher_topk_tail"))
            loss, metrics = self.mode.loss(MicroBatch(
                logits=rl, logp=logp, mask=valid & mb["in_loss"].unsqueeze(1), old_logp=old_logp,
                rollout_logp=mb["rollout_logp"], credit=credit, teacher_logits=mb.get("teacher_logits"),
                teacher_topk=top, denominator=denominator, tp_group=self.tp_group, temperature=self.temperature,
            ))  # fmt: skip
            loss = self.faults.loss(step, loss)
            gap = torch.where(valid, (old_logp - mb["rollout_logp"]).abs(), 0.0)
            report = {"loss": loss.detach(), "tokens": valid.sum(), "logp_maxdiff": gap.max(),
                      "entropy": _masked_mean(entropy.detach(), valid), "train_rollout_logp_diff": _masked_mean(gap, valid)}  # fmt: skip
            if "teacher_logp" in mb:
                delta = teacher_logp - old_logp  # Delta_t of the sampled tokens
                report["teacher_student_gap"] = _masked_mean(delta, valid)
                report["teacher_student_abs_gap"] = _masked_mean(delta.abs(), valid)
                # KL(student || teacher) estimated on the student's own samples (k3: exp(D) - 1 - D >= 0)
                report["teacher_student_kl"] = _masked_mean(torch.expm1(delta) - delta, valid)
            return loss, report | credit_metrics | {f"pg_{k}": v.detach() for k, v in metrics.items()}

        return mbs, loss_fn

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

    def evaluate(self) -> dict:
        """Validation: the engines (awake, holding the policy just synced) answer data.eval_file
        with the code of tools/evaluate.py; every engine takes a share. Returns the `eval/...`
        metrics (rank 0; {} elsewhere)."""
        from megatron_rlsd.evaluation import EvalSampling, evaluate_rows, gather_records, shard_rows, summarize, summary_metrics

        r = self.cfg.rollout
        per_engine = r.vllm_tensor_parallel_size
        engine, leader = divmod(dist.get_rank(), per_engine)
        sampling = EvalSampling(samples=r.eval_samples, temperature=r.eval_temperature, top_p=1.0, seed=self.cfg.trainer.seed,
                                max_new_tokens=r.eval_max_new_tokens or r.max_new_tokens,
                                max_prompt_tokens=self.cfg.data.max_prompt_tokens)  # fmt: skip
        rows = shard_rows(self.c.eval_rows, engine, dist.get_world_size() // per_engine)
        records, _ = evaluate_rows(self.c.engine, rows, self.c.templates, self.c.encoder, sampling, reward_cfg=self.cfg.reward)
        everyone = gather_records(records if leader == 0 else [])  # an engine's other ranks hold copies
        return summary_metrics(summarize(everyone)) if dist.get_rank() == 0 else {}

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
        # throughput of the whole world: tokens generated per second of rollout, tokens
        # (prompt + response) trained per second of the update
        generated = sum(len(s.response) for s in samples)
        trained = sum(len(s.student_prompt) + len(s.response) for s in samples)
        m["leakage"] = self.leakage.share([s.text for s in samples])
        fallback = [self.mode.context_fallback(s.row) for s in samples]
        if fallback and fallback[0] is not None:
            m["opsd_context_fallback"] = float(np.mean(fallback))
        m["rollout_tokens_per_s"] = generated / times["rollout"] if times.get("rollout") else 0.0
        m["train_tokens_per_s"] = trained / times["update"] if times.get("update") else 0.0
        m |= acc.reduce() | update_metrics
        return m | {f"time_{k}": round(v, 3) for k, v in times.items()}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over `mask` without a host sync (0 for an empty mask)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def _pick(scores: dict | None, rows: list[int]) -> dict | None:
    """The rows `rows` of every [B, ...] score tensor."""
    if scores is None:
        return None
    index = torch.tensor(rows, device=next(iter(scores.values())).device)
    return {k: v[index] for k, v in scores.items()}
