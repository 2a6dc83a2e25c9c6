"""The loss modes: what each needs from a training step, its token credit and its loss.

Every mode is one class registered in :data:`LOSS_MODES` (the table config validation reads).
The trainer asks a mode, never branches on its name:

- ``teacher_pass`` / ``teacher_logits``: run the privileged-context forward, and keep the
  teacher's full (vocab-parallel) distribution rather than only its log-probs of the sampled
  tokens;
- ``teacher_prompts(samples, templates, encode)``: replace the teacher prompts (SDPO: a successful
  sibling);
- ``in_loss(sample)`` / ``denominator(samples)``: whether a sample's tokens count in the loss, and
  the global count the loss is normalised by;
- ``teacher_entropy``: the teacher pass also returns its per-token entropy (AntiSD, EGRSD);
- ``begin_step(median teacher entropy)``: called once per step, on every rank, before the update
  (modes with ``entropy_gate``: AntiSD's gate); ``state_dict`` / ``load_state_dict``: what a
  checkpoint must keep of the mode;
- ``token_credit(...)``: the token advantages of the clipped surrogate (None: no surrogate);
- ``loss(mb)``: one micro-batch's loss and its metrics.

Modes (arXiv 2604.03128, Sec. 5 and Table 2):

* ``rlsd``: the surrogate with RLSD's token credit (rlsd.rlsd_token_advantages);
  ``algorithm.negative_only`` reweights only rejected rollouts.
* ``rlrt``, ``antisd``, ``egrsd``: the surrogate with the credit of algorithms/credit.py (RLRT's
  reversed ratio on correct rollouts; AntiSD's bounded, sign-reversed additive term under its
  entropy gate; EGRSD's entropy-gated RLSD weight).
* ``grpo``: the surrogate with the sequence advantage on every token.
* ``opsd``: on-policy self-distillation, ``D(P_T || P_S)`` over the full vocabulary with the
  reference answer as privileged context.
* ``grpo_opsd``: ``L_grpo + alpha * L_opsd``.
* ``sdpo``: the privileged context is a successful sibling rollout; top-k + tail JSD; samples
  without one are left out of the loss.

The distillation modes compare distributions over the teacher's top-k tokens plus a tail bucket
(`algorithm.distill_topk`, SDPO's default 100): that is what the teacher pass keeps per token, so
the whole batch's vocabulary is never stored; `distill_topk: 0` keeps the teacher's full logits
(exact, for small vocabularies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_rlsd.algorithms.losses import (
    TeacherTopk,
    aggregate,
    opsd_token_divergence,
    policy_loss,
    topk_divergence,
    truncated_is_weights,
)
from megatron_rlsd.algorithms.credit import (
    AntiSDGate,
    antisd_token_advantages,
    egrsd_gate,
    egrsd_token_advantages,
    rlrt_clip_fractions,
    rlrt_token_advantages,
)
from megatron_rlsd.algorithms.rlsd import LambdaSchedule, rlsd_clip_fractions, rlsd_token_advantages
from megatron_rlsd.data.templates import user_message

__all__ = ["LOSS_MODES", "LossMode", "MicroBatch", "make_loss_mode"]


@dataclass
class MicroBatch:
    """What a loss sees of one micro-batch on the last pipeline stage. Per-token tensors are
    ``[b, R]`` over response positions; ``logits`` are the vocab-parallel rows that predict them."""

    logits: torch.Tensor  # [b, R, V / tp], carries the gradient
    logp: torch.Tensor  # [b, R] log-probs of the sampled tokens at the rollout temperature (gradient)
    mask: torch.Tensor  # [b, R] bool: response tokens of samples that count in the loss
    old_logp: torch.Tensor  # [b, R] behaviour policy (detached)
    rollout_logp: torch.Tensor  # [b, R] the rollout engine's log-probs
    credit: torch.Tensor | None  # [b, R] token advantages (None: no surrogate)
    teacher_logits: torch.Tensor | None  # [b, R, V / tp]: the teacher's distribution (algorithm.distill_topk=0)
    teacher_topk: TeacherTopk | None  # or its top-k + tail (modes with teacher_logits)
    denominator: float  # global count of loss tokens (or sequences), over all DP ranks
    tp_group: object
    temperature: float


class LossMode:
    """Plain GRPO; the other modes override what differs."""

    name = "grpo"
    teacher_pass = False
    teacher_logits = False
    teacher_entropy = False
    entropy_gate = False

    def __init__(self, cfg, truncated_is_cap: float = 0.0):
        self.cfg = cfg  # the `algorithm` config section
        self.truncated_is_cap = truncated_is_cap  # > 0: truncated importance sampling in the surrogate

    def privileged_context(self, row) -> str:
        """What the teacher template's {answer} receives for `row`: the reference answer (RLSD)."""
        return row.answer

    def context_fallback(self, row) -> bool | None:
        """Whether `row` lacked the context this mode asks for (None: the mode asks for none)."""
        return None

    def teacher_prompts(self, samples: Sequence, templates, encode: Callable) -> None:
        """Replace the samples' teacher prompts where the mode defines its own privileged context.
        `encode(messages, images) -> (prompt ids, vision inputs)` is the trainer's prompt encoder."""

    def in_loss(self, sample) -> bool:
        return True

    def denominator(self, samples: Sequence) -> float:
        """The global count the loss is normalised by: response tokens (token_mean) or responses
        (seq_mean_token_mean) of the samples in the loss, over the whole batch (all DP ranks)."""
        counted = [s for s in samples if self.in_loss(s)]
        if self.cfg.loss_agg == "token_mean":
            return float(max(1, sum(len(s.response) for s in counted)))
        return float(max(1, sum(1 for s in counted if s.response)))

    def begin_step(self, teacher_entropy_median: float) -> None:
        """Modes with ``entropy_gate``: this step's median teacher entropy over the global batch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def token_credit(self, step: int, seq_adv, student_logp, teacher_logp, mask, *, correct=None,
                     teacher_entropy=None, vocab_size: int = 0) -> tuple[torch.Tensor | None, dict]:  # fmt: skip
        """``([b, R] token advantages or None, {metric: token-mean over mask, a 0-dim tensor})``
        for optimizer step ``step`` (counted from 1). ``correct`` ``[b]``: the verifier's verdicts;
        ``teacher_entropy`` ``[b, R]`` (modes with ``teacher_entropy``) over ``vocab_size`` entries."""
        return seq_adv.unsqueeze(1).expand_as(student_logp).clone(), {}

    def lam(self, step: int) -> float:
        """RLSD's mixing coefficient at ``step`` (0 for modes without it)."""
        return 0.0

    def loss(self, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
        return self._surrogate(mb)

    def _surrogate(self, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
        a = self.cfg
        tis = None
        if self.truncated_is_cap > 0:
            tis = truncated_is_weights(mb.old_logp, mb.rollout_logp, self.truncated_is_cap)
        loss, metrics = policy_loss(mb.logp, mb.old_logp, mb.credit, mb.mask, eps_low=a.eps_low, eps_high=a.eps_high,
                                    dual_clip=a.dual_clip or None, agg=a.loss_agg, denominator=mb.denominator, is_weights=tis)  # fmt: skip
        if tis is not None:  # mean weight: how far the rollout engine's distribution is from ours
            metrics["tis_weight"] = torch.where(mb.mask, tis, 0.0).sum() / mb.mask.sum().clamp(min=1)
        return loss, metrics

    def _distillation(self, mb: MicroBatch, divergence: str, beta: float) -> torch.Tensor:
        """D(P_T || P_S) per token, aggregated: over the teacher's top-k + tail, or the whole
        vocabulary when the teacher's logits were kept (algorithm.distill_topk=0)."""
        if mb.teacher_topk is not None:
            beta = {"jsd": beta, "forward_kl": 0.0, "reverse_kl": 1.0}[divergence]
            div = topk_divergence(mb.logits, mb.teacher_topk, beta=beta, tp_group=mb.tp_group, temperature=mb.temperature)
        else:
            div = opsd_token_divergence(mb.logits, mb.teacher_logits, divergence=divergence, beta=beta,
                                        tp_group=mb.tp_group, temperature=mb.temperature)  # fmt: skip
        return aggregate(div, mb.mask, self.cfg.loss_agg, mb.denominator)

    def _opsd(self, mb: MicroBatch) -> torch.Tensor:
        return self._distillation(mb, self.cfg.opsd_divergence, self.cfg.opsd_beta)


class Rlsd(LossMode):
    name = "rlsd"
    teacher_pass = True

    def __init__(self, cfg, truncated_is_cap: float = 0.0):
        super().__init__(cfg, truncated_is_cap)
        self.schedule = LambdaSchedule(cfg.lambda_init, cfg.lambda_decay_steps, cfg.lambda_warmup_steps)

    def lam(self, step: int) -> float:
        return self.schedule.value(step)

    def token_credit(self, step, seq_adv, student_logp, teacher_logp, mask, **_):
        neg = self.cfg.negative_only
        credit = rlsd_token_advantages(seq_adv, student_logp, teacher_logp, self.lam(step), self.cfg.eps_w, neg)
        low, high = rlsd_clip_fractions(seq_adv, student_logp, teacher_logp, mask, self.cfg.eps_w, neg)
        return credit, {"clip_low": low, "clip_high": high}


class Rlrt(Rlsd):
    """RLRT (arXiv 2605.10781): the reversed evidence ratio, on correct rollouts only."""

    name = "rlrt"

    def token_credit(self, step, seq_adv, student_logp, teacher_logp, mask, *, correct=None, **_):
        credit = rlrt_token_advantages(seq_adv, student_logp, teacher_logp, correct, self.lam(step), self.cfg.eps_w)
        low, high, share = rlrt_clip_fractions(seq_adv, student_logp, teacher_logp, correct, mask, self.cfg.eps_w)
        return credit, {"clip_low": low, "clip_high": high, "reweighted": share}


class Egrsd(Rlsd):
    """EGRSD (arXiv 2605.13255, our reading of its abstract): RLSD's weight times a
    teacher-entropy confidence gate with a floor (credit.egrsd_token_advantages)."""

    name = "egrsd"
    teacher_entropy = True

    def token_credit(self, step, seq_adv, student_logp, teacher_logp, mask, *, teacher_entropy=None, vocab_size=0, **_):
        a = self.cfg
        credit = egrsd_token_advantages(seq_adv, student_logp, teacher_logp, teacher_entropy, vocab_size,
                                        self.lam(step), a.eps_w, a.egrsd_floor)  # fmt: skip
        low, high = rlsd_clip_fractions(seq_adv, student_logp, teacher_logp, mask, a.eps_w)
        at_floor = (egrsd_gate(teacher_entropy, vocab_size, a.egrsd_floor) <= a.egrsd_floor) & mask.bool()
        gated = at_floor.sum() / mask.sum().clamp(min=1)
        return credit, {"clip_low": low, "clip_high": high, "gated": gated.float()}


class AntiSD(LossMode):
    """AntiSD (arXiv 2605.11609): ``A - lam * phi(t - s)`` with Eq. 7's gate on the median teacher
    entropy (credit.antisd_token_advantages, credit.AntiSDGate)."""

    name = "antisd"
    teacher_pass = True
    teacher_entropy = True
    entropy_gate = True

    def __init__(self, cfg, truncated_is_cap: float = 0.0):
        super().__init__(cfg, truncated_is_cap)
        self.gate = AntiSDGate(cfg.antisd_lambda_max, cfg.antisd_warmup_steps, cfg.antisd_ratio_down)
        self._lam = 0.0

    def begin_step(self, teacher_entropy_median: float) -> None:
        self._lam = self.gate.step(teacher_entropy_median)

    def lam(self, step: int) -> float:
        return self._lam

    def state_dict(self) -> dict:
        return {"gate": self.gate.state_dict(), "lam": self._lam}

    def load_state_dict(self, state: dict) -> None:
        if state:  # empty from a checkpoint of another mode: the gate calibrates afresh
            self.gate.load_state_dict(state["gate"])
            self._lam = state["lam"]

    def token_credit(self, step, seq_adv, student_logp, teacher_logp, mask, **_):
        credit = antisd_token_advantages(seq_adv, student_logp, teacher_logp, self._lam)
        a = seq_adv.unsqueeze(1)
        # tokens whose credit the term turned against their sequence's direction (or gave one at A = 0)
        flipped = ((credit * a < 0) | ((a == 0) & (credit != 0))) & mask.bool()
        n = mask.sum().clamp(min=1)
        term = torch.where(mask.bool(), credit - a, 0.0).sum() / n  # the mean additive term -lam * phi
        return credit, {"sign_flipped": (flipped.sum() / n).float(), "antisd_term": term.float(),
                        "gate_open": credit.new_tensor(float(self.gate.open))}  # fmt: skip


class _SolutionContext(LossMode):
    """OPSD as the RLSD paper ran it: the privileged context is the row's reference solution (a
    reasoning trace) when `algorithm.opsd_context` is `solution`; rows without one get the answer."""

    def privileged_context(self, row) -> str:
        return row.solution if self.context_fallback(row) is False else row.answer

    def context_fallback(self, row) -> bool | None:
        if self.cfg.opsd_context != "solution":
            return None
        return not row.solution.strip()


class Opsd(_SolutionContext):
    name = "opsd"
    teacher_pass = True
    teacher_logits = True

    def token_credit(self, step, seq_adv, student_logp, teacher_logp, mask, **_):
        return None, {}

    def loss(self, mb):
        return self._opsd(mb), {}


class GrpoOpsd(_SolutionContext):
    name = "grpo_opsd"
    teacher_pass = True
    teacher_logits = True

    def loss(self, mb):
        pg, metrics = self._surrogate(mb)
        return pg + self.cfg.grpo_opsd_alpha * self._opsd(mb), metrics


class Sdpo(LossMode):
    """SDPO (arXiv 2601.20802): the teacher is the model re-prompted with a successful sibling's
    response ("{student prompt}\\n\\nCorrect solution:\\n\\n{response}\\n\\nCorrectly solve the original
    question."); samples of a group without another correct response are left out of the loss
    and of its denominator."""

    name = "sdpo"
    teacher_pass = True
    teacher_logits = True

    def teacher_prompts(self, samples, templates, encode):
        by_group: dict[int, list] = {}
        for s in samples:
            by_group.setdefault(s.group, []).append(s)
        for group in by_group.values():
            for s in group:
                others = [o for o in group if o.correct and o is not s]
                s.teacher_valid = bool(others)
                if others:
                    best = min(others, key=lambda o: len(o.response))
                    text = (f"{templates.student_text(s.row)}\n\nCorrect solution:\n\n{best.text}\n\n"
                            "Correctly solve the original question.")  # fmt: skip
                    s.teacher_prompt, _ = encode([user_message(text, s.row.images)], s.row.images)

    def in_loss(self, sample) -> bool:
        return sample.teacher_valid

    def token_credit(self, step, seq_adv, student_logp, teacher_logp, mask, **_):
        return None, {}

    def loss(self, mb):
        return self._distillation(mb, "jsd", self.cfg.opsd_beta), {}


LOSS_MODES: dict[str, type[LossMode]] = {m.name: m for m in (Rlsd, LossMode, Opsd, GrpoOpsd, Sdpo, Rlrt, AntiSD, Egrsd)}


def make_loss_mode(algorithm_cfg, truncated_is_cap: float = 0.0) -> LossMode:
    """The configured loss mode; `truncated_is_cap` (rollout.truncated_is_cap) > 0 turns on
    truncated importance sampling in the surrogate."""
    return LOSS_MODES[algorithm_cfg.loss_mode](algorithm_cfg, truncated_is_cap)
