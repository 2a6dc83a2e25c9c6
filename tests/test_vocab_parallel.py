"""Numerical tests for megatron_rlsd.algorithms.vocab_parallel.

The sharded functions are checked against a plain full-vocabulary PyTorch
reference (log_softmax / softmax / F.kl_div on the unsharded logits), values
and gradients, both in-process (``tp_group=None``) and in gloo process groups
of size 2 and 4 launched with ``torch.multiprocessing.spawn``.  Every spawned
launch runs all checks of all functions; an assertion in any child propagates
to the parent as an exception from ``mp.spawn`` and fails the test.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port, write_worst_over_ranks

from megatron_rlsd.algorithms.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_generalized_jsd,
    vocab_parallel_kl,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)

ATOL = 1e-5
RTOL = 1e-5
LEAD = (3, 7)  # [B, T] -> 21 tokens
V = 96  # divisible by 1, 2, 4
SMALL_CHUNK = 8  # < 21 and does not divide it (chunks of 8, 8, 5)
BETAS = (0.0, 0.5, 0.3, 1.0)


# --------------------------------------------------------------------------- #
# full-vocabulary references
# --------------------------------------------------------------------------- #
def ref_logprobs(x, tgt, temperature=1.0):
    return torch.log_softmax(x.float() / temperature, -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)


def ref_entropy(x, temperature=1.0):
    lp = torch.log_softmax(x.float() / temperature, -1)
    return -(torch.softmax(x.float() / temperature, -1) * lp).sum(-1)


def ref_kl(p, q, temperature=1.0):
    lp = torch.log_softmax(p.float() / temperature, -1)
    lq = torch.log_softmax(q.float() / temperature, -1)
    return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)


def ref_jsd(t, s, beta, temperature=1.0):
    lt = torch.log_softmax(t.float() / temperature, -1)
    ls = torch.log_softmax(s.float() / temperature, -1)
    if beta == 0:
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=torch.float32)
    lm = torch.logsumexp(torch.stack([lt + torch.log(b), ls + torch.log(1 - b)]), dim=0)
    kl_t = F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


# --------------------------------------------------------------------------- #
# comparison machinery
# --------------------------------------------------------------------------- #
def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _close(actual, expected, what, rec, key, atol=ATOL, rtol=RTOL):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    rec[key] = max(rec.get(key, 0.0), diff)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def run_case(name, vp_fn, ref_fn, full_inputs, grad_mask, upstream, shard, rec, tag, atol=ATOL, key=""):
    """Compare ``vp_fn(*local shards)`` with ``ref_fn(*full inputs)``.

    ``grad_mask[i]``: whether input i requires grad.  ``upstream``: one random
    upstream gradient per output (``None`` = that output is not used in the loss).
    Returns the local outputs and gradients for cross-chunk comparisons.
    """
    local = [shard(x).clone().requires_grad_(m) for x, m in zip(full_inputs, grad_mask)]
    before = [t.detach().clone() for t in local]
    outs = _as_tuple(vp_fn(*local))
    for t, b in zip(local, before):
        assert torch.equal(t.detach(), b), f"{name}[{tag}]: input logits mutated by forward"

    full = [x.clone().requires_grad_(m) for x, m in zip(full_inputs, grad_mask)]
    refs = _as_tuple(ref_fn(*full))
    assert len(outs) == len(refs) == len(upstream)
    for i, (o, r) in enumerate(zip(outs, refs)):
        _close(o.detach(), r.detach(), f"{name}[{tag}] output {i}", rec, f"{key}{name}/value", atol=atol)

    loss = sum((o * g).sum() for o, g in zip(outs, upstream) if g is not None)
    ref_loss = sum((r * g).sum() for r, g in zip(refs, upstream) if g is not None)
    loss.backward()
    ref_loss.backward()
    grads = []
    for i, (t, f, m) in enumerate(zip(local, full, grad_mask)):
        if not m:
            assert t.grad is None
            grads.append(None)
            continue
        assert t.grad is not None, f"{name}[{tag}]: missing grad for input {i}"
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
        _close(t.grad, shard(f.grad), f"{name}[{tag}] grad of input {i}", rec, f"{key}{name}/grad", atol=atol)
        grads.append(t.grad)
    for t, b in zip(local, before):
        assert torch.equal(t.detach(), b), f"{name}[{tag}]: input logits mutated by backward"
    return [o.detach() for o in outs], grads


# (scale of the logits, temperature, chunk sizes, run the extra variants, atol)
# The first config also compares chunked (8 rows, not dividing 21 tokens) with
# unchunked (4096 rows) results.  The last one uses large-magnitude logits
# (|logits / T| up to ~150): there fp32 rounding of the logits alone moves
# KL values / grads by ~1e-5 (torch's own fp32 reference differs from an fp64
# one by the same ~1.5e-5), so the absolute tolerance is 5e-5 instead of 1e-5.
LARGE_ATOL = 5e-5
FULL_CONFIGS = ((3.0, 0.7, (SMALL_CHUNK, 4096), True, ATOL), (3.0, 1.0, (4096,), False, ATOL),
                (50.0, 1.3, (SMALL_CHUNK,), False, LARGE_ATOL))


def run_all_checks(tp_group, rank, world, rec, configs=FULL_CONFIGS):
    """All functions, values + grads, chunked / unchunked, several temperatures."""
    v_local = V // world

    def shard(x):
        return x.narrow(-1, rank * v_local, v_local)

    gen = torch.Generator().manual_seed(1234)  # identical inputs on every rank
    for scale, T, chunks, extras, atol in configs:
        key = "" if atol == ATOL else "large_logits:"
        x = torch.randn(*LEAD, V, generator=gen) * scale
        y = torch.randn(*LEAD, V, generator=gen) * scale
        # y correlated with x so KL / JSD are not dominated by huge values
        y = 0.5 * x + 0.5 * y
        tgt = torch.randint(0, V, LEAD, generator=gen)
        tgt[0, 0], tgt[0, 1], tgt[1, 0] = 0, V - 1, v_local % V  # shard edges
        g1 = torch.randn(*LEAD, generator=gen)
        g2 = torch.randn(*LEAD, generator=gen)
        cases = [
            ("logprobs", lambda c: (lambda a: vocab_parallel_logprobs(a, tgt, tp_group, T, c)),
             lambda a: ref_logprobs(a, tgt, T), [x], [True], [g1]),
            ("entropy", lambda c: (lambda a: vocab_parallel_entropy(a, tp_group, T, c)),
             lambda a: ref_entropy(a, T), [x], [True], [g1]),
            ("logprobs_and_entropy",
             lambda c: (lambda a: vocab_parallel_logprobs_and_entropy(a, tgt, tp_group, T, c)),
             lambda a: (ref_logprobs(a, tgt, T), ref_entropy(a, T)), [x], [True], [g1, g2]),
            ("kl", lambda c: (lambda p, q: vocab_parallel_kl(p, q, tp_group, T, c)),
             lambda p, q: ref_kl(p, q, T), [x, y], [True, True], [g1]),
        ]
        if extras:
            cases += [
                ("logprobs_and_entropy[ent only]",
                 lambda c: (lambda a: vocab_parallel_logprobs_and_entropy(a, tgt, tp_group, T, c)),
                 lambda a: (ref_logprobs(a, tgt, T), ref_entropy(a, T)), [x], [True], [None, g2]),
                ("logprobs_and_entropy[lp only]",
                 lambda c: (lambda a: vocab_parallel_logprobs_and_entropy(a, tgt, tp_group, T, c)),
                 lambda a: (ref_logprobs(a, tgt, T), ref_entropy(a, T)), [x], [True], [g1, None]),
                ("kl[p detached]", lambda c: (lambda p, q: vocab_parallel_kl(p, q, tp_group, T, c)),
                 lambda p, q: ref_kl(p, q, T), [x, y], [False, True], [g1]),
                ("jsd[beta=0.3,teacher detached]",
                 lambda c: (lambda t, s: vocab_parallel_generalized_jsd(t, s, 0.3, tp_group, T, c)),
                 lambda t, s: ref_jsd(t, s, 0.3, T), [x, y], [False, True], [g1]),
            ]
        for beta in BETAS:
            cases.append(
                (f"jsd[beta={beta}]",
                 lambda c, beta=beta: (lambda t, s: vocab_parallel_generalized_jsd(t, s, beta, tp_group, T, c)),
                 lambda t, s, beta=beta: ref_jsd(t, s, beta, T), [x, y], [True, True], [g1]),
            )
        for name, make_fn, ref_fn, inputs, mask, up in cases:
            tag = f"scale={scale},T={T},tp={world}"
            results = [
                run_case(name, make_fn(c), ref_fn, inputs, mask, up, shard, rec, f"{tag},chunk={c}", atol, key)
                for c in chunks
            ]
            for (o_a, g_a), (o_b, g_b) in zip(results, results[1:]):
                for a, b in zip(o_a + g_a, o_b + g_b):
                    if a is None:
                        continue
                    diff = (a - b).abs().max().item()
                    ck = f"{key}chunked_vs_unchunked"
                    rec[ck] = max(rec.get(ck, 0.0), diff)
                    # Only fp32 summation order differs (local reductions and the
                    # gloo ring all-reduce segment layout depend on the chunk).
                    chunk_atol = 1e-6 if atol == ATOL else atol
                    torch.testing.assert_close(
                        a, b, atol=chunk_atol, rtol=1e-6, msg=lambda m: f"{name}[{tag}] chunking: {m}"
                    )


# --------------------------------------------------------------------------- #
# multi-process (gloo) tests
# --------------------------------------------------------------------------- #

def _tp_worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        singletons = [dist.new_group([r]) for r in range(world)]
        rec = {}
        run_all_checks(group, rank, world, rec)

        # A TP group of size 1 holds the full vocabulary: no communication.
        rec1 = {}
        run_all_checks(singletons[rank], 0, 1, rec1, configs=((3.0, 0.7, (SMALL_CHUNK,), True, ATOL),))

        write_worst_over_ranks(rec, group, rank, world, out_path)
    finally:
        dist.destroy_process_group()


def _failing_worker(rank):
    assert rank == 12345, "deliberate failure in child"


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_reference(world, tmp_path):
    out_path = str(tmp_path / f"diffs_tp{world}.json")
    t0 = time.time()
    mp.spawn(_tp_worker, args=(world, free_port(), out_path), nprocs=world, join=True)
    with open(out_path) as f:
        diffs = json.load(f)
    print(f"\nTP{world} max abs diffs ({time.time() - t0:.1f}s):")
    for k, v in sorted(diffs.items()):
        print(f"  {k:42s} {v:.3e}")
    assert any(k.endswith("/grad") for k in diffs)


def test_child_assertion_fails_parent():
    with pytest.raises(Exception, match="deliberate failure in child"):
        mp.spawn(_failing_worker, nprocs=1, join=True)


# --------------------------------------------------------------------------- #
# single-process tests
# --------------------------------------------------------------------------- #
def test_single_process_matches_reference():
    rec = {}
    run_all_checks(None, 0, 1, rec)
    print("\nTP1 (tp_group=None) max abs diffs:")
    for k, v in sorted(rec.items()):
        print(f"  {k:42s} {v:.3e}")


def test_bf16_inputs_and_noncontiguous():
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(7, 3, V, generator=gen) * 2).to(torch.bfloat16)
    x = base.transpose(0, 1).detach().requires_grad_()  # [3, 7, V] non-contiguous view
    assert not x.is_contiguous()
    tgt = torch.randint(0, V, (3, 7), generator=gen)
    before = x.detach().clone()
    lp, ent = vocab_parallel_logprobs_and_entropy(x, tgt, chunk_size=4)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert torch.equal(x.detach(), before)
    xr = x.detach().float().requires_grad_()
    torch.testing.assert_close(lp, ref_logprobs(xr, tgt).detach(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ent, ref_entropy(xr).detach(), atol=ATOL, rtol=RTOL)
    g = torch.randn(3, 7, generator=gen)
    (lp * g + ent).sum().backward()
    (ref_logprobs(xr, tgt) * g + ref_entropy(xr)).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    # the fp32 gradient is computed then rounded once to bf16: each element within one bf16 ulp
    # (2^-8 relative) of the rounded reference (gradients here are ~1e-2 in size, so an absolute
    # 1e-2 tolerance would accept anything)
    ref = xr.grad.to(torch.bfloat16).float()
    ulp = ref.abs().clamp(min=2.0**-126) * 2.0**-8
    assert ((x.grad.float() - ref).abs() <= ulp).all(), (x.grad.float() - ref).abs().div(ulp).max()
    assert torch.equal(x.detach(), before)

    y = torch.randn(3, 7, V, generator=gen).to(torch.bfloat16)
    for beta in BETAS:
        out = vocab_parallel_generalized_jsd(x.detach(), y, beta, temperature=1.3)
        ref = ref_jsd(x.detach().float(), y.float(), beta, 1.3)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_fp32_temperature_one_no_alias_mutation_and_1d():
    # fp32 + temperature 1 is the case where the internal fp32 view aliases the input.
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(V, generator=gen) * 50).requires_grad_()
    before = x.detach().clone()
    tgt = torch.tensor(5)
    lp = vocab_parallel_logprobs(x, tgt)
    ent = vocab_parallel_entropy(x)
    kl = vocab_parallel_kl(x, x.detach().flip(0))
    assert lp.shape == ent.shape == kl.shape == torch.Size([])
    (lp + ent + kl).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close(lp, ref_logprobs(before, tgt), atol=ATOL, rtol=RTOL)


def test_negative_infinity_logits_are_handled():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, V, generator=gen)
    x[:, V // 2:] = float("-inf")  # masked (e.g. padded) vocabulary entries
    y = torch.randn(4, V, generator=gen)
    y[:, V // 2:] = float("-inf")
    xg = x.clone().requires_grad_()
    yg = y.clone().requires_grad_()
    tgt = torch.tensor([0, 1, 2, 3])
    lp, ent = vocab_parallel_logprobs_and_entropy(xg, tgt, chunk_size=3)
    kl = vocab_parallel_kl(xg, yg)
    jsd = vocab_parallel_generalized_jsd(xg, yg, 0.3)
    half = x[:, : V // 2]
    torch.testing.assert_close(lp, ref_logprobs(half, tgt), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ent, ref_entropy(half), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(kl, ref_kl(half, y[:, : V // 2]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(jsd, ref_jsd(half, y[:, : V // 2], 0.3), atol=ATOL, rtol=RTOL)
    (lp.sum() + ent.sum() + kl.sum() + jsd.sum()).backward()
    assert torch.isfinite(xg.grad).all() and torch.isfinite(yg.grad).all()
    assert (xg.grad[:, V // 2:] == 0).all() and (yg.grad[:, V // 2:] == 0).all()


def test_no_grad_inputs_and_empty():
    x = torch.randn(2, 0, V)
    tgt = torch.zeros(2, 0, dtype=torch.long)
    assert vocab_parallel_logprobs(x, tgt).shape == (2, 0)
    assert vocab_parallel_entropy(x).shape == (2, 0)
    x = torch.randn(2, 5, V)
    out = vocab_parallel_kl(x, torch.randn(2, 5, V))
    assert not out.requires_grad and (out >= -1e-6).all()


def test_value_errors():
    x = torch.randn(2, 3, V)
    y = torch.randn(2, 3, V)
    tgt = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_logprobs(x, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_logprobs_and_entropy(x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_logprobs(x, tgt.float())
    for bad_t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            vocab_parallel_logprobs(x, tgt, temperature=bad_t)
        with pytest.raises(ValueError, match="temperature"):
            vocab_parallel_entropy(x, temperature=bad_t)
        with pytest.raises(ValueError, match="temperature"):
            vocab_parallel_kl(x, y, temperature=bad_t)
        with pytest.raises(ValueError, match="temperature"):
            vocab_parallel_generalized_jsd(x, y, temperature=bad_t)
    for bad_c in (0, -3, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            vocab_parallel_logprobs(x, tgt, chunk_size=bad_c)
        with pytest.raises(ValueError, match="chunk_size"):
            vocab_parallel_entropy(x, chunk_size=bad_c)
        with pytest.raises(ValueError, match="chunk_size"):
            vocab_parallel_kl(x, y, chunk_size=bad_c)
        with pytest.raises(ValueError, match="chunk_size"):
            vocab_parallel_generalized_jsd(x, y, chunk_size=bad_c)
    for bad_b in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            vocab_parallel_generalized_jsd(x, y, beta=bad_b)
    with pytest.raises(ValueError, match="shape"):
        vocab_parallel_kl(x, torch.randn(2, 3, V + 1))
    with pytest.raises(ValueError, match="shape"):
        vocab_parallel_generalized_jsd(x, torch.randn(3, 2, V))
    with pytest.raises(ValueError, match="floating"):
        vocab_parallel_entropy(torch.zeros(2, V, dtype=torch.long))
