"""RLSD token advantages: the reward sets the direction, the teacher the magnitude.

Paper (arXiv 2604.03128) Eq. 13-15 and Algorithm 1, as the authors' code
(``_build_stgca_advantages``) computes them::

    Delta_t = sg( log P_T(y_t | x, r, y_<t) - log P_S(y_t | x, y_<t) )
    w_t     = exp( sign(A) * Delta_t )
    A_t     = A * [ (1 - lambda) + lambda * clip(w_t, 1 - eps_w, 1 + eps_w) ]      (detached)

``lambda`` follows :class:`LambdaSchedule` (0.5 decayed linearly to 0 over the
first 50 optimizer steps in the paper; the authors' launch script uses 60).

Since ``(1 - lambda) + lambda * clip(w) > 0`` for ``eps_w < 1``, every token
advantage has the sign of its sequence advantage (or is 0 when A is 0).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ["rlsd_token_advantages", "rlsd_clip_fractions", "LambdaSchedule"]


def _check_real(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    ok_lo = v > lo if lo_open else v >= lo
    ok_hi = v < hi if hi_open else v <= hi
    if not (ok_lo and ok_hi):  # also rejects NaN
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return v


def _check_inputs(seq_adv, student_logp, teacher_logp) -> None:
    for name, t in (("seq_adv", seq_adv), ("student_logp", student_logp), ("teacher_logp", teacher_logp)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor")
    if student_logp.dim() != 2:
        raise ValueError(f"student_logp must have shape [B, T], got {tuple(student_logp.shape)}")
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(
            f"teacher_logp shape {tuple(teacher_logp.shape)} != student_logp shape {tuple(student_logp.shape)}"
        )
    if seq_adv.dim() != 1 or seq_adv.shape[0] != student_logp.shape[0]:
        raise ValueError(
            f"seq_adv must have shape [B] = [{student_logp.shape[0]}] (one advantage per sequence), "
            f"got {tuple(seq_adv.shape)}"
        )


def _signed_log_weight(seq_adv, student_logp, teacher_logp) -> torch.Tensor:
    """Detached ``sign(A) * Delta_t`` (``[B, T]``, >= fp32); exactly 0 where A == 0.

    Written with ``where`` rather than a product so that an infinite Delta on a
    row with A == 0 gives 0, not NaN.
    """
    dtype = torch.promote_types(torch.promote_types(student_logp.dtype, teacher_logp.dtype), torch.float32)
    delta = teacher_logp.detach().to(dtype) - student_logp.detach().to(dtype)
    a = seq_adv.detach().unsqueeze(1)
    zero = torch.zeros_like(delta)
    return torch.where(a > 0, delta, torch.where(a < 0, -delta, zero))


def rlsd_token_advantages(
    seq_adv: torch.Tensor,
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    lam: float,
    eps_w: float,
    negative_only: bool = False,
) -> torch.Tensor:
    """Token advantages ``A_t = A * ((1 - lam) + lam * clip(w_t, 1 - eps_w, 1 + eps_w))``.

    Args:
        seq_adv: ``[B]`` sequence advantages ``A`` (e.g. :func:`group_advantages`).
        student_logp: ``[B, T]`` ``log P_S(y_t | x, y_<t)`` of the sampled tokens.
        teacher_logp: ``[B, T]`` ``log P_T(y_t | x, r, y_<t)`` of the same tokens.
        lam: mixing coefficient in ``[0, 1]`` (0 gives plain GRPO: ``A`` broadcast).
        eps_w: evidence-weight clip range in ``(0, 1)``.
        negative_only: reweight only rejected rollouts (``A < 0``: tokens the teacher favours are
            blamed less, those it disfavours more); ``A > 0`` keeps ``A`` on every token
            (ms-swift's ``rlsd_negative_only``).

    Returns:
        ``[B, T]`` token advantages (fp32, or the inputs' dtype if wider) with no
        autograd history: nothing flows back to any input.  Padded positions
        are not special-cased (mask them in the loss).

    ``w_t`` is formed in log space: ``sign(A) * Delta_t`` is clamped to
    ``[log(1 - eps_w), log(1 + eps_w)]`` before ``exp``, which equals clipping
    ``w_t`` afterwards but never overflows for huge ``|Delta_t|``.

    Raises:
        ValueError: wrong shapes / dtypes, ``lam`` outside ``[0, 1]``, ``eps_w``
            outside ``(0, 1)``.
    """
    _check_inputs(seq_adv, student_logp, teacher_logp)
    lam = _check_real("lam", lam, 0.0, 1.0, False, False)
    eps_w = _check_real("eps_w", eps_w, 0.0, 1.0, True, True)
    with torch.no_grad():
        s = _signed_log_weight(seq_adv, student_logp, teacher_logp)
        w = s.clamp(min=math.log1p(-eps_w), max=math.log1p(eps_w)).exp_()
        scale = w.mul_(lam).add_(1.0 - lam)
        if negative_only:
            scale = torch.where(seq_adv.detach().unsqueeze(1) < 0, scale, 1.0)
        return scale.mul_(seq_adv.detach().to(scale.dtype).unsqueeze(1))


def rlsd_clip_fractions(
    seq_adv: torch.Tensor,
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    eps_w: float,
    negative_only: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shares of valid tokens whose evidence weight was clipped low / high.

    ``low``: ``w_t < 1 - eps_w``; ``high``: ``w_t > 1 + eps_w`` (strict, i.e. the
    clip changed the value).  The denominator is every valid token
    (``mask.sum()``), tokens of A == 0 sequences included (their ``w_t`` is 1,
    never clipped), as the authors' ``stgca_clip_low_ratio`` /
    ``stgca_clip_high_ratio`` metrics, the "clip ratio 3-6%" of the paper's
    Fig. 5c.  These are this call's (micro-batch's) fractions; to combine
    several calls weight each by its ``mask.sum()``.  With ``negative_only`` only the
    reweighted tokens (``A < 0``) can count as clipped.

    Returns:
        ``(low_frac, high_frac)``: two fp32 scalar tensors (0 when no token is valid).
    """
    _check_inputs(seq_adv, student_logp, teacher_logp)
    if not isinstance(mask, torch.Tensor) or mask.shape != student_logp.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape {tuple(student_logp.shape)}, got {got}")
    eps_w = _check_real("eps_w", eps_w, 0.0, 1.0, True, True)
    with torch.no_grad():
        s = _signed_log_weight(seq_adv, student_logp, teacher_logp)
        reweighted = seq_adv.detach().unsqueeze(1) < 0 if negative_only else torch.ones_like(mask, dtype=torch.bool)
        return _clip_shares(s, mask, reweighted, eps_w)


def _clip_shares(log_w: torch.Tensor, mask: torch.Tensor, reweighted: torch.Tensor, eps_w: float):
    """``(low, high)``: shares of the valid tokens (``mask``) that are ``reweighted`` and whose
    weight ``exp(log_w)`` the clip to ``[1 - eps_w, 1 + eps_w]`` changed (nothing is below 0 when
    ``eps_w`` is 1). fp32 scalars, 0 when no token is valid."""
    valid = mask.bool()
    n = valid.sum().clamp(min=1).to(torch.float32)
    counted = valid & reweighted
    low = ((log_w < math.log1p(-eps_w)) & counted).sum() / n if eps_w < 1 else log_w.new_zeros((), dtype=torch.float32)
    high = ((log_w > math.log1p(eps_w)) & counted).sum() / n
    return low.to(torch.float32), high.to(torch.float32)


@dataclass(frozen=True)
class LambdaSchedule:
    """The RLSD mixing coefficient per optimizer step, as the authors' code computes it.

    ``step`` counts optimizer steps from 1 (the first update is step 1, like the authors'
    ``global_step``)::

        step < warmup_steps:  lam0 * step / warmup_steps                 (ramp up from 0)
        otherwise:            lam0 * max(0, 1 - (step - warmup_steps) / decay_steps)

    ``decay_steps = 0`` keeps ``lam0`` after the warm-up.  With the paper's values (0.5 over 50
    steps, no warm-up) the first update uses 0.49 and every update from step 50 on uses 0.
    """

    lam0: float = 0.5
    decay_steps: int = 50
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check_real("LambdaSchedule.lam0", self.lam0, 0.0, 1.0, False, False)
        for name in ("decay_steps", "warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"LambdaSchedule.{name} must be an integer >= 0, got {v!r}")

    def value(self, step: int) -> float:
        """Lambda for optimizer step ``step`` (>= 1)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
            raise ValueError(f"step must be an integer >= 1 (optimizer steps count from 1), got {step!r}")
        lam0 = float(self.lam0)
        if step < self.warmup_steps:
            return lam0 * step / self.warmup_steps
        if self.decay_steps == 0:
            return lam0
        return lam0 * max(0.0, 1.0 - (step - self.warmup_steps) / self.decay_steps)
