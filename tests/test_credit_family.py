"""The self-distilled credit family (RLSD's negative_only, RLRT, AntiSD, EGRSD) against plain
float64 readings of their papers, written here token by token with Python's math module, on
grids that include A = 0, huge |Delta|, both clip ends and the gates on and off; the loss modes
built on them; and, in one spawn of two gloo ranks, every mode's credit from TP2 vocab-parallel
log-probs and teacher entropy equal to TP1's.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from megatron_rlsd.algorithms.credit import (
    AntiSDGate,
    antisd_token_advantages,
    egrsd_token_advantages,
    rlrt_token_advantages,
)
from megatron_rlsd.algorithms.loss_modes import make_loss_mode
from megatron_rlsd.algorithms.rlsd import rlsd_clip_fractions, rlsd_token_advantages
from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs_and_entropy
from megatron_rlsd.config import AlgorithmConfig

# Delta = t - s per column: inside the clip band, both clip ends, huge both ways
DELTAS = [0.0, 0.05, -0.1, 0.5, -0.5, 3.0, -3.0, 1e4, -1e4]
ADVS = [1.2, 0.7, 0.0, -0.4, -1.5]  # A > 0, A = 0, A < 0


def _grid():
    s = torch.tensor([[-1.0 - 0.1 * j for j in range(len(DELTAS))] for _ in ADVS], dtype=torch.float64)
    t = s + torch.tensor(DELTAS, dtype=torch.float64)
    return torch.tensor(ADVS, dtype=torch.float64), s.float(), t.float(), s, t


def sign(x):
    return (x > 0) - (x < 0)


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def ref_rlsd(a, s, t, lam, eps, negative_only):
    """Paper Eq. 13-15 (mixed as the authors' code), ms-swift's negative_only: A >= 0 keeps A."""
    if negative_only and a >= 0:
        return a
    w = math.exp(clip(sign(a) * (t - s), -700, 700))
    return a * ((1 - lam) + lam * clip(w, 1 - eps, 1 + eps))


def ref_rlrt(a, s, t, correct, lam, eps):
    """RLRT: w = (P_S / P_T)^sign(A), only on correct rollouts."""
    if not correct:
        return a
    w = math.exp(clip(sign(a) * (s - t), -700, 700))
    return a * ((1 - lam) + lam * clip(w, 1 - eps, 1 + eps))


def ref_antisd(a, s, t, lam):
    """AntiSD Eq. 6 / Algorithm 1: A - lam * (softplus(u) - log 2) / 2, u = t - s."""
    u = t - s
    softplus = u + math.log1p(math.exp(-u)) if u > 0 else math.log1p(math.exp(u))
    return a - lam * 0.5 * (softplus - math.log(2))


def ref_egrsd(a, s, t, h, vocab, lam, eps, floor):
    w = math.exp(clip(sign(a) * (t - s), -700, 700))
    gate = max(floor, 1 - h / math.log(vocab))
    return a * ((1 - lam) + lam * clip(w, 1 - eps, 1 + eps) * gate)


def _check(out, ref_fn):
    a, s32, t32, s, t = _grid()
    assert out.dtype == torch.float32 and out.shape == s.shape and not out.requires_grad
    for i in range(len(ADVS)):
        for j in range(len(DELTAS)):
            want = ref_fn(i, j, float(a[i]), float(s32[i, j]), float(t32[i, j]))
            assert math.isfinite(float(out[i, j])), (i, j)
            assert float(out[i, j]) == pytest.approx(want, rel=1e-5, abs=1e-6), (i, j, ADVS[i], DELTAS[j])


@pytest.mark.parametrize("negative_only", [False, True])
@pytest.mark.parametrize("lam,eps", [(0.5, 0.2), (1.0, 0.2), (0.3, 0.5)])
def test_rlsd_and_negative_only(lam, eps, negative_only):
    a, s, t, *_ = _grid()
    out = rlsd_token_advantages(a.float(), s, t, lam, eps, negative_only)
    _check(out, lambda i, j, av, sv, tv: ref_rlsd(av, sv, tv, lam, eps, negative_only))
    if negative_only:  # accepted rollouts are plain GRPO; only A < 0 rows can be clipped
        assert torch.equal(out[:2], a[:2, None].float().expand(2, len(DELTAS)))
        low, high = rlsd_clip_fractions(a.float(), s, t, torch.ones_like(s, dtype=torch.bool), eps, True)
        n = out.numel()
        assert float(low) == pytest.approx(sum(1 for av in ADVS if av < 0 for d in DELTAS if -d < math.log1p(-eps)) / n)
        assert float(high) == pytest.approx(sum(1 for av in ADVS if av < 0 for d in DELTAS if -d > math.log1p(eps)) / n)


@pytest.mark.parametrize("lam,eps", [(0.5, 1.0), (0.5, 0.2), (1.0, 0.5)])
def test_rlrt(lam, eps):
    a, s, t, *_ = _grid()
    correct = torch.tensor([True, False, True, False, True])  # a correct rollout with A < 0 too
    out = rlrt_token_advantages(a.float(), s, t, correct, lam, eps)
    _check(out, lambda i, j, av, sv, tv: ref_rlrt(av, sv, tv, bool(correct[i]), lam, eps))
    # the reversal: where RLSD raises a correct token's credit, RLRT lowers it (inside the band)
    rlsd = rlsd_token_advantages(a.float(), s, t, lam, min(eps, 0.99))
    assert (out[0, 1] < a[0]) and (rlsd[0, 1] > a[0])


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_antisd(lam):
    a, s, t, *_ = _grid()
    out = antisd_token_advantages(a.float(), s, t, lam)
    _check(out, lambda i, j, av, sv, tv: ref_antisd(av, sv, tv, lam))
    if lam:  # bounded bonus (log(2)/2 * lam at most) where the teacher disagrees; A = 0 rows move
        assert float((out - a[:, None].float()).max()) <= lam * math.log(2) / 2 + 1e-6
        assert float(out[2].abs().max()) > 0


@pytest.mark.parametrize("floor", [0.1, 0.5, 1.0])
def test_egrsd(floor):
    a, s, t, *_ = _grid()
    vocab = 1000
    # teacher entropy from 0 (gate 1) to log V (gate at its floor), per column
    h = torch.linspace(0, math.log(vocab), len(DELTAS)).expand(len(ADVS), -1).contiguous()
    out = egrsd_token_advantages(a.float(), s, t, h, vocab, 0.5, 0.2, floor)
    _check(out, lambda i, j, av, sv, tv: ref_egrsd(av, sv, tv, float(h[i, j]), vocab, 0.5, 0.2, floor))
    if floor == 1.0:  # the gate never bites: RLSD exactly
        assert torch.allclose(out, rlsd_token_advantages(a.float(), s, t, 0.5, 0.2))


def ref_gate(hs, lam_max, warmup, ratio):
    """AntiSD Eq. 7: lam = 0 for W calibration steps; then open; close below ratio * H_warm,
    reopen at H >= H_warm."""
    lams, g, warm = [], None, []
    for h in hs:
        if g is None:
            warm.append(h)
            lams.append(0.0)
            if len(warm) == warmup:
                g, h_warm = 1, statistics.median(warm)
            continue
        if g == 1 and h < ratio * h_warm:
            g = 0
        elif g == 0 and h >= h_warm:
            g = 1
        lams.append(g * lam_max)
    return lams


def test_antisd_gate_and_its_state():
    hs = [2.0, 2.2, 1.8, 2.1, 1.9, 2.0, 1.9, 1.85, 1.5, 1.9, 2.05, 2.0, 1.0, 2.5]
    gate = AntiSDGate(0.5, 5, 0.93)
    got = [gate.step(h) for h in hs]
    assert got == ref_gate(hs, 0.5, 5, 0.93)
    assert got[5] == 0.5 and got[8] == 0.0 and got[9] == 0.0 and got[10] == 0.5  # closes, then reopens at H_warm
    again = AntiSDGate(0.5, 5, 0.93)
    for h in hs[:9]:
        again.step(h)
    resumed = AntiSDGate(0.5, 5, 0.93)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert [resumed.step(h) for h in hs[9:]] == got[9:]


def test_loss_modes_of_the_family():
    a, s, t, *_ = _grid()
    a = a.float()
    mask = torch.ones_like(s, dtype=torch.bool)
    correct = a > 0
    h = torch.full_like(s, 0.5)
    for name, ref in (("rlrt", lambda: rlrt_token_advantages(a, s, t, correct, 0.49, 0.2)),
                      ("egrsd", lambda: egrsd_token_advantages(a, s, t, h, 64, 0.49, 0.2, 0.1))):  # fmt: skip
        mode = make_loss_mode(AlgorithmConfig(loss_mode=name))
        credit, metrics = mode.token_credit(1, a, s, t, mask, correct=correct, teacher_entropy=h, vocab_size=64)
        assert torch.equal(credit, ref()), name
        assert 0 < float(metrics["clip_low"]) + float(metrics["clip_high"]) < 1, (name, metrics)
    mode = make_loss_mode(AlgorithmConfig(loss_mode="antisd", antisd_warmup_steps=1))
    mode.begin_step(1.0)  # calibration: lam 0
    credit, metrics = mode.token_credit(1, a, s, t, mask)
    assert torch.equal(credit, a[:, None].expand_as(s)) and float(metrics["sign_flipped"]) == 0
    mode.begin_step(1.0)  # open
    credit, metrics = mode.token_credit(2, a, s, t, mask)
    assert mode.lam(2) == 0.5 and torch.equal(credit, antisd_token_advantages(a, s, t, 0.5))
    assert 0 < float(metrics["sign_flipped"]) < 1 and float(metrics["gate_open"]) == 1.0
    state = mode.state_dict()
    other = make_loss_mode(AlgorithmConfig(loss_mode="antisd", antisd_warmup_steps=1))
    other.load_state_dict(state)
    assert other.lam(3) == 0.5 and other.state_dict() == state
    fresh = make_loss_mode(AlgorithmConfig(loss_mode="antisd"))
    fresh.load_state_dict({})  # resuming another mode's checkpoint: the gate starts calibrating
    assert fresh.state_dict() == {"gate": {"warm": [], "h_warm": None, "open": False}, "lam": 0.0}


def test_validation():
    a, s, t, *_ = _grid()
    with pytest.raises(ValueError, match="correct"):
        rlrt_token_advantages(a.float(), s, t, torch.ones(3, dtype=torch.bool), 0.5, 0.2)
    with pytest.raises(ValueError, match="eps_w"):
        rlrt_token_advantages(a.float(), s, t, a > 0, 0.5, 1.5)
    with pytest.raises(ValueError, match="teacher_entropy"):
        egrsd_token_advantages(a.float(), s, t, torch.zeros(2), 10, 0.5, 0.2, 0.1)
    with pytest.raises(ValueError, match="floor"):
        egrsd_token_advantages(a.float(), s, t, torch.zeros_like(s), 10, 0.5, 0.2, 0.0)


# ----------------------------------------------------------------------- TP2 == TP1
B, R, V = 5, 6, 64


def _credits(tp_group, rank, world):
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(B, R, V, generator=gen) * 2
    teacher = student + torch.randn(B, R, V, generator=gen)
    ids = torch.randint(0, V, (B, R), generator=gen)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.5])
    correct = adv > 0
    v = V // world
    part = slice(rank * v, (rank + 1) * v)
    s, _ = vocab_parallel_logprobs_and_entropy(student[..., part], ids, tp_group=tp_group, temperature=0.7)
    t, h = vocab_parallel_logprobs_and_entropy(teacher[..., part], ids, tp_group=tp_group, temperature=0.7)
    mask = torch.ones(B, R, dtype=torch.bool)
    out = {}
    for name in ("rlsd", "rlrt", "antisd", "egrsd"):
        mode = make_loss_mode(AlgorithmConfig(loss_mode=name, antisd_warmup_steps=1, negative_only=name == "rlsd"))
        mode.begin_step(1.0)
        mode.begin_step(1.0)
        credit, _ = mode.token_credit(3, adv, s, t, mask, correct=correct, teacher_entropy=h, vocab_size=v * world)
        out[name] = credit.tolist()
    return out


def _tp_worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got = _credits(dist.new_group(list(range(world))), rank, world)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(got, f)
    finally:
        dist.destroy_process_group()


def test_credit_at_tp2_equals_tp1(tmp_path):
    out_path = tmp_path / "tp2.json"
    mp.spawn(_tp_worker, args=(2, free_port(), str(out_path)), nprocs=2, join=True)
    tp2 = json.loads(out_path.read_text())
    tp1 = _credits(None, 0, 1)
    for name, credit in tp1.items():
        diff = (torch.tensor(tp2[name]) - torch.tensor(credit)).abs().max().item()
        print(f"{name}: TP2 vs TP1 max |diff| {diff:.2e}")
        assert diff <= 1e-5, name
