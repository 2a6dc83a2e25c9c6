"""The self-distilled credit family beyond RLSD: RLRT, AntiSD and EGRSD token advantages.

Every function here takes what RLSD takes, from the same single teacher forward: the sequence
advantages ``A`` ``[B]``, the student's and the teacher's log-probs of the sampled tokens
``[B, T]``, plus, where a variant needs it, which rollouts the verifier accepted (``correct``
``[B]``) or the teacher's per-token entropy ``[B, T]`` (the vocab-parallel reduction of the
teacher pass). Outputs are detached fp32 (or wider) ``[B, T]`` credits; nothing flows back.
Notation: ``s_t = log P_S(y_t)``, ``t_t = log P_T(y_t)`` (teacher with privileged context),
``Delta_t = t_t - s_t`` (RLSD's evidence).

* RLRT ("Rebellious Student", arXiv 2605.10781): RLSD's weight with the ratio reversed,
  ``w_t = exp(sign(A) * (s_t - t_t)) = (P_S / P_T)^sign(A)``, applied only to rollouts the
  verifier accepted; rejected ones keep ``A``. On correct rollouts this credits the tokens the
  student found without the teacher's help. (Its paper's teacher reads a correct sibling
  rollout; here it is RLSD's teacher, so the variants differ only in their credit.)
* AntiSD (arXiv 2605.11609), Eq. 2 with Eq. 6 and Algorithm 1: an additive, bounded,
  sign-reversed distillation term, ``A_t = A - lam * sg(phi(u_t))`` with ``u_t = t_t - s_t`` and
  ``phi(u) = (softplus(u) - log 2) / 2``: tokens the teacher prefers (u > 0) are penalised up to
  linearly, tokens it does not are credited by at most ``log(2) / 2``. ``lam = g * lam_max``
  where ``g`` is Eq. 7's batch-level hysteresis gate on the median teacher entropy
  (:class:`AntiSDGate`). The term is non-zero even where ``A = 0``, by design.
* EGRSD (arXiv 2605.13255). Only its abstract was accessible to us, so this is our reading of
  it, not its equations: the reward sets the direction, RLSD's clipped ratio the magnitude, and a
  teacher-entropy confidence gate scales each token's reweighting term down as the teacher's
  normalised entropy ``h_t = H_t / log|V|`` rises, never below a floor:
  ``A_t = A * [(1 - lam) + lam * clip(w_t) * max(floor, 1 - h_t)]``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from megatron_rlsd.algorithms.rlsd import _check_inputs, _check_real, _clip_shares, _signed_log_weight

__all__ = [
    "AntiSDGate", "antisd_phi", "antisd_token_advantages", "egrsd_gate", "egrsd_token_advantages", "rlrt_clip_fractions",
    "rlrt_token_advantages",
]  # fmt: skip


def _clipped_weight(log_w: torch.Tensor, eps_w: float) -> torch.Tensor:
    """``clip(exp(log_w), 1 - eps_w, 1 + eps_w)`` without overflow (``eps_w`` may be 1: no floor)."""
    return log_w.clamp(max=math.log1p(eps_w)).exp().clamp(min=1.0 - eps_w)


def _check_rows(name: str, t, rows: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != rows:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape [B] = [{rows}], got {got}")


def rlrt_token_advantages(seq_adv, student_logp, teacher_logp, correct, lam: float, eps_w: float) -> torch.Tensor:
    """RLRT: ``A_t = A * [(1 - lam) + lam * clip((P_S / P_T)^sign(A), 1 - eps_w, 1 + eps_w)]`` on
    rollouts with ``correct``, ``A`` elsewhere. ``eps_w`` in ``(0, 1]`` (the paper uses up to 1)."""
    _check_inputs(seq_adv, student_logp, teacher_logp)
    _check_rows("correct", correct, student_logp.shape[0])
    lam = _check_real("lam", lam, 0.0, 1.0, False, False)
    eps_w = _check_real("eps_w", eps_w, 0.0, 1.0, True, False)
    with torch.no_grad():
        w = _clipped_weight(-_signed_log_weight(seq_adv, student_logp, teacher_logp), eps_w)
        scale = torch.where(correct.bool().unsqueeze(1), (1.0 - lam) + lam * w, torch.ones_like(w))
        return scale * seq_adv.detach().to(scale.dtype).unsqueeze(1)


def rlrt_clip_fractions(seq_adv, student_logp, teacher_logp, correct, mask, eps_w: float):
    """Shares of valid tokens (``mask``) whose reversed weight was clipped low / high; only tokens
    of correct rollouts are reweighted, so only they can count."""
    with torch.no_grad():
        reweighted = correct.bool().unsqueeze(1)
        low, high = _clip_shares(-_signed_log_weight(seq_adv, student_logp, teacher_logp), mask, reweighted, eps_w)
        valid = mask.bool()
        return low, high, ((valid & reweighted).sum() / valid.sum().clamp(min=1)).float()


def antisd_phi(u: torch.Tensor) -> torch.Tensor:
    """Eq. 6: ``phi(u) = (softplus(u) - log 2) / 2`` (bounded below by ``-log(2)/2``; ~ u/2 for u >> 0)."""
    return 0.5 * (torch.nn.functional.softplus(u) - math.log(2.0))


def antisd_token_advantages(seq_adv, student_logp, teacher_logp, lam: float) -> torch.Tensor:
    """AntiSD (Algorithm 1, line 10): ``A_t = A - lam * sg(phi(t_t - s_t))``; ``lam`` = g * lam_max."""
    _check_inputs(seq_adv, student_logp, teacher_logp)
    lam = _check_real("lam", lam, 0.0, math.inf, False, True)
    with torch.no_grad():
        dtype = torch.promote_types(torch.promote_types(student_logp.dtype, teacher_logp.dtype), torch.float32)
        u = teacher_logp.detach().to(dtype) - student_logp.detach().to(dtype)
        return seq_adv.detach().to(dtype).unsqueeze(1) - lam * antisd_phi(u)


def egrsd_token_advantages(seq_adv, student_logp, teacher_logp, teacher_entropy, vocab_size: int, lam: float,
                           eps_w: float, floor: float) -> torch.Tensor:  # fmt: skip
    """EGRSD (our reading; see the module docstring):
    ``A_t = A * [(1 - lam) + lam * clip(w_t, 1 - eps_w, 1 + eps_w) * max(floor, 1 - H_t / log V)]``."""
    _check_inputs(seq_adv, student_logp, teacher_logp)
    if not isinstance(teacher_entropy, torch.Tensor) or teacher_entropy.shape != student_logp.shape:
        raise ValueError(f"teacher_entropy must have shape {tuple(student_logp.shape)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    lam = _check_real("lam", lam, 0.0, 1.0, False, False)
    eps_w = _check_real("eps_w", eps_w, 0.0, 1.0, True, True)
    floor = _check_real("floor", floor, 0.0, 1.0, True, False)
    with torch.no_grad():
        w = _clipped_weight(_signed_log_weight(seq_adv, student_logp, teacher_logp), eps_w)
        gate = egrsd_gate(teacher_entropy, vocab_size, floor).to(w.dtype)
        scale = (1.0 - lam) + lam * w * gate
        return scale * seq_adv.detach().to(scale.dtype).unsqueeze(1)


def egrsd_gate(teacher_entropy: torch.Tensor, vocab_size: int, floor: float) -> torch.Tensor:
    """The confidence gate ``max(floor, 1 - H_t / log V)`` in ``[floor, 1]``."""
    h = teacher_entropy.detach().float() / math.log(vocab_size)
    return (1.0 - h).clamp(min=floor, max=1.0)


@dataclass
class AntiSDGate:
    """Eq. 7's hysteresis gate on the batch's median teacher entropy ``H``, calibrated from the
    first ``warmup_steps`` steps (run at ``lam = 0``): ``H_warm`` is the median of their ``H``,
    then the gate is open, closes when ``H < ratio_down * H_warm`` and reopens at ``H >= H_warm``.
    ``lam = g * lam_max``. Its state is part of the trainer's checkpoint."""

    lam_max: float = 0.5
    warmup_steps: int = 5
    ratio_down: float = 0.93
    warm: list[float] = field(default_factory=list)  # H of the warm-up steps
    h_warm: float | None = None
    open: bool = False

    def step(self, h: float) -> float:
        """Feed this step's median teacher entropy; returns this step's ``lam``."""
        if self.h_warm is None:
            self.warm.append(float(h))
            if len(self.warm) < self.warmup_steps:
                return 0.0
            self.h_warm, self.open = statistics.median(self.warm), True
            return 0.0  # the last warm-up step still runs at lam = 0
        if self.open and h < self.ratio_down * self.h_warm:
            self.open = False
        elif not self.open and h >= self.h_warm:
            self.open = True
        return self.lam_max if self.open else 0.0

    def state_dict(self) -> dict:
        return {"warm": list(self.warm), "h_warm": self.h_warm, "open": self.open}

    def load_state_dict(self, state: dict) -> None:
        self.warm, self.h_warm, self.open = list(state["warm"]), state["h_warm"], bool(state["open"])
