"""Tests of the loss / advantage math: advantages, rlsd, losses.

Every function is compared with an independent, deliberately plain PyTorch
reference written here (float64, loops over groups / tokens, a literal reading
of Algorithm 1 and of the PPO objective).  The vocab-parallel divergences are
checked in-process (``tp_group=None``) and in one ``mp.spawn`` launch of two
gloo ranks (TP2 vs the full-vocabulary reference and vs TP1).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, write_worst_over_ranks

from megatron_rlsd.algorithms.advantages import group_advantages
from megatron_rlsd.algorithms.loss_modes import LOSS_MODES
from megatron_rlsd.algorithms.losses import (
    aggregate,
    opsd_token_divergence,
    policy_loss,
    sdpo_token_divergence,
    truncated_is_weights,
)
from megatron_rlsd.algorithms.rlsd import LambdaSchedule, rlsd_clip_fractions, rlsd_token_advantages
from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_generalized_jsd

ATOL = 1e-5  # fp32 implementation vs float64 reference
RTOL = 1e-5


def _close(actual, expected, what, rec=None, key=None, atol=ATOL, rtol=RTOL):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    if rec is not None:
        rec[key] = max(rec.get(key, 0.0), diff)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# =========================================================================== #
# group advantages
# =========================================================================== #
def ref_group_advantages(rewards, group_size, eps=1e-6):
    values = [float(r) for r in rewards]
    out = []
    for g in range(0, len(values), group_size):
        grp = values[g: g + group_size]
        mu, sd = statistics.mean(grp), statistics.stdev(grp)  # unbiased, as torch.std
        out += [(r - mu) / (sd + eps) for r in grp]
    return torch.tensor(out, dtype=torch.float64)


def test_group_advantages_matches_reference():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(32, generator=gen)
    rewards[8:16] = torch.randint(0, 2, (8,), generator=gen).float()  # binary group
    rewards[16:24] = 1.0  # all correct -> 0
    rewards[24:32] = 0.1  # identical but not exactly representable -> still exactly 0
    adv = group_advantages(rewards, 8)
    assert adv.shape == (32,) and adv.dtype == torch.float32
    _close(adv, ref_group_advantages(rewards, 8), "group_advantages", atol=1e-5)
    assert torch.equal(adv[16:32], torch.zeros(16))
    for g in range(2):  # mean 0, unbiased std ~1 in mixed groups
        grp = adv[8 * g: 8 * g + 8].double()
        assert abs(grp.mean().item()) < 1e-6 and abs(grp.std().item() - 1.0) < 1e-4
    # integer rewards and group_size 2
    adv2 = group_advantages(torch.tensor([1, 0, 0, 0, 3, 1]), 2)
    _close(adv2, ref_group_advantages([1, 0, 0, 0, 3, 1], 2), "group_advantages int", atol=1e-5)
    assert adv2[2] == 0 and adv2[3] == 0


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(10), 4)
    for bad in (1, 0, -2, 2.0, True):
        with pytest.raises(ValueError, match="group_size"):
            group_advantages(torch.zeros(8), bad)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)


# =========================================================================== #
# RLSD token advantages
# =========================================================================== #
def ref_rlsd_token_advantages(seq_adv, student_logp, teacher_logp, lam, eps_w):
    """Algorithm 1, literally: A_hat = A * ((1-lam) + lam * clip(w, 1-eps_w, 1+eps_w)), w = exp(sign(A) * Delta)."""
    a = seq_adv.double()
    delta = teacher_logp.double() - student_logp.double()
    w = torch.exp(torch.sign(a)[:, None] * delta)  # may be inf / 0 for huge |Delta|: clip handles both
    clipped = torch.clamp(w, 1 - eps_w, 1 + eps_w)
    return a[:, None] * ((1 - lam) + lam * clipped)


def _rlsd_inputs(seed=0, b=8, t=13):
    gen = torch.Generator().manual_seed(seed)
    seq_adv = torch.randn(b, generator=gen)
    seq_adv[1] = 0.0
    seq_adv[5] = 0.0
    seq_adv[2] = -abs(seq_adv[2])
    seq_adv[3] = abs(seq_adv[3])
    student = -torch.rand(b, t, generator=gen) * 5
    teacher = student + torch.randn(b, t, generator=gen) * 0.3  # mix of clipped / unclipped
    teacher[0, 0], teacher[0, 1] = student[0, 0] + 1e4, student[0, 1] - 1e4  # huge |Delta|
    teacher[1, 0], teacher[1, 1] = student[1, 0] + 1e4, student[1, 1] - 1e4  # ... on an A == 0 row
    teacher[2, 2], teacher[3, 3] = student[2, 2] - 1e4, student[3, 3] + 1e4
    return seq_adv, student, teacher


@pytest.mark.parametrize("lam", [0.5, 0.0, 1.0, 0.3])
@pytest.mark.parametrize("eps_w", [0.2, 0.05])
def test_rlsd_token_advantages_matches_reference(lam, eps_w):
    seq_adv, student, teacher = _rlsd_inputs()
    out = rlsd_token_advantages(seq_adv, student, teacher, lam, eps_w)
    ref = ref_rlsd_token_advantages(seq_adv, student, teacher, lam, eps_w)
    assert out.shape == student.shape and out.dtype == torch.float32
    _close(out, ref, f"rlsd lam={lam} eps_w={eps_w}", atol=1e-6, rtol=1e-6)
    # coverage: clipping happened at both ends (for A > 0 and A < 0 rows)
    w = torch.exp(torch.sign(seq_adv.double())[:, None] * (teacher.double() - student.double()))
    nz = seq_adv != 0
    assert ((w < 1 - eps_w) & nz[:, None]).any() and ((w > 1 + eps_w) & nz[:, None]).any()
    assert ((w > 1 - eps_w) & (w < 1 + eps_w) & nz[:, None]).any()
    # clipped tokens sit exactly on the bounds
    a = seq_adv[:, None].double().expand_as(w)
    lo, hi = w < 1 - eps_w, w > 1 + eps_w
    _close(out[lo], (a * ((1 - lam) + lam * (1 - eps_w)))[lo], "low clip", atol=1e-6, rtol=1e-6)
    _close(out[hi], (a * ((1 - lam) + lam * (1 + eps_w)))[hi], "high clip", atol=1e-6, rtol=1e-6)
    # sign(A_t) == sign(A), A == 0 rows stay exactly 0 (even with |Delta| = 1e4)
    assert torch.equal(torch.sign(out), torch.sign(seq_adv)[:, None].expand_as(out))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[5], torch.zeros_like(out[5]))
    if lam == 0.0:
        assert torch.equal(out, seq_adv[:, None].expand_as(out))


def test_rlsd_token_advantages_no_gradient():
    seq_adv, student, teacher = _rlsd_inputs(seed=1)
    seq_adv.requires_grad_()
    student.requires_grad_()
    teacher.requires_grad_()
    out = rlsd_token_advantages(seq_adv, student, teacher, 0.5, 0.2)
    assert not out.requires_grad and out.grad_fn is None
    # a policy loss built on it: the gradient reaches the policy log-probs only
    logp = (student.detach() + 0.05).requires_grad_()
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, _ = policy_loss(logp, student.detach(), out, mask, denominator=mask.sum().item())
    (loss + (out * logp).sum()).backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert teacher.grad is None and student.grad is None and seq_adv.grad is None


def test_rlsd_clip_fractions_matches_reference():
    seq_adv, student, teacher = _rlsd_inputs(seed=2)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(student.shape, generator=gen) > 0.2
    mask[0, :2] = True
    for eps_w in (0.2, 0.1):
        low, high = rlsd_clip_fractions(seq_adv, student, teacher, mask, eps_w)
        n_low = n_high = n_valid = 0
        for i in range(student.shape[0]):
            a = float(seq_adv[i])
            sgn = (a > 0) - (a < 0)
            for j in range(student.shape[1]):
                if not mask[i, j]:
                    continue
                n_valid += 1  # every valid token counts, A == 0 rows included (authors' metric)
                log_w = sgn * (float(teacher[i, j]) - float(student[i, j]))
                n_low += log_w < math.log(1 - eps_w)
                n_high += log_w > math.log(1 + eps_w)
        assert n_low > 0 and n_high > 0
        assert abs(low.item() - n_low / n_valid) < 1e-7 and abs(high.item() - n_high / n_valid) < 1e-7
    low, high = rlsd_clip_fractions(seq_adv, student, teacher, torch.zeros_like(mask), 0.2)
    assert low.item() == 0.0 and high.item() == 0.0


def test_rlsd_validation():
    seq_adv, student, teacher = _rlsd_inputs()
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eps_w"):
            rlsd_token_advantages(seq_adv, student, teacher, 0.5, bad)
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            rlsd_token_advantages(seq_adv, student, teacher, bad, 0.2)
    with pytest.raises(ValueError, match="teacher_logp shape"):
        rlsd_token_advantages(seq_adv, student, teacher[:, :-1], 0.5, 0.2)
    with pytest.raises(ValueError, match="seq_adv"):
        rlsd_token_advantages(seq_adv[:-1], student, teacher, 0.5, 0.2)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        rlsd_token_advantages(seq_adv, student[0], teacher[0], 0.5, 0.2)
    with pytest.raises(ValueError, match="mask"):
        rlsd_clip_fractions(seq_adv, student, teacher, torch.ones(3), 0.2)


def authors_lambda(step, lam0, warmup, decay):
    """The authors' opsd_trainer.py, read literally: global_step is incremented to 1 before the
    first update; warm-up ramps 0 -> lam0; the decay starts after it."""
    if warmup > 0 and step < warmup:
        return lam0 * (step / warmup)
    if decay > 0 and step >= warmup:
        return lam0 * max(1.0 - (step - warmup) / decay, 0.0)
    return lam0


def test_lambda_schedule_counts_steps_from_one_like_the_authors():
    sched = LambdaSchedule()
    assert (sched.lam0, sched.decay_steps, sched.warmup_steps) == (0.5, 50, 0)
    # the first update (step 1) already decays; lambda is 0 from step 50 on (paper: "over 50 steps")
    assert [sched.value(s) for s in (1, 25, 49, 50, 60)] == pytest.approx([0.49, 0.25, 0.01, 0.0, 0.0])
    for lam0, warmup, decay in ((0.5, 0, 50), (0.5, 0, 60), (0.4, 10, 20), (0.3, 0, 0), (0.3, 5, 0)):
        s = LambdaSchedule(lam0=lam0, decay_steps=decay, warmup_steps=warmup)
        assert [s.value(k) for k in range(1, 120)] == pytest.approx([authors_lambda(k, lam0, warmup, decay) for k in range(1, 120)])
    warm = LambdaSchedule(lam0=0.4, decay_steps=20, warmup_steps=10)
    assert [warm.value(s) for s in (1, 5, 10, 20, 30)] == pytest.approx([0.04, 0.2, 0.4, 0.2, 0.0])  # ramps up, then decays
    for kwargs in ({"lam0": 1.5}, {"lam0": -0.1}, {"decay_steps": -1}, {"warmup_steps": -1}, {"decay_steps": 2.5}):
        with pytest.raises(ValueError):
            LambdaSchedule(**kwargs)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="step"):
            sched.value(bad)


# =========================================================================== #
# aggregation and the policy loss
# =========================================================================== #
def ref_aggregate(per_token, mask, mode):
    """Plain global means over the WHOLE batch (loops over sequences)."""
    if mode == "token_mean":
        total, count = 0.0, 0
        for i in range(per_token.shape[0]):
            for j in range(per_token.shape[1]):
                if mask[i, j]:
                    total = total + per_token[i, j]
                    count += 1
        return total / count
    seq_means = []
    for i in range(per_token.shape[0]):
        toks = [per_token[i, j] for j in range(per_token.shape[1]) if mask[i, j]]
        if toks:
            seq_means.append(sum(toks) / len(toks))
    return sum(seq_means) / len(seq_means)


def ref_policy_loss(logp, old_logp, adv, mask, eps_low, eps_high, dual_clip, agg, is_weights=None):
    """The clipped surrogate (docs/algorithm.md) in float64 (dual clip as in verl / EasyR1)."""
    ratio = torch.exp(logp.double() - old_logp.double())
    a = adv.double()
    pg = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    if dual_clip is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -dual_clip * a), pg)
    if is_weights is not None:
        pg = pg * is_weights.double()
    return ref_aggregate(pg, mask, agg)


def _policy_inputs(seed=0, b=6, t=9):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 4
    logp = old + torch.randn(b, t, generator=gen) * 0.8  # ratios well beyond both clip bounds
    logp[0, 0], logp[1, 0] = old[0, 0] + 1.5, old[1, 0] + 1.5  # ratio ~4.5 > dual clip 3
    adv = torch.randn(b, t, generator=gen)
    adv[0], adv[1] = -abs(adv[0]), abs(adv[1])
    adv[2] = 0.0
    mask = torch.rand(b, t, generator=gen) > 0.25
    mask[0, 0] = mask[1, 0] = True
    mask[4] = False  # a sequence with no valid token
    mask[5, :2] = True
    return logp, old, adv, mask


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("dual_clip", [3.0, None])
@pytest.mark.parametrize("with_is", [False, True])
def test_policy_loss_matches_reference(agg, dual_clip, with_is):
    logp, old, adv, mask = _policy_inputs()
    # garbage at masked positions must not leak into value or gradient
    old_g = old.clone()
    old_g[~mask] = float("nan")
    adv_g = adv.clone()
    adv_g[~mask] = float("inf")
    is_w = truncated_is_weights(old, old + torch.randn(old.shape, generator=torch.Generator().manual_seed(9)) * 0.5)
    is_w = is_w if with_is else None
    denom = mask.sum().item() if agg == "token_mean" else int((mask.sum(1) > 0).sum())
    x = logp.clone().requires_grad_()
    loss, metrics = policy_loss(
        x, old_g, adv_g, mask, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, agg=agg,
        denominator=denom, is_weights=is_w,
    )  # fmt: skip
    xr = logp.double().requires_grad_()
    ref = ref_policy_loss(xr, old, adv, mask, 0.2, 0.28, dual_clip, agg, is_w)
    _close(loss.detach(), ref.detach(), f"policy_loss value ({agg}, dual={dual_clip})", atol=1e-6)
    loss.backward()
    ref.backward()
    _close(x.grad, xr.grad, f"policy_loss grad ({agg}, dual={dual_clip})", atol=1e-6)
    assert (x.grad[~mask] == 0).all()

    # metrics: masked means over this call's tokens
    ratio = torch.exp(logp.double() - old.double())
    a = adv.double()
    unclipped = -ratio * a
    clipped = -torch.clamp(ratio, 0.8, 1.28) * a
    m = mask
    clip_ref = ((clipped > unclipped) & m).sum().item() / m.sum().item()
    assert abs(metrics["clip_frac"].item() - clip_ref) < 1e-6
    # coverage: the ratio exceeded both bounds on clipped tokens
    assert ((ratio > 1.28) & (clipped > unclipped) & m).any() and ((ratio < 0.8) & (clipped > unclipped) & m).any()
    if dual_clip is None:
        assert metrics["dual_clip_frac"].item() == 0.0
    else:
        dual_ref = ((a < 0) & (torch.maximum(unclipped, clipped) > -dual_clip * a) & m).sum().item() / m.sum().item()
        assert dual_ref > 0 and abs(metrics["dual_clip_frac"].item() - dual_ref) < 1e-6
    kl_ref = (old.double() - logp.double())[m].mean().item()
    assert abs(metrics["approx_kl"].item() - kl_ref) < 1e-6
    assert all(not v.requires_grad for v in metrics.values())


def test_policy_loss_broadcast_sequence_advantage_is_grpo():
    logp, old, _, mask = _policy_inputs(seed=4)
    seq_adv = torch.randn(logp.shape[0], generator=torch.Generator().manual_seed(5))
    n = mask.sum().item()
    l1, _ = policy_loss(logp, old, seq_adv, mask, denominator=n)
    l2, _ = policy_loss(logp, old, seq_adv[:, None].expand_as(logp), mask, denominator=n)
    assert torch.equal(l1, l2)
    # lam == 0 RLSD is GRPO
    tok = rlsd_token_advantages(seq_adv, old, old + 1.0, 0.0, 0.2)
    l3, _ = policy_loss(logp, old, tok, mask, denominator=n)
    assert torch.equal(l1, l3)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_aggregate_micro_batch_contract(mode):
    """Summing micro-batch losses (global denominator) == the loss of the full batch."""
    gen = torch.Generator().manual_seed(6)
    per_token = torch.randn(10, 7, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.rand(10, 7, generator=gen) > 0.3
    mask[3] = False
    mask[7, 0] = True
    denom = mask.sum().item() if mode == "token_mean" else int((mask.sum(1) > 0).sum())
    full = aggregate(per_token, mask, mode, denom)
    # 2 "data-parallel ranks" x 2 uneven micro-batches each
    splits = [(0, 2), (2, 5), (5, 6), (6, 10)]
    summed = sum(aggregate(per_token[a:b], mask[a:b], mode, denom) for a, b in splits)
    ref = ref_aggregate(per_token, mask, mode)
    _close(full.detach(), ref.detach(), f"aggregate {mode} full", atol=1e-12)
    _close(summed.detach(), ref.detach(), f"aggregate {mode} summed", atol=1e-12)
    g_sum = torch.autograd.grad(summed, per_token)[0]
    g_ref = torch.autograd.grad(ref, per_token)[0]
    _close(g_sum, g_ref, f"aggregate {mode} grad", atol=1e-12)
    # the same holds for the policy loss itself
    logp, old, adv, pmask = _policy_inputs(seed=7, b=10)
    pdenom = pmask.sum().item() if mode == "token_mean" else int((pmask.sum(1) > 0).sum())
    whole, _ = policy_loss(logp, old, adv, pmask, agg=mode, denominator=pdenom)
    parts = sum(
        policy_loss(logp[a:b], old[a:b], adv[a:b], pmask[a:b], agg=mode, denominator=pdenom)[0] for a, b in splits
    )
    _close(parts, whole, f"policy_loss {mode} micro-batches", atol=1e-6)
    # a tensor denominator is accepted as is
    _close(aggregate(per_token, mask, mode, torch.tensor(float(denom))).detach(), full.detach(), "tensor denom")


def test_policy_loss_and_aggregate_validation():
    logp, old, adv, mask = _policy_inputs()
    n = mask.sum().item()
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate(logp, mask, "sum", n)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="denominator"):
            aggregate(logp, mask, "token_mean", bad)
    with pytest.raises(ValueError, match="mask"):
        aggregate(logp, mask[:, :-1], "token_mean", n)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=1.0, denominator=n)
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(logp, old, adv, mask, eps_low=1.0, denominator=n)
    with pytest.raises(ValueError, match="token_adv"):
        policy_loss(logp, old, adv[:, :-1], mask, denominator=n)
    with pytest.raises(ValueError, match="old_logp shape"):
        policy_loss(logp, old[:-1], adv, mask, denominator=n)
    with pytest.raises(ValueError, match="aggregation mode"):
        policy_loss(logp, old, adv, mask, agg="seq_sum", denominator=n)
    with pytest.raises(TypeError):
        policy_loss(logp, old, adv, mask)  # denominator is required


def test_truncated_is_weights():
    gen = torch.Generator().manual_seed(8)
    old = (-torch.rand(4, 6, generator=gen) * 3).requires_grad_()
    roll = old.detach() + torch.randn(4, 6, generator=gen)
    roll[0, 0] = old[0, 0].item() - 1e4  # would overflow exp
    w = truncated_is_weights(old, roll, cap=2.0)
    ref = torch.clamp(torch.exp(old.detach().double() - roll.double()), max=2.0)
    _close(w, ref, "truncated IS", atol=1e-6)
    assert not w.requires_grad and w.max().item() <= 2.0 and w[0, 0].item() == 2.0
    assert (w < 2.0).any()
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, roll, cap=0.0)


def test_loss_mode_table():
    """The registry config validation reads; each mode says what it needs from the step."""
    from megatron_rlsd.config import AlgorithmConfig
    from megatron_rlsd.algorithms import make_loss_mode

    assert list(LOSS_MODES) == ["rlsd", "grpo", "opsd", "grpo_opsd", "sdpo", "rlrt", "antisd", "egrsd"]
    needs = {name: (m.teacher_pass, m.teacher_logits, m.teacher_entropy) for name, m in LOSS_MODES.items()}
    assert needs == {"rlsd": (True, False, False), "grpo": (False, False, False), "opsd": (True, True, False),
                     "grpo_opsd": (True, True, False), "sdpo": (True, True, False), "rlrt": (True, False, False),
                     "antisd": (True, False, True), "egrsd": (True, False, True)}  # fmt: skip
    adv = torch.tensor([1.0, -1.0])
    lp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for name in LOSS_MODES:
        mode = make_loss_mode(AlgorithmConfig(loss_mode=name))
        credit, _ = mode.token_credit(1, adv, lp, lp + 0.1, mask, correct=adv > 0, teacher_entropy=lp, vocab_size=8)
        if name in ("opsd", "sdpo"):
            assert credit is None
        else:  # Delta = 0.1 < log(1.2): no clipping, |credit| > |A| for A > 0 only under rlsd
            assert credit.shape == (2, 3) and torch.equal(torch.sign(credit), torch.sign(adv)[:, None].expand(2, 3))
    rlsd = make_loss_mode(AlgorithmConfig(loss_mode="rlsd"))
    assert rlsd.lam(1) == pytest.approx(0.49) and make_loss_mode(AlgorithmConfig(loss_mode="grpo")).lam(1) == 0.0


# =========================================================================== #
# self-distillation divergences (full-vocabulary references)
# =========================================================================== #
LEAD = (3, 7)
V = 96  # V_local = 48 at TP2
BETAS = (0.5, 0.3, 0.0, 1.0)
TOPKS = (1, 5, 20, 48, 60, 96, 200)  # 60 > V_local at TP2; 96 == V; 200 > V


def ref_categorical_jsd(pt, ps, beta):
    """Generalized JSD between two probability vectors (TRL / SDPO convention), float64."""
    if beta == 0.0:
        return (pt * (pt.log() - ps.log())).sum()
    if beta == 1.0:
        return (ps * (ps.log() - pt.log())).sum()
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (pt.log() - m.log())).sum() + (1 - beta) * (ps * (ps.log() - m.log())).sum()


def ref_opsd(teacher, student, divergence, beta, temperature):
    t = teacher.double().detach().reshape(-1, teacher.shape[-1])
    s = student.double().reshape(-1, student.shape[-1])
    out = []
    for i in range(t.shape[0]):
        pt = torch.softmax(t[i] / temperature, -1)
        ps = torch.softmax(s[i] / temperature, -1)
        if divergence == "jsd":
            out.append(ref_categorical_jsd(pt, ps, beta))
        elif divergence == "forward_kl":
            out.append(ref_categorical_jsd(pt, ps, 0.0))
        else:
            out.append(ref_categorical_jsd(pt, ps, 1.0))
    return torch.stack(out).reshape(student.shape[:-1])


def ref_sdpo(teacher, student, topk, beta, temperature):
    """The teacher's top-k + tail bucket, tail mass summed directly over the other tokens."""
    t = teacher.double().detach().reshape(-1, teacher.shape[-1])
    s = student.double().reshape(-1, student.shape[-1])
    out = []
    for i in range(t.shape[0]):
        pt = torch.softmax(t[i] / temperature, -1)
        ps = torch.softmax(s[i] / temperature, -1)
        order = torch.argsort(t[i], descending=True)
        top, rest = order[:topk], order[topk:]
        cat_t, cat_s = pt[top], ps[top]
        if len(rest) > 0:
            cat_t = torch.cat([cat_t, pt[rest].sum().reshape(1)])
            cat_s = torch.cat([cat_s, ps[rest].sum().reshape(1)])
        out.append(ref_categorical_jsd(cat_t, cat_s, beta))
    return torch.stack(out).reshape(student.shape[:-1])


def _divergence_cases():
    cases = [("opsd", dict(divergence="jsd", beta=b)) for b in BETAS]
    cases += [("opsd", dict(divergence="forward_kl")), ("opsd", dict(divergence="reverse_kl"))]
    cases += [("sdpo", dict(topk=k, beta=0.5)) for k in TOPKS]
    cases += [("sdpo", dict(topk=20, beta=b)) for b in BETAS[1:]]
    return cases


def _call(kind, student, teacher, kwargs, tp_group, temperature):
    if kind == "opsd":
        return opsd_token_divergence(student, teacher, tp_group=tp_group, temperature=temperature, **kwargs)
    return sdpo_token_divergence(student, teacher, tp_group=tp_group, temperature=temperature, **kwargs)


def _ref(kind, student, teacher, kwargs, temperature):
    if kind == "opsd":
        return ref_opsd(teacher, student, kwargs["divergence"], kwargs.get("beta", 0.5), temperature)
    return ref_sdpo(teacher, student, kwargs["topk"], kwargs["beta"], temperature)


def run_divergence_checks(tp_group, rank, world, rec):
    """Every divergence case vs its float64 reference (values and student grads,
    no teacher grad); with ``world > 1`` also vs the same call on the full
    vocabulary with ``tp_group=None`` (TP == TP1)."""
    v_local = V // world
    gen = torch.Generator().manual_seed(1234)  # identical inputs on every rank
    for scale, temperature in ((3.0, 0.7), (2.0, 1.0)):
        s_full = torch.randn(*LEAD, V, generator=gen) * scale
        t_full = 0.6 * s_full + 0.8 * torch.randn(*LEAD, V, generator=gen) * scale
        upstream = torch.randn(*LEAD, generator=gen)
        for kind, kwargs in _divergence_cases():
            tag = f"{kind}{kwargs},scale={scale},T={temperature},tp={world}"
            student = s_full.narrow(-1, rank * v_local, v_local).clone().requires_grad_()
            teacher = t_full.narrow(-1, rank * v_local, v_local).clone().requires_grad_()
            out = _call(kind, student, teacher, kwargs, tp_group, temperature)
            assert out.dtype == torch.float32 and out.shape == LEAD, tag
            (out * upstream).sum().backward()
            assert teacher.grad is None, f"{tag}: gradient reached the teacher"

            s_ref = s_full.double().requires_grad_()
            ref = _ref(kind, s_ref, t_full, kwargs, temperature)
            (ref * upstream.double()).sum().backward()
            _close(out.detach(), ref.detach(), f"{tag} value", rec, f"{kind}/value_vs_ref")
            _close(student.grad, s_ref.grad.narrow(-1, rank * v_local, v_local), f"{tag} grad", rec,
                   f"{kind}/grad_vs_ref")  # fmt: skip

            if world > 1:
                s1 = s_full.clone().requires_grad_()
                out1 = _call(kind, s1, t_full, kwargs, None, temperature)
                (out1 * upstream).sum().backward()
                _close(out.detach(), out1.detach(), f"{tag} TP vs TP1 value", rec, f"{kind}/tp_vs_tp1_value")
                _close(student.grad, s1.grad.narrow(-1, rank * v_local, v_local), f"{tag} TP vs TP1 grad", rec,
                       f"{kind}/tp_vs_tp1_grad")  # fmt: skip



def _tp_worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        rec = {}
        run_divergence_checks(group, rank, world, rec)
        write_worst_over_ranks(rec, group, rank, world, out_path)
    finally:
        dist.destroy_process_group()


def _print_diffs(title, diffs):
    print(f"\n{title}")
    for k, v in sorted(diffs.items()):
        print(f"  {k:28s} {v:.3e}")


def test_divergences_tp1_match_reference():
    rec = {}
    run_divergence_checks(None, 0, 1, rec)
    _print_diffs("TP1 (tp_group=None) max abs diffs:", rec)


def test_divergences_tp2_match_reference_and_tp1(tmp_path):
    out_path = str(tmp_path / "diffs_tp2.json")
    t0 = time.time()
    mp.spawn(_tp_worker, args=(2, free_port(), out_path), nprocs=2, join=True)
    with open(out_path) as f:
        diffs = json.load(f)
    _print_diffs(f"TP2 max abs diffs ({time.time() - t0:.1f}s):", diffs)
    assert {"sdpo/tp_vs_tp1_grad", "opsd/tp_vs_tp1_grad", "sdpo/grad_vs_ref"} <= set(diffs)


def test_sdpo_full_vocab_equals_full_jsd_and_is_stable():
    gen = torch.Generator().manual_seed(11)
    s = torch.randn(2, 5, 32, generator=gen) * 3
    t = torch.randn(2, 5, 32, generator=gen) * 3
    for beta in (0.5, 0.0, 1.0):
        full = vocab_parallel_generalized_jsd(t, s, beta)
        for k in (32, 1000):
            _close(sdpo_token_divergence(s, t, topk=k, beta=beta), full, f"sdpo k={k} beta={beta}", atol=1e-5)
    # very peaked logits: top-k mass rounds to 1 in fp32; the tail stays finite
    for scale in (1e3, 1e5):
        sp = (torch.randn(2, 5, 32, generator=gen) * scale).requires_grad_()
        tp = torch.randn(2, 5, 32, generator=gen) * scale
        out = sdpo_token_divergence(sp, tp, topk=4)
        out.sum().backward()
        assert torch.isfinite(out).all() and (out >= -1e-6).all() and torch.isfinite(sp.grad).all()
    # chunking over tokens (3 rows, not dividing 10) changes nothing but summation order
    outs, grads = [], []
    for chunk in (3, 4096):
        sc = s.clone().requires_grad_()
        out = sdpo_token_divergence(sc, t, topk=5, beta=0.0, temperature=0.8, chunk_size=chunk)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(sc.grad)
    _close(outs[0], outs[1], "sdpo chunked value", atol=1e-6)
    _close(grads[0], grads[1], "sdpo chunked grad", atol=1e-6)
    # masked (-inf) vocabulary entries have zero probability
    sm = torch.randn(2, 5, 32, generator=gen) * 3
    tm = torch.randn(2, 5, 32, generator=gen) * 3
    sm[..., 16:] = float("-inf")
    tm[..., 16:] = float("-inf")
    for k in (4, 16, 20):
        smg = sm.clone().requires_grad_()
        out = sdpo_token_divergence(smg, tm, topk=k, beta=0.5)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(smg.grad).all() and (smg.grad[..., 16:] == 0).all()
        if k == 4:
            _close(out, ref_sdpo(tm[..., :16], sm[..., :16], 4, 0.5, 1.0), "sdpo -inf logits", atol=1e-5)
    # bf16 logits: fp32 result, bf16 gradient
    sb = (torch.randn(3, 32, generator=gen) * 2).to(torch.bfloat16).requires_grad_()
    tb = (torch.randn(3, 32, generator=gen) * 2).to(torch.bfloat16)
    out = sdpo_token_divergence(sb, tb, topk=8)
    out.sum().backward()
    assert out.dtype == torch.float32 and sb.grad.dtype == torch.bfloat16
    _close(out, ref_sdpo(tb.float(), sb.detach().float(), 8, 0.5, 1.0), "sdpo bf16", atol=1e-5)


def test_divergence_validation():
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown divergence"):
        opsd_token_divergence(s, t, divergence="tv")
    with pytest.raises(ValueError, match="beta"):
        opsd_token_divergence(s, t, beta=1.5)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="topk"):
            sdpo_token_divergence(s, t, topk=bad)
    with pytest.raises(ValueError, match="beta"):
        sdpo_token_divergence(s, t, beta=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        sdpo_token_divergence(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        sdpo_token_divergence(s, torch.randn(2, 9))
