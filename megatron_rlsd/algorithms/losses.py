"""Loss terms: the clipped policy surrogate, its aggregation, and the self-distillation
divergences. The loss modes (algorithms/loss_modes.py) compose them.

Every per-token quantity is ``[B, T]`` over response positions with a ``mask``
of valid (response, non-padding) tokens.  Losses are reduced by
:func:`aggregate` against a GLOBAL denominator so that micro-batch losses add up
to the global-batch mean (see its docstring for the contract).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron_rlsd.algorithms.vocab_parallel import (
    _NEG_FLOOR,
    _check_chunk_size,
    _check_temperature,
    _group_info,
    global_topk_ids,
    vocab_parallel_generalized_jsd,
    vocab_parallel_kl,
    vocab_parallel_topk_tail_logprobs,
)

__all__ = [
    "AGG_MODES",
    "OPSD_DIVERGENCES",
    "aggregate",
    "policy_loss",
    "truncated_is_weights",
    "opsd_token_divergence",
    "sdpo_token_divergence",
    "TeacherTopk",
    "teacher_topk",
    "topk_divergence",
]

AGG_MODES = ("token_mean", "seq_mean_token_mean")
OPSD_DIVERGENCES = ("jsd", "forward_kl", "reverse_kl")

# log(ratio) is clamped to +-this before exp (as EasyR1 / verl) so that a
# diverged token cannot overflow the ratio; such a token is clipped anyway.
_MAX_LOG_RATIO = 20.0
# Floor of the SDPO tail-bucket log-probability: lasgroup/SDPO clamps the
# top-k log-mass at <= -1e-7, i.e. the tail at >= 1 - exp(-1e-7) ~ 1e-7.
_TAIL_FLOOR = math.log(-math.expm1(-1e-7))


# --------------------------------------------------------------------------- #
# aggregation
# --------------------------------------------------------------------------- #
def _check_denominator(denominator):
    """A positive finite float; a 1-element tensor is passed through unchecked
    (reading its value would synchronise with the device)."""
    if isinstance(denominator, torch.Tensor):
        if denominator.numel() != 1:
            raise ValueError(f"denominator must be a scalar, got shape {tuple(denominator.shape)}")
        return denominator.reshape(())
    if isinstance(denominator, bool) or not isinstance(denominator, numbers.Real):
        raise ValueError(f"denominator must be a positive number, got {denominator!r}")
    d = float(denominator)
    if not (d > 0.0) or not math.isfinite(d):
        raise ValueError(
            f"denominator must be a finite number > 0 (the global count of valid tokens or sequences), "
            f"got {denominator!r}"
        )
    return d


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, denominator) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss of ONE micro-batch to its share of a global mean.

    Contract: ``denominator`` is a GLOBAL count over the whole optimizer step,
    i.e. over all micro-batches of all data-parallel ranks, so that the SUM of
    the values returned for every micro-batch on every DP rank is the mean over
    the global batch:

    * ``"token_mean"``: ``sum(per_token * mask) / denominator`` with
      ``denominator`` = global number of valid tokens (DAPO-style token mean,
      the authors' ``loss_avg_mode="token"``).
    * ``"seq_mean_token_mean"``: ``sum_b [ sum_t per_token*mask / sum_t mask ] /
      denominator`` with ``denominator`` = global number of sequences that have
      at least one valid token (the paper's ``1/G sum_i 1/|y_i| sum_t``).
      A sequence with no valid token contributes 0.

    The caller therefore must not average again: Megatron's division of the
    loss by the number of micro-batches and a data-parallel gradient AVERAGE
    both have to be undone (multiply by ``num_microbatches`` / the DP size) or
    disabled, so that gradients are summed.

    Masked positions are excluded with ``where`` (not a product), so NaN / inf
    values there affect neither the value nor the gradient.

    ``denominator`` is a positive float (or a 1-element tensor, used as is).

    Returns:
        fp32 (or wider) scalar tensor, differentiable w.r.t. ``per_token``.
    """
    if not isinstance(per_token, torch.Tensor) or per_token.dim() != 2:
        raise ValueError("per_token must be a [B, T] tensor")
    if not isinstance(mask, torch.Tensor) or mask.shape != per_token.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have the shape of per_token {tuple(per_token.shape)}, got {got}")
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {', '.join(AGG_MODES)}")
    d = _check_denominator(denominator)
    valid = mask.bool()
    x = per_token if per_token.dtype in (torch.float32, torch.float64) else per_token.float()
    x = torch.where(valid, x, torch.zeros_like(x))
    if isinstance(d, torch.Tensor):
        d = d.to(device=x.device, dtype=x.dtype)
    if mode == "token_mean":
        return x.sum() / d
    n_tok = valid.sum(dim=1).clamp(min=1).to(x.dtype)
    return (x.sum(dim=1) / n_tok).sum() / d


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = torch.where(valid, x, torch.zeros_like(x))
    return x.sum() / valid.sum().clamp(min=1).to(x.dtype)


# --------------------------------------------------------------------------- #
# clipped policy surrogate
# --------------------------------------------------------------------------- #
def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    token_adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: Optional[float] = 3.0,
    agg: str = "token_mean",
    denominator,
    is_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped surrogate with token advantages (docs/algorithm.md, the policy loss).

    Per valid token, with ``rho = exp(logp - old_logp)`` and ``A = token_adv``::

        pg = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
        pg = min(pg, -dual_clip * A)      where A < 0   (dual clip, if not None)
        pg = pg * is_weights              (if given; detached)

    then ``loss = aggregate(pg, mask, agg, denominator)`` (see :func:`aggregate`
    for the global-denominator contract).  ``log(rho)`` is clamped to +-20
    before ``exp`` as in EasyR1 / verl.

    Args:
        logp: ``[B, T]`` current-policy log-probs (carries the gradient).
        old_logp: ``[B, T]`` behaviour-policy log-probs (detached inside).
        token_adv: ``[B, T]`` token advantages, or ``[B]`` broadcast over
            tokens (GRPO); detached inside.
        mask: ``[B, T]`` valid-token mask.
        eps_low, eps_high: ratio clip range ``[1 - eps_low, 1 + eps_high]``.
        dual_clip: ``c > 1`` bounding the loss of negative-advantage tokens by
            ``-c * A`` (the authors' ``clip_ratio_dual=3.0``); ``None`` disables it.
        agg: ``"token_mean"`` or ``"seq_mean_token_mean"``.
        denominator: global token (or sequence) count, see :func:`aggregate`.
        is_weights: optional ``[B, T]`` truncated importance-sampling weights
            (:func:`truncated_is_weights`) multiplying the per-token loss.

    Returns:
        ``(loss, metrics)``: the scalar loss and detached scalar metrics, each
        a masked mean over this call's valid tokens:
        ``clip_frac`` (the clipped branch was taken, i.e. the ratio clip was
        active), ``dual_clip_frac`` (the dual clip was active; 0 when disabled),
        ``approx_kl`` (mean of ``old_logp - logp``).
    """
    for name, t in (("logp", logp), ("old_logp", old_logp), ("token_adv", token_adv)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor")
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} != logp shape {tuple(logp.shape)}")
    if token_adv.shape == logp.shape[:1]:
        token_adv = token_adv.unsqueeze(1).expand_as(logp)
    if token_adv.shape != logp.shape:
        raise ValueError(
            f"token_adv must have shape [B, T] = {tuple(logp.shape)} or [B] = {tuple(logp.shape[:1])}, "
            f"got {tuple(token_adv.shape)}"
        )
    if not isinstance(mask, torch.Tensor) or mask.shape != logp.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape {tuple(logp.shape)}, got {got}")
    if is_weights is not None and (not isinstance(is_weights, torch.Tensor) or is_weights.shape != logp.shape):
        raise ValueError(f"is_weights must have shape {tuple(logp.shape)}")
    if isinstance(eps_low, bool) or not isinstance(eps_low, numbers.Real) or not (0.0 <= eps_low < 1.0):
        raise ValueError(f"eps_low must lie in [0, 1), got {eps_low!r}")
    if isinstance(eps_high, bool) or not isinstance(eps_high, numbers.Real) or not (0.0 <= eps_high < math.inf):
        raise ValueError(f"eps_high must be a finite number >= 0, got {eps_high!r}")
    if dual_clip is not None and (
        isinstance(dual_clip, bool) or not isinstance(dual_clip, numbers.Real) or not (1.0 < dual_clip < math.inf)
    ):
        raise ValueError(f"dual_clip must be a finite number > 1 or None, got {dual_clip!r}")
    if agg not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {agg!r}; choose one of {', '.join(AGG_MODES)}")
    _check_denominator(denominator)

    valid = mask.bool()
    dtype = torch.promote_types(logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # Masked positions get ratio 1 and A = 0, so garbage there (e.g. NaN
    # log-probs of padding) reaches neither the loss nor the gradient.
    adv = torch.where(valid, token_adv.detach().to(dtype), zero)
    log_ratio = torch.where(valid, logp.to(dtype) - old_logp.detach().to(dtype), zero)
    ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()

    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    clipped = pg_clipped > pg_unclipped  # -min(rA, clip(r)A) took the clipped branch
    pg = torch.where(clipped, pg_clipped, pg_unclipped)
    if dual_clip is not None:
        bound = -float(dual_clip) * adv
        dual = (adv < 0) & (pg > bound)
        pg = torch.where(dual, bound, pg)
    else:
        dual = torch.zeros_like(clipped)
    if is_weights is not None:
        pg = pg * torch.where(valid, is_weights.detach().to(dtype), zero)

    loss = aggregate(pg, valid, agg, denominator)
    with torch.no_grad():
        metrics = {
            "clip_frac": _masked_mean(clipped.to(dtype), valid),
            "dual_clip_frac": _masked_mean(dual.to(dtype), valid),
            "approx_kl": _masked_mean(-log_ratio.detach(), valid),
        }
    return loss, metrics


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance-sampling weights ``min(exp(old_logp - rollout_logp), cap)``.

    Corrects the mismatch between the rollout engine's sampling distribution
    (``rollout_logp``, e.g. vLLM) and the trainer's recomputation of the same
    policy (``old_logp``).  Detached; same shape as the inputs.
    """
    if not isinstance(old_logp, torch.Tensor) or not isinstance(rollout_logp, torch.Tensor):
        raise ValueError("old_logp and rollout_logp must be tensors")
    if old_logp.shape != rollout_logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} != rollout_logp shape {tuple(rollout_logp.shape)}")
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not (0.0 < cap < math.inf):
        raise ValueError(f"cap must be a finite number > 0, got {cap!r}")
    with torch.no_grad():
        diff = old_logp.detach().float() - rollout_logp.detach().float()
        # clamp in log space first: same result, never overflows
        return diff.clamp(max=math.log(cap)).exp()


# --------------------------------------------------------------------------- #
# self-distillation divergences
# --------------------------------------------------------------------------- #
def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta must be a real number in [0, 1], got {beta!r}")
    return float(beta)


def opsd_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token ``D(P_T || P_S)`` over the full (vocab-parallel) vocabulary (OPSD).

    Args:
        student_logits: ``[..., V_local]`` vocab-sharded student logits (gradient flows here).
        teacher_logits: same shape, the teacher (privileged-context) logits;
            detached inside.
        divergence: ``"jsd"``: generalized JSD with ``beta``
            (``beta * KL(P_T||M) + (1-beta) * KL(P_S||M)``, ``M = beta P_T + (1-beta) P_S``;
            beta 0 / 1 give forward / reverse KL); ``"forward_kl"``:
            ``KL(P_T || P_S)``; ``"reverse_kl"``: ``KL(P_S || P_T)``.
        beta: JSD interpolation weight (only for ``"jsd"``).
        tp_group: tensor-parallel group the vocabulary is sharded over (``None``: full vocab).
        temperature: softmax temperature for both distributions.
        chunk_size: token rows per chunk (None: sized by bytes; bounds fp32 temporaries).

    Returns:
        ``[...]`` fp32 per-token divergence in nats, replicated on all TP ranks.
    """
    if divergence not in OPSD_DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(OPSD_DIVERGENCES)}")
    teacher = teacher_logits.detach() if isinstance(teacher_logits, torch.Tensor) else teacher_logits
    if divergence == "jsd":
        beta = _check_beta(beta)
        return vocab_parallel_generalized_jsd(teacher, student_logits, beta, tp_group, temperature, chunk_size)
    if divergence == "forward_kl":
        return vocab_parallel_kl(teacher, student_logits, tp_group, temperature, chunk_size)
    return vocab_parallel_kl(student_logits, teacher, tp_group, temperature, chunk_size)


def _generalized_jsd_small(lt: torch.Tensor, ls: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD (TRL convention) over the last dim of log-prob tensors."""
    lt = lt.clamp(min=_NEG_FLOOR)
    ls = ls.clamp(min=_NEG_FLOOR)
    if beta == 0.0:
        return (lt.exp() * (lt - ls)).sum(-1)
    if beta == 1.0:
        return (ls.exp() * (ls - lt)).sum(-1)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    kl_t = (lt.exp() * (lt - lm)).sum(-1)
    kl_s = (ls.exp() * (ls - lm)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


@dataclass
class TeacherTopk:
    """The teacher's distribution reduced to its top-k tokens and a tail bucket, per token: what
    the distillation losses keep from the teacher pass (k log-probs instead of the vocabulary)."""

    ids: torch.Tensor  # [..., k] int64 GLOBAL token ids (the same on every TP rank)
    logp: torch.Tensor  # [..., k] fp32 log P_T(id)
    tail: torch.Tensor | None  # [...] fp32 log P_T(everything else); None when k covers the vocabulary

    def select(self, rows, width: int) -> TeacherTopk:
        """Rows `rows` ([b] index) of the first `width` positions (a micro-batch's slice)."""
        pick = lambda t: None if t is None else t[rows][:, :width]  # noqa: E731
        return TeacherTopk(pick(self.ids), pick(self.logp), pick(self.tail))


def teacher_topk(teacher_logits: torch.Tensor, topk: int, *, tp_group=None, temperature: float = 1.0,
                 chunk_size: int | None = None) -> TeacherTopk:  # fmt: skip
    """The teacher's global top-``topk`` tokens per position and their log-probabilities under
    ``softmax(logits / T)``, plus the log-probability of the tail (every other token, its mass
    summed directly so a small tail keeps fp32 relative accuracy). Vocab-parallel: local top-k,
    candidates all-gathered, the same global ids on every TP rank; one chunked pass."""
    _check_logits_tensor("teacher_logits", teacher_logits)
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
    temperature = _check_temperature(temperature)
    world, rank = _group_info(tp_group)
    k = min(int(topk), teacher_logits.shape[-1] * world)
    want_tail = k < teacher_logits.shape[-1] * world
    with torch.no_grad():
        ids = global_topk_ids(teacher_logits, k, tp_group, world, rank)
        logp, tail = vocab_parallel_topk_tail_logprobs(teacher_logits.detach(), ids, tp_group, temperature,
                                                       _check_chunk_size(chunk_size), want_tail)  # fmt: skip
    return TeacherTopk(ids.to(torch.int32), logp, tail)  # int32 ids: half the memory of the kept signal


def topk_divergence(student_logits: torch.Tensor, teacher: TeacherTopk, *, beta: float = 0.5, tp_group=None,
                    temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:  # fmt: skip
    """Per-token generalized JSD between teacher and student over the teacher's top-k tokens plus
    one tail bucket (``k + 1`` categories; SDPO's top-k + tail distillation, arXiv 2601.20802)::

        D = beta * KL(T || M) + (1 - beta) * KL(S || M),  M = beta T + (1 - beta) S

    (TRL / SDPO convention; beta 0: forward KL ``KL(T || S)``, 1: reverse KL ``KL(S || T)``). The
    student's log-probs at the teacher's ids and its tail come from one vocab-parallel pass over
    its logits (no vocabulary gather); as SDPO clamps the top-k log-mass at ``-1e-7``, both tail
    log-probabilities are floored at ``log(1 - exp(-1e-7))`` (~ -16.1). When k covers the whole
    vocabulary there is no tail: the full-vocabulary divergence. Gradient flows into the student
    logits only.

    Returns:
        ``[...]`` fp32 per-token divergence in nats, replicated on all TP ranks.
    """
    _check_logits_tensor("student_logits", student_logits)
    if tuple(teacher.ids.shape[:-1]) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"teacher top-k shape {tuple(teacher.ids.shape)} does not match student logits {tuple(student_logits.shape)}")
    beta = _check_beta(beta)
    want_tail = teacher.tail is not None
    ls, ls_tail = vocab_parallel_topk_tail_logprobs(student_logits, teacher.ids, tp_group, _check_temperature(temperature),
                                                    _check_chunk_size(chunk_size), want_tail)  # fmt: skip
    lt = teacher.logp.float()
    if want_tail:
        ls = torch.cat([ls, ls_tail.clamp(min=_TAIL_FLOOR).unsqueeze(-1)], dim=-1)
        lt = torch.cat([lt, teacher.tail.float().clamp(min=_TAIL_FLOOR).unsqueeze(-1)], dim=-1)
    return _generalized_jsd_small(lt, ls, beta)


def sdpo_token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, topk: int = 100, beta: float = 0.5,
                          tp_group=None, temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:  # fmt: skip
    """:func:`topk_divergence` over the teacher's top-``topk`` tokens of ``teacher_logits`` (the
    teacher's signal computed on the spot; the trainer keeps only :func:`teacher_topk`)."""
    _check_logits_tensor("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape {tuple(teacher_logits.shape)}")
    signal = teacher_topk(teacher_logits, topk, tp_group=tp_group, temperature=temperature, chunk_size=chunk_size)
    return topk_divergence(student_logits, signal, beta=beta, tp_group=tp_group, temperature=temperature, chunk_size=chunk_size)


def _check_logits_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name} must be a floating point tensor [..., V_local] with V_local > 0")
