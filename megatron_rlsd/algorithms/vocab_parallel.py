"""Vocabulary-parallel token statistics: log-probs, entropy, KL and generalized JSD.

All functions take logits that may be sharded over the vocabulary across a
tensor-parallel (TP) process group, Megatron style: rank ``r`` of a TP group of
size ``tp`` holds the columns ``[r * V / tp, (r + 1) * V / tp)`` of the full
vocabulary ``V`` (``V`` divisible by ``tp``, every rank holding the same local
width ``V_local = V / tp``).  The full vocabulary is never gathered; instead a
few per-token all-reduces (max, sum of exponentials, target logit, per-token
sums) are issued over ``tp_group``.  ``tp_group=None`` (or a group of size 1)
means the logits already hold the full vocabulary and no communication happens.

Conventions shared by every function:

* ``logits`` has shape ``[..., V_local]``; the leading dims are flattened into
  ``N`` token rows which are processed a chunk of rows at a time, so fp32
  temporaries are bounded: by default a chunk holds ``CHUNK_BYTES`` of fp32
  logits of the full vocabulary, ``CHUNK_BYTES / tp`` on each rank, so every
  rank's temporaries shrink as 1/TP (``chunk_size`` rows when given).  Every
  rank of the TP group must call with the same leading shape and ``chunk_size``.
* ``temperature`` divides the logits (``softmax(logits / temperature)``); the
  input tensors are never modified in place.
* Math is done in fp32 (each chunk is cast), results are fp32 tensors of shape
  ``[...]`` (the leading dims), in nats.  Gradients w.r.t. the logits come back
  in the logits' dtype.
* Autograd is supported through custom ``torch.autograd.Function``s whose
  backward recomputes the (local) softmax chunk by chunk from the saved logits
  and a few saved per-token fp32 scalars; backward needs no communication
  because every global per-token quantity it needs (log-normaliser, entropy,
  KL) is already known from the forward pass.  The outputs are replicated on
  all TP ranks, so each rank receives the same upstream gradient and produces
  the gradient for its own vocabulary shard.  Double backward is not supported.
"""

from __future__ import annotations

import math
import numbers
from typing import Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = [
    "vocab_parallel_logprobs",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs_and_entropy",
    "vocab_parallel_kl",
    "vocab_parallel_generalized_jsd",
    "vocab_parallel_topk_tail_logprobs",
    "global_topk_ids",
]

# fp32 bytes of one chunk of full-vocabulary logits rows, split over the TP ranks: a few temporaries
# of CHUNK_BYTES / tp live at once on each rank, whatever the vocabulary (at Qwen's 151,936 entries,
# ~440 rows per chunk at any TP)
CHUNK_BYTES = 256 << 20


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _group_info(tp_group) -> Tuple[int, int]:
    """Return ``(world_size, rank)`` of ``tp_group``; ``(1, 0)`` for ``None``."""
    if tp_group is None:
        return 1, 0
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a tp_group was given but torch.distributed is not initialized")
    rank = dist.get_rank(group=tp_group)
    if rank < 0:
        raise ValueError("this process is not a member of tp_group")
    return dist.get_world_size(group=tp_group), rank


def _all_reduce(t: torch.Tensor, op, tp_group, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=op, group=tp_group)
    return t


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a positive real number, got {temperature!r}")
    t = float(temperature)
    if not (t > 0.0) or not math.isfinite(t):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    return int(chunk_size)


def _check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., V_local] with V_local > 0, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got {logits.dtype}")


def _check_target(logits: torch.Tensor, target) -> None:
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor of token ids, got {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the leading dims of logits "
            f"{tuple(logits.shape[:-1])} (logits shape {tuple(logits.shape)})"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} shape {tuple(a.shape)} != {name_b} shape {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def _scaled(rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``rows / temperature``.

    WARNING: for fp32 input and temperature 1 the result aliases the input, so
    callers must only apply out-of-place ops to it.
    """
    z = rows.to(torch.float32)
    if temperature != 1.0:
        z = z / temperature
    return z


# Shifted logits / log-probs are clamped to this finite floor so that masked
# (-inf) vocabulary entries give probability exactly 0 and ``0 * log p = 0``
# instead of NaN.  exp(-1e30) == 0 in fp32, so nothing else changes.  (A KL
# whose Q has a masked entry where P does not is then ~1e30 instead of inf.)
_NEG_FLOOR = -1e30


def _log_softmax_chunk(x, a, b, temperature, shift, log_s):
    """Fresh fp32 ``log_softmax(x[a:b] / T)`` (local columns) from saved stats."""
    z = _scaled(x[a:b], temperature)
    lp = z - shift[a:b].unsqueeze(-1)  # fresh tensor; z may alias the input
    del z
    lp.sub_(log_s[a:b].unsqueeze(-1))
    return lp.clamp_(min=_NEG_FLOOR)


def _log_mixture(lt, ls_, log_b, log_1mb):
    """Fresh ``log(beta * exp(lt) + (1 - beta) * exp(ls_))``, elementwise."""
    lm = lt + log_b
    other = ls_ + log_1mb
    torch.logaddexp(lm, other, out=lm)
    return lm


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _chunks(n: int, chunk_size: int | None, v_local: int, world: int):
    """Row ranges of at most `chunk_size` rows (None: as many rows as CHUNK_BYTES of fp32 logits
    of the full vocabulary, v_local x world: every rank's temporaries, CHUNK_BYTES / world, shrink
    as 1/TP with its shard, and the chunks, with their collectives, are as many as at TP1)."""
    rows = chunk_size or max(1, CHUNK_BYTES // (4 * max(1, v_local) * max(1, world)))
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


def _shifted(chunks, tp_group, world: int):
    """Fresh fp32 tensors ``z - max_v z`` (global max over the TP group, one all-reduce for all
    of them) and the maxima ``[len(chunks), n]``. Unclamped: a -inf logit stays -inf."""
    m = torch.stack([z.amax(dim=-1) for z in chunks])
    _all_reduce(m, dist.ReduceOp.MAX, tp_group, world)
    return [z - m[i].unsqueeze(-1) for i, z in enumerate(chunks)], m


def _summed(parts, tp_group, world: int) -> torch.Tensor:
    """``torch.cat`` of ``[n, k_i]`` per-row partial sums, all-reduced (one collective)."""
    return _all_reduce(torch.cat([p if p.dim() == 2 else p.unsqueeze(-1) for p in parts], dim=-1),
                       dist.ReduceOp.SUM, tp_group, world)  # fmt: skip


def _local_target(target_rows: torch.Tensor, rank: int, v_local: int):
    """Local column index (clamped to be valid) and in-shard mask for global ids."""
    local = target_rows - rank * v_local
    in_shard = (local >= 0) & (local < v_local)
    local = torch.where(in_shard, local, torch.zeros_like(local))
    return local, in_shard


# --------------------------------------------------------------------------- #
# log-probs and entropy
# --------------------------------------------------------------------------- #
class _LogprobEntropyFn(torch.autograd.Function):
    """Returns ``(logp(target) or None, entropy or None)`` as flat ``[N]`` fp32."""

    @staticmethod
    def forward(ctx, logits, target, tp_group, temperature, chunk_size, want_logp, want_ent):
        ctx.set_materialize_grads(False)
        world, rank = _group_info(tp_group)
        ctx.world = world
        x = _rows(logits)
        n, v_local = x.shape
        dev = x.device
        tgt = target.reshape(-1).long() if want_logp else None

        shift = torch.empty(n, dtype=torch.float32, device=dev)  # global max of z
        log_s = torch.empty(n, dtype=torch.float32, device=dev)  # log sum exp(z - max)
        logp = torch.empty(n, dtype=torch.float32, device=dev) if want_logp else None
        ent = torch.empty(n, dtype=torch.float32, device=dev) if want_ent else None

        for a, b in _chunks(n, chunk_size, v_local, world):
            (zs,), m = _shifted([_scaled(x[a:b], temperature)], tp_group, world)  # z - max <= 0
            parts = []
            if want_logp:  # gathered before the clamp so that a -inf target stays -inf
                local, in_shard = _local_target(tgt[a:b], rank, v_local)
                zt = zs.gather(-1, local.unsqueeze(-1)).squeeze(-1)
                parts.append(torch.where(in_shard, zt, torch.zeros_like(zt)))
            zs.clamp_(min=_NEG_FLOOR)
            e = zs.exp()
            parts.insert(0, e.sum(dim=-1))
            if want_ent:
                parts.append(e.mul_(zs).sum(dim=-1))  # sum e * (z - m)
            del e, zs
            red = _summed(parts, tp_group, world)  # [n, 1 + want_logp + want_ent]
            ls = red[:, 0].log()
            shift[a:b] = m[0]
            log_s[a:b] = ls
            if want_logp:
                logp[a:b] = red[:, 1] - ls
            if want_ent:
                # H = -sum p log p = log s - sum(e * (z - m)) / s
                ent[a:b] = ls - red[:, -1] / red[:, 0]

        ctx.tp_group, ctx.rank = tp_group, rank
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.want_logp, ctx.want_ent = want_logp, want_ent
        ctx.save_for_backward(
            logits,
            tgt if want_logp else None,
            shift,
            log_s,
            ent if want_ent else None,
        )
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits, tgt, shift, log_s, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        if g_logp is None and g_ent is None:
            return (None,) * 7
        x = _rows(logits)
        n, v_local = x.shape
        grad = torch.empty_like(x, memory_format=torch.contiguous_format)
        inv_t = 1.0 / ctx.temperature
        for a, b in _chunks(n, ctx.chunk_size, v_local, ctx.world):
            lp = _log_softmax_chunk(x, a, b, ctx.temperature, shift, log_s)
            p = lp.exp()
            if g_ent is not None:
                # dH/dz = -p * (log p + H)   (computed in place in lp)
                ge = g_ent.reshape(-1)[a:b].float()
                g = lp.add_(ent[a:b].unsqueeze(-1)).mul_(p).mul_(-ge.unsqueeze(-1))
                if g_logp is not None:
                    gl = g_logp.reshape(-1)[a:b].float()
                    g.addcmul_(p, gl.unsqueeze(-1), value=-1.0)
            else:
                del lp
                gl = g_logp.reshape(-1)[a:b].float()
                g = p.mul_(-gl.unsqueeze(-1))
            if g_logp is not None:
                # d logp(t)/dz = onehot(t) - p
                local, in_shard = _local_target(tgt[a:b], ctx.rank, v_local)
                src = torch.where(in_shard, gl, torch.zeros_like(gl))
                g.scatter_add_(-1, local.unsqueeze(-1), src.unsqueeze(-1))
            if inv_t != 1.0:
                g.mul_(inv_t)
            grad[a:b] = g
            del g, p
        return grad.view(logits.shape), None, None, None, None, None, None


def _logprob_entropy(logits, target, tp_group, temperature, chunk_size, want_logp, want_ent):
    _check_logits("logits", logits)
    if want_logp:
        _check_target(logits, target)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    lead = logits.shape[:-1]
    logp, ent = _LogprobEntropyFn.apply(
        logits, target if want_logp else None, tp_group, temperature, chunk_size, want_logp, want_ent
    )
    return (
        logp.view(lead) if logp is not None else None,
        ent.view(lead) if ent is not None else None,
    )


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probability of ``target`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V_local]`` vocab-sharded logits (any float dtype).
        target: ``[...]`` integer tensor of GLOBAL token ids in ``[0, V)``.  An id
            outside ``[0, V)`` (e.g. an ignore index) contributes no target
            logit; such positions must be masked by the caller.
        tp_group: tensor-parallel group the vocabulary is sharded over, or
            ``None`` for full-vocabulary logits.
        temperature: positive scalar dividing the logits.
        chunk_size: token rows processed at once (None: as many as fit in CHUNK_BYTES of fp32).

    Returns:
        ``[...]`` fp32 tensor of ``log p(target)`` in nats (<= 0), differentiable
        w.r.t. ``logits``.
    """
    return _logprob_entropy(logits, target, tp_group, temperature, chunk_size, True, False)[0]


def vocab_parallel_entropy(
    logits: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V_local]`` vocab-sharded logits.
        tp_group, temperature, chunk_size: see :func:`vocab_parallel_logprobs`.

    Returns:
        ``[...]`` fp32 entropy in nats (in ``[0, log V]``), differentiable w.r.t.
        ``logits``.
    """
    return _logprob_entropy(logits, None, tp_group, temperature, chunk_size, False, True)[1]


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target), entropy)`` in a single pass sharing the max / sum-exp.

    Args:
        logits: ``[..., V_local]`` vocab-sharded logits.
        target: ``[...]`` integer GLOBAL token ids.
        tp_group, temperature, chunk_size: see :func:`vocab_parallel_logprobs`.

    Returns:
        Two ``[...]`` fp32 tensors in nats, both differentiable w.r.t. ``logits``
        (a single backward pass handles gradients flowing into either or both).
    """
    return _logprob_entropy(logits, target, tp_group, temperature, chunk_size, True, True)


# --------------------------------------------------------------------------- #
# KL(P || Q)
# --------------------------------------------------------------------------- #
def _two_lognorm(zp: torch.Tensor, zq: torch.Tensor, tp_group, world: int):
    """Global log-softmax of two logit chunks, restricted to the local shard (two all-reduces).

    Returns ``(log p, log q, m [2, n], log_s [2, n])`` (fresh tensors, -inf floored).
    """
    (lp, lq), m = _shifted([zp, zq], tp_group, world)
    lp.clamp_(min=_NEG_FLOOR)
    lq.clamp_(min=_NEG_FLOOR)
    ls = _summed([lp.exp().sum(dim=-1), lq.exp().sum(dim=-1)], tp_group, world).log().t()
    lp.sub_(ls[0].unsqueeze(-1))
    lq.sub_(ls[1].unsqueeze(-1))
    return lp, lq, m, ls


class _KLFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p_logits, q_logits, tp_group, temperature, chunk_size):
        world, _ = _group_info(tp_group)
        ctx.world = world
        xp, xq = _rows(p_logits), _rows(q_logits)
        n = xp.shape[0]
        dev = xp.device
        stats = torch.empty(4, n, dtype=torch.float32, device=dev)  # m_p, m_q, ls_p, ls_q
        kl = torch.empty(n, dtype=torch.float32, device=dev)
        for a, b in _chunks(n, chunk_size, xp.shape[-1], world):
            lp, lq, m, ls = _two_lognorm(
                _scaled(xp[a:b], temperature), _scaled(xq[a:b], temperature), tp_group, world
            )
            p = lp.exp()
            part = lp.sub_(lq).mul_(p).sum(dim=-1)  # sum p * (log p - log q)
            del p, lp, lq
            kl[a:b] = _summed([part], tp_group, world)[:, 0]
            stats[0:2, a:b] = m
            stats[2:4, a:b] = ls
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.save_for_backward(p_logits, q_logits, stats, kl)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kl):
        p_logits, q_logits, stats, kl = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_kl is None or not (need_p or need_q):
            return None, None, None, None, None
        xp, xq = _rows(p_logits), _rows(q_logits)
        n = xp.shape[0]
        gp = torch.empty_like(xp, memory_format=torch.contiguous_format) if need_p else None
        gq = torch.empty_like(xq, memory_format=torch.contiguous_format) if need_q else None
        gflat = g_kl.reshape(-1)
        inv_t = 1.0 / ctx.temperature
        for a, b in _chunks(n, ctx.chunk_size, xp.shape[-1], ctx.world):
            g = (gflat[a:b].float() * inv_t).unsqueeze(-1)
            lp = _log_softmax_chunk(xp, a, b, ctx.temperature, stats[0], stats[2])
            p = lp.exp()
            lq = _log_softmax_chunk(xq, a, b, ctx.temperature, stats[1], stats[3])
            if need_p:
                # dKL/dz_p = p * (log p - log q - KL)
                gp[a:b] = lp.sub_(lq).sub_(kl[a:b].unsqueeze(-1)).mul_(p).mul_(g)
            del lp
            if need_q:
                # dKL/dz_q = q - p
                gq[a:b] = lq.exp_().sub_(p).mul_(g)
            del lq, p
        return (
            gp.view(p_logits.shape) if need_p else None,
            gq.view(q_logits.shape) if need_q else None,
            None,
            None,
            None,
        )


def vocab_parallel_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token ``KL(P || Q) = sum_v P_v (log P_v - log Q_v)``.

    ``P = softmax(p_logits / temperature)``, ``Q = softmax(q_logits / temperature)``.

    Args:
        p_logits: ``[..., V_local]`` vocab-sharded logits of P.
        q_logits: ``[..., V_local]`` vocab-sharded logits of Q (same shape).
        tp_group, temperature, chunk_size: see :func:`vocab_parallel_logprobs`.

    Returns:
        ``[...]`` fp32 KL in nats (>= 0), differentiable w.r.t. both inputs
        (detach one of them to stop its gradient).
    """
    _check_logits("p_logits", p_logits)
    _check_logits("q_logits", q_logits)
    _check_pair("p_logits", p_logits, "q_logits", q_logits)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    kl = _KLFn.apply(p_logits, q_logits, tp_group, temperature, chunk_size)
    return kl.view(p_logits.shape[:-1])


# --------------------------------------------------------------------------- #
# generalized JSD (TRL GKD convention)
# --------------------------------------------------------------------------- #
class _JSDFn(torch.autograd.Function):
    """Generalized JSD for ``0 < beta < 1``."""

    @staticmethod
    def forward(ctx, t_logits, s_logits, beta, tp_group, temperature, chunk_size):
        world, _ = _group_info(tp_group)
        ctx.world = world
        xt, xs = _rows(t_logits), _rows(s_logits)
        n = xt.shape[0]
        dev = xt.device
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        stats = torch.empty(4, n, dtype=torch.float32, device=dev)  # m_t, m_s, ls_t, ls_s
        kls = torch.empty(2, n, dtype=torch.float32, device=dev)  # KL(T||M), KL(S||M)
        for a, b in _chunks(n, chunk_size, xt.shape[-1], world):
            lt, ls_, m, lse = _two_lognorm(
                _scaled(xt[a:b], temperature), _scaled(xs[a:b], temperature), tp_group, world
            )
            lm = _log_mixture(lt, ls_, log_b, log_1mb)
            w = lt.exp()
            kl_t = lt.sub_(lm).mul_(w).sum(dim=-1)  # sum t * (log t - log m)
            torch.exp(ls_, out=w)
            kl_s = ls_.sub_(lm).mul_(w).sum(dim=-1)  # sum s * (log s - log m)
            del w, lt, ls_, lm
            kls[:, a:b] = _summed([kl_t, kl_s], tp_group, world).t()
            stats[0:2, a:b] = m
            stats[2:4, a:b] = lse
        ctx.beta, ctx.temperature, ctx.chunk_size = beta, temperature, chunk_size
        ctx.save_for_backward(t_logits, s_logits, stats, kls)
        return beta * kls[0] + (1.0 - beta) * kls[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_jsd):
        t_logits, s_logits, stats, kls = ctx.saved_tensors
        need_t, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_jsd is None or not (need_t or need_s):
            return (None,) * 6
        beta = ctx.beta
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        xt, xs = _rows(t_logits), _rows(s_logits)
        n = xt.shape[0]
        gt = torch.empty_like(xt, memory_format=torch.contiguous_format) if need_t else None
        gs = torch.empty_like(xs, memory_format=torch.contiguous_format) if need_s else None
        gflat = g_jsd.reshape(-1)
        inv_t = 1.0 / ctx.temperature
        for a, b in _chunks(n, ctx.chunk_size, xt.shape[-1], ctx.world):
            g = (gflat[a:b].float() * inv_t).unsqueeze(-1)
            lt = _log_softmax_chunk(xt, a, b, ctx.temperature, stats[0], stats[2])
            ls_ = _log_softmax_chunk(xs, a, b, ctx.temperature, stats[1], stats[3])
            lm = _log_mixture(lt, ls_, log_b, log_1mb)
            if need_t:
                # dJ/dz_t = beta * t * (log t - log m - KL(T||M))
                w = lt.exp()
                gt[a:b] = lt.sub_(lm).sub_(kls[0, a:b].unsqueeze(-1)).mul_(w).mul_(g * beta)
                del w
            del lt
            if need_s:
                # dJ/dz_s = (1 - beta) * s * (log s - log m - KL(S||M))
                w = ls_.exp()
                gs[a:b] = ls_.sub_(lm).sub_(kls[1, a:b].unsqueeze(-1)).mul_(w).mul_(g * (1.0 - beta))
                del w
            del ls_, lm
        return (
            gt.view(t_logits.shape) if need_t else None,
            gs.view(s_logits.shape) if need_s else None,
            None,
            None,
            None,
            None,
        )


def vocab_parallel_generalized_jsd(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    beta: float = 0.5,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token generalized Jensen-Shannon divergence (TRL GKD convention).

    With ``P_T = softmax(teacher_logits / temperature)`` and
    ``P_S = softmax(student_logits / temperature)``::

        M       = beta * P_T + (1 - beta) * P_S
        JSD_beta = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)

    ``log M`` is computed elementwise as
    ``logaddexp(log(beta) + log P_T, log(1 - beta) + log P_S)``.  The endpoints
    are special-cased as in TRL: ``beta == 0`` gives ``KL(P_T || P_S)`` (forward
    KL) and ``beta == 1`` gives ``KL(P_S || P_T)`` (reverse KL).

    Args:
        teacher_logits: ``[..., V_local]`` vocab-sharded teacher logits.
        student_logits: ``[..., V_local]`` vocab-sharded student logits (same shape).
        beta: interpolation weight in ``[0, 1]``.
        tp_group, temperature, chunk_size: see :func:`vocab_parallel_logprobs`.

    Returns:
        ``[...]`` fp32 divergence in nats (>= 0), differentiable w.r.t. both
        inputs (callers normally pass a detached teacher).
    """
    _check_logits("teacher_logits", teacher_logits)
    _check_logits("student_logits", student_logits)
    _check_pair("teacher_logits", teacher_logits, "student_logits", student_logits)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta must be a real number in [0, 1], got {beta!r}")
    beta = float(beta)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    if beta == 0.0:
        return vocab_parallel_kl(teacher_logits, student_logits, tp_group, temperature, chunk_size)
    if beta == 1.0:
        return vocab_parallel_kl(student_logits, teacher_logits, tp_group, temperature, chunk_size)
    jsd = _JSDFn.apply(teacher_logits, student_logits, beta, tp_group, temperature, chunk_size)
    return jsd.view(teacher_logits.shape[:-1])


# --------------------------------------------------------------------------- #
# top-k + tail log-probs (SDPO)
# --------------------------------------------------------------------------- #
class _TopkTailFn(torch.autograd.Function):
    """``(log P(ids) [N, k], log P(tail) [N])`` of ``softmax(logits / T)`` at GLOBAL ids.

    ``tail`` is every token outside ``ids``; its mass is summed DIRECTLY over
    those tokens (no ``1 - sum_k p`` cancellation, so a small tail keeps its
    fp32 relative accuracy).  One chunked pass over the local vocabulary and
    two all-reduces per chunk (max; sum-exp, tail sum-exp and the id logits
    together); backward recomputes the softmax chunk by chunk and needs no
    communication (outputs are replicated on all TP ranks).
    """

    @staticmethod
    def forward(ctx, logits, ids, tp_group, temperature, chunk_size, want_tail):
        ctx.set_materialize_grads(False)
        world, rank = _group_info(tp_group)
        ctx.world = world
        x = _rows(logits)
        n, v_local = x.shape
        k = ids.shape[-1]
        idr = ids.reshape(n, k).long()  # ids may be stored compactly (int32)
        dev = x.device
        shift = torch.empty(n, dtype=torch.float32, device=dev)
        log_s = torch.empty(n, dtype=torch.float32, device=dev)
        lp = torch.empty(n, k, dtype=torch.float32, device=dev)
        lt = torch.empty(n, dtype=torch.float32, device=dev) if want_tail else None
        for a, b in _chunks(n, chunk_size, v_local, world):
            (zs,), m = _shifted([_scaled(x[a:b], temperature)], tp_group, world)
            zs.clamp_(min=_NEG_FLOOR)
            local, in_shard = _local_target(idr[a:b], rank, v_local)
            zk = torch.where(in_shard, zs.gather(-1, local), torch.zeros((), device=dev))
            e = zs.exp_()
            parts = [e.sum(dim=-1)]
            if want_tail:
                e.mul_(_outside_ids(e, local, in_shard))  # the tail is everything but the ids
                parts.append(e.sum(dim=-1))
            del e, zs
            red = _summed(parts + [zk], tp_group, world)
            ls = red[:, 0].log()
            shift[a:b], log_s[a:b] = m[0], ls
            lp[a:b] = red[:, len(parts):] - ls.unsqueeze(-1)
            if want_tail:
                lt[a:b] = red[:, 1].log() - ls
        ctx.tp_group, ctx.rank = tp_group, rank
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.save_for_backward(logits, idr, shift, log_s, lt)
        return lp.view(*ids.shape), (lt.view(ids.shape[:-1]) if want_tail else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_lt):
        logits, idr, shift, log_s, lt = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_lp is None and g_lt is None):
            return (None,) * 6
        x = _rows(logits)
        n, v_local = x.shape
        k = idr.shape[-1]
        dev = x.device
        g_lp = g_lp.reshape(n, k).float() if g_lp is not None else torch.zeros(n, k, device=dev)
        g_lt = g_lt.reshape(n).float() if g_lt is not None else torch.zeros(n, device=dev)
        # d log P(tail) / dz_v = (p_v [v in tail] / P(tail) - p_v) / T; 0 where P(tail) == 0
        if lt is not None:
            tail = lt.exp()
            coef = torch.where(tail > 0, g_lt / tail.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(tail))
        else:
            coef = torch.zeros(n, device=dev)
        grad = torch.empty_like(x, memory_format=torch.contiguous_format)
        for a, b in _chunks(n, ctx.chunk_size, v_local, ctx.world):
            p = _log_softmax_chunk(x, a, b, ctx.temperature, shift, log_s).exp_()
            gk, gt, c = g_lp[a:b], g_lt[a:b], coef[a:b]
            local, in_shard = _local_target(idr[a:b], ctx.rank, v_local)
            rest = gk.sum(dim=-1) + gt
            # the ids: g_j - p_j * (sum_i g_i + g_tail), written over (not added
            # to) the tail formula so that a huge coef cannot cancel there
            gid = torch.where(in_shard, gk - p.gather(-1, local) * rest.unsqueeze(-1), 0.0)
            g = p.mul_((c - rest).unsqueeze(-1))  # tail tokens: p * (coef - sum_i g_i - g_tail)
            g.mul_(_outside_ids(g, local, in_shard)).scatter_add_(-1, local, gid)
            if ctx.temperature != 1.0:
                g.mul_(1.0 / ctx.temperature)
            grad[a:b] = g
            del g, p
        return grad.view(logits.shape), None, None, None, None, None


def _outside_ids(like: torch.Tensor, local: torch.Tensor, in_shard: torch.Tensor) -> torch.Tensor:
    """1 everywhere but at the ids in this rank's shard (0 there), shaped like `like` [n, V_local].
    Built by scatter (no data-dependent shapes, no host sync); ids outside the shard point at
    column 0 (see _local_target) and multiply by 1 there, whatever order the scatter takes."""
    return torch.ones_like(like).scatter_reduce_(-1, local, (~in_shard).to(like.dtype), reduce="prod")


def global_topk_ids(logits: torch.Tensor, k: int, tp_group, world: int, rank: int) -> torch.Tensor:
    """Global ids ``[..., k]`` of the ``k`` largest logits, sorted descending (no grad).

    Local top-k on every rank, all-gather of the candidates, global top-k: the
    same ids on every rank of the TP group.
    """
    v_local = logits.shape[-1]
    with torch.no_grad():
        vals, idx = torch.topk(logits.detach(), min(k, v_local), dim=-1)
        ids = idx + rank * v_local
        if world == 1:
            return ids
        vals, ids = vals.contiguous(), ids.contiguous()
        all_vals = [torch.empty_like(vals) for _ in range(world)]
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_vals, vals, group=tp_group)
        dist.all_gather(all_ids, ids, group=tp_group)
        top = torch.topk(torch.cat(all_vals, dim=-1), k, dim=-1).indices
        return torch.cat(all_ids, dim=-1).gather(-1, top)


def vocab_parallel_topk_tail_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    want_tail: bool = True,
):
    """``(log P(ids) [..., k], log P(tail) [...] or None)`` under ``softmax(logits / T)``.

    ``ids`` are GLOBAL token ids ``[..., k]`` (the same on every TP rank, e.g. from
    :func:`global_topk_ids`); the tail is every other token, its mass summed directly (see
    ``_TopkTailFn``). Differentiable w.r.t. ``logits``.
    """
    _check_logits("logits", logits)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    return _TopkTailFn.apply(logits, ids, tp_group, temperature, chunk_size, want_tail)
