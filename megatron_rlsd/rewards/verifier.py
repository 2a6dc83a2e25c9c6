"""Verifiable reward: math answer equivalence with a hard timeout, plus the format bonus.

How an answer is checked (:func:`check_answer`), cheapest first:

1. Normalised exact match (strip, drop whitespace and ``$``, a trailing ``.``,
   an outer ``\\boxed{}`` / ``\\text{}``): equal -> correct.
2. Both sides plain numbers (``8``, ``-0.5``, ``1/2``, ``\\frac{1}{2}``):
   compared exactly as fractions in-process, with math-verify's semantics:
   rationals must be equal; with a decimal on either side math-verify rounds
   to 6 places, so only pairs closer than 1e-6 (``0.333333`` vs ``1/3``) go
   on to math-verify.
3. Both sides plain words (``Yes``, ``no``, ``red apple``): case-insensitive
   string comparison.  math-verify would read ``no`` as the product ``n*o`` and
   call it equal to ``on``.
4. Everything else: ``math_verify.parse`` (LaTeX extraction only) and
   ``math_verify.verify`` in a pool of worker processes.

Why worker processes: math-verify's own timeout is ``signal.alarm``, which
only works in the main thread (in any other thread it raises ``ValueError``),
has whole-second resolution, and cannot stop a computation stuck in C (sympy
evaluating ``9^{9^{9^9}}`` never returns).  The workers
(:mod:`.math_verify_worker`) run math-verify with its signal timeouts disabled
in a ``pebble.ProcessPool``; a task that overruns ``timeout_s`` is killed by
pebble (SIGKILL always works) and its worker replaced, while the caller gets
the timeout.  The guard therefore holds in any thread.

Model output is never evaluated as Python: only math-verify's LaTeX path is
used (an ANTLR grammar), never its ``ExprExtractionConfig``, which goes through
``sympy.parse_expr`` (``eval``).  Workers also cap their address space, ignore
the stop signals meant for the trainer, and discard stdout.

When math-verify times out or is unavailable, the result falls back to the
normalised exact match of step 1 (reason "timeout" / "unparseable"); when it
cannot turn a side into an expression, only its string comparison applies
(reason "unparseable").  The reasons are there for counting.
"""

from __future__ import annotations

import atexit
import collections
import importlib.util
import logging
import multiprocessing
import multiprocessing.spawn
import os
import re
import sys
import threading
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction

import pebble
from pebble import ProcessExpired, ProcessPool

from . import math_verify_worker
from .extract import extract_answer, has_valid_format

__all__ = [
    "MAX_VERIFY_CHARS",
    "MathVerifier",
    "REASONS",
    "RewardConfig",
    "RewardResult",
    "answers_match",
    "check_answer",
    "get_default_verifier",
    "normalize_answer",
    "score_response",
    "score_responses",
    "shutdown_default_verifier",
]

logger = logging.getLogger(__name__)

#: Reasons reported by :func:`check_answer` / :func:`score_response`.
REASONS = ("ok", "no_answer", "timeout", "unparseable")

#: Answers longer than this skip math-verify (string fallback, "unparseable"):
#: real final answers are short; long ones are where sympy blows up.
MAX_VERIFY_CHARS = 1000

# math-verify rounds floats to 6 decimals: numbers further apart never match.
_FLOAT_TOLERANCE = Fraction(1, 10**6)


# --------------------------------------------------------------------------- #
# In-process fast paths                                                        #
# --------------------------------------------------------------------------- #

_WRAPPERS = re.compile(r"^\\(?:boxed|text|textbf|mathrm|mbox)\{(.*)\}$", re.DOTALL)
_WS = re.compile(r"\s+")
_DECIMAL = re.compile(r"^([+-]?)(\d{1,60})(?:\.(\d{1,60}))?$")
_SLASH_FRACTION = re.compile(r"^([+-]?)(\d{1,60})/(\d{1,60})$")
_LATEX_FRACTION = re.compile(r"^([+-]?)\\[dt]?frac\{([+-]?\d{1,60})\}\{(\d{1,60})\}$")
_PLAIN_WORDS = re.compile(r"^[A-Za-z][A-Za-z '\-]*[A-Za-z.]?$")
_LETTER_RUN = re.compile(r"[A-Za-z]{2}")


def normalize_answer(text: str) -> str:
    """Whitespace, ``$`` and a trailing ``.`` removed; outer ``\\boxed{}``/``\\text{}`` unwrapped."""
    s = _WS.sub("", text.replace("$", ""))
    for _ in range(4):
        s = s.rstrip(".")
        m = _WRAPPERS.match(s)
        if m is None or not _balanced(m.group(1)):
            break
        s = m.group(1)
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _as_number(s: str) -> Fraction | None:
    """A normalised answer that is a plain number, as an exact fraction."""
    if len(s) > 130:
        return None
    m = _DECIMAL.match(s)
    if m:
        sign, whole, frac = m.groups()
        value = Fraction(int(whole + (frac or "")), 10 ** len(frac or ""))
        return -value if sign == "-" else value
    m = _SLASH_FRACTION.match(s) or _LATEX_FRACTION.match(s)
    if m:
        sign, num, den = m.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def _plain_words(s: str) -> str | None:
    """Lower-cased, space-collapsed text if ``s`` is ordinary words, else None."""
    s = s.strip()
    if len(s) > 200 or not _PLAIN_WORDS.match(s) or not _LETTER_RUN.search(s):
        return None
    return " ".join(s.lower().rstrip(".").split())


def _clean_for_latex(s: str) -> str:
    return s.strip().replace("$", "")


# --------------------------------------------------------------------------- #
# The math-verify worker pool                                                  #
# --------------------------------------------------------------------------- #


def _latex_wrap(s: str) -> str:
    if "\\boxed" in s:
        return s
    return "\\boxed{" + s + "}" if _balanced(s) else "$" + s + "$"


# A worker ends itself this long after its task's timeout; pebble kills it first unless our
# process died (see math_verify_worker.check).
_ORPHAN_GRACE_S = 5.0


# multiprocessing's spawn makes every child import the parent's __main__ module again (for
# objects pickled from it): a script that imports torch at the top would cost each worker seconds
# and hundreds of MB, and an unguarded script would run again in it.  Our workers unpickle only
# math_verify_worker's functions, so their preparation data leaves __main__ out.  The wrapper
# acts only in a thread that is starting one of our workers; other spawns are untouched.
_starting_worker = threading.local()
_preparation_data = multiprocessing.spawn.get_preparation_data


def _preparation_data_for(name: str) -> dict:
    data = _preparation_data(name)
    if getattr(_starting_worker, "active", False):
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    return data


multiprocessing.spawn.get_preparation_data = _preparation_data_for


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj):
        _starting_worker.active = True
        try:
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            _starting_worker.active = False


class _WorkerContext(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


class _Unavailable(Exception):
    """No worker answered: the pool failed to start or broke, a worker died, or math-verify is off."""


class MathVerifier:
    """math-verify in a ``pebble.ProcessPool`` of spawned workers, with a hard per-call timeout.

    Thread-safe: calls queue for the ``max_workers`` workers (two: the trainer
    checks from one thread, and the second stays ready while pebble replaces a
    timed-out one).  A call's ``timeout_s`` counts from when a worker takes the
    task; workers import and warm up math-verify (about 1.5 s) before they take
    tasks, and ``start_timeout_s`` bounds how long a call waits for one
    (:meth:`warmup` waits ahead of time).  A pool that breaks (a worker died
    while idle) is rebuilt; after ``max_start_failures`` failures in a row
    math-verify is disabled for this process (string fallback, "unparseable").

    Workers are spawned, not forked (forking a process that runs torch/vLLM
    threads is unsafe), and import only :mod:`.math_verify_worker` with this
    package's rewards modules (stdlib and pebble; no torch), not the caller's
    ``__main__`` module.
    """

    def __init__(
        self,
        max_workers: int = 2,
        start_timeout_s: float = 60.0,
        memory_mb: int = 4096,
        cache_size: int = 8192,
        max_start_failures: int = 3,
    ):
        self.max_workers = max_workers
        self.start_timeout_s = start_timeout_s
        self.memory_mb = memory_mb
        self.max_start_failures = max_start_failures
        self._lock = threading.Lock()
        self._pool: ProcessPool | None = None
        self._pid = os.getpid()
        self._failures = 0
        self._disabled = not sys.executable or importlib.util.find_spec("math_verify") is None
        self._cache: collections.OrderedDict[tuple[str, str], tuple[bool, str]] = collections.OrderedDict()
        self._cache_size = cache_size
        self.stats = collections.Counter()

    # -- pool ---------------------------------------------------------------
    def _after_fork_check(self) -> None:
        if os.getpid() != self._pid:  # forked child: the pool's threads and workers stayed with the parent
            self._lock, self._pool, self._pid = threading.Lock(), None, os.getpid()

    def _live_pool(self) -> ProcessPool | None:
        """The pool (created on first use, rebuilt after it broke); None once disabled."""
        with self._lock:
            pool = self._pool
        if pool is not None and not pool.active:
            self._retire(pool, "its workers died")
        with self._lock:
            if self._pool is None and not self._disabled:
                self._pool = ProcessPool(
                    self.max_workers, initializer=math_verify_worker.start, initargs=(self.memory_mb,),
                    context=_WorkerContext(),
                )  # fmt: skip
                # Workers ignore SIGTERM: pebble's wait between SIGTERM and SIGKILL (3 s) would
                # only delay every timeout kill.
                pebble.CONSTS.term_timeout = 0
            return self._pool

    def _retire(self, pool: ProcessPool, reason: str) -> None:
        """Stop a pool that broke or whose workers never became ready; count the failure."""
        with self._lock:
            if self._pool is not pool:
                return  # another thread retired it already
            self._pool = None
            self._failures += 1
            failures, self._disabled = self._failures, self._disabled or self._failures >= self.max_start_failures
        if failures >= self.max_start_failures:
            logger.error("math-verify workers failed %d times (%s); using exact string match only", failures, reason)
        else:
            logger.warning("math-verify workers failed (%s); starting new ones", reason)
        pool.stop()
        pool.join()

    def start(self) -> None:
        """Start the workers now and return at once: they import and warm up math-verify (a few
        seconds of CPU each) while the caller loads its model and engine, not in the first
        rewards. Does nothing if math-verify is unavailable."""
        self._after_fork_check()
        pool = self._live_pool()
        if pool is not None:  # pebble spawns its workers with the first task
            pool.schedule(math_verify_worker.check, (_latex_wrap("1"), _latex_wrap("1"), self.start_timeout_s))

    def warmup(self) -> bool:
        """Start the workers and wait until one answers; False if math-verify is unavailable."""
        self._after_fork_check()
        try:
            return self._call("2x+1", "1+2x", self.start_timeout_s) is not None
        except _Unavailable:
            return False

    def close(self) -> None:
        """Stop the workers (a later call starts new ones)."""
        self._after_fork_check()  # a forked child must not stop its parent's workers
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join()

    # -- checking -------------------------------------------------------------
    def verify(self, pred: str, gold: str, timeout_s: float = 2.0) -> tuple[bool, str] | None:
        """math-verify result ``(match, "ok" | "unparseable")``, or None on timeout.

        Raises nothing; an unavailable verifier reads as ``(False, "unparseable")``.
        """
        self._after_fork_check()
        key = (pred, gold)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.stats["cache_hit"] += 1
                return self._cache[key]
        try:
            result = self._call(pred, gold, timeout_s)
        except _Unavailable:
            return False, "unparseable"
        except Exception:
            logger.exception("math-verify call failed")
            return False, "unparseable"
        if result is not None:
            with self._lock:
                self._cache[key] = result
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result

    def _call(self, pred: str, gold: str, timeout_s: float) -> tuple[bool, str] | None:
        """One task on the pool: its result, or None on timeout; raises _Unavailable."""
        args = (_latex_wrap(pred), _latex_wrap(gold), timeout_s + _ORPHAN_GRACE_S)
        # pebble breaks the whole pool when a worker dies outside an acknowledged task (killed
        # while idle, say): the task then runs once more on a new pool.
        for _ in range(2):
            pool = self._live_pool()
            if pool is None:
                raise _Unavailable
            try:
                future = pool.schedule(math_verify_worker.check, args, timeout=timeout_s)
                result = future.result(timeout=self.start_timeout_s + timeout_s)
            except (BrokenProcessPool, RuntimeError) as exc:  # RuntimeError: schedule() on a broken pool
                self._retire(pool, repr(exc))
                continue
            except TimeoutError:  # pebble's (it killed the worker), or ours (no worker took the task)
                started = future.running() or future.done()
                future.cancel()
                if not started:
                    self._retire(pool, f"no worker ready within {self.start_timeout_s:.0f}s")
                    raise _Unavailable from None
                with self._lock:
                    self.stats["timeout"] += 1
                logger.warning(
                    "math-verify timed out after %.1fs on pred=%r gold=%r; worker replaced", timeout_s, pred[:80], gold[:80]
                )
                return None
            except ProcessExpired as exc:  # killed or crashed mid-task; pebble starts a new worker
                with self._lock:
                    self.stats["worker_error"] += 1
                logger.warning("math-verify worker died (exit code %s) on pred=%r", exc.exitcode, pred[:80])
                raise _Unavailable from exc
            with self._lock:
                self._failures = 0
                self.stats["verified"] += 1
            return result
        raise _Unavailable


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def get_default_verifier() -> MathVerifier:
    """The process-wide :class:`MathVerifier` used by :func:`answers_match` (created lazily)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
            atexit.register(_default.close)
        return _default


def shutdown_default_verifier() -> None:
    """Stop the default verifier's workers (a later call starts new ones)."""
    global _default
    with _default_lock:
        verifier, _default = _default, None
    if verifier is not None:
        verifier.close()


# --------------------------------------------------------------------------- #
# Public checks                                                                #
# --------------------------------------------------------------------------- #


def check_answer(pred: str, gold: str, timeout_s: float = 2.0, verifier: MathVerifier | None = None) -> tuple[bool, str]:
    """``(match, reason)`` with reason in "ok", "timeout", "unparseable"; never raises.

    The in-process fast paths (normalised match, plain numbers, plain words)
    answer most cases in microseconds; the rest goes to math-verify under a
    hard ``timeout_s``.  On timeout, ``match`` is the normalised exact match.
    Worker start-up (about 2 s, first call or after a timeout killed one) is
    bounded separately by ``MathVerifier.start_timeout_s``.
    """
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            pred, gold = ("" if pred is None else str(pred)), ("" if gold is None else str(gold))
        pred_n, gold_n = normalize_answer(pred), normalize_answer(gold)
        if not pred_n or not gold_n:
            return False, "unparseable"
        if pred_n == gold_n:
            return True, "ok"
        pred_num, gold_num = _as_number(pred_n), _as_number(gold_n)
        if pred_num is not None and gold_num is not None:
            if pred_num == gold_num:
                return True, "ok"
            # Exact rationals compare exactly (as math-verify does); with a decimal
            # on either side math-verify rounds both to 6 places, so only a gap
            # below 1e-6 can still be "equal" and needs it.
            if ("." not in pred_n and "." not in gold_n) or abs(pred_num - gold_num) >= _FLOAT_TOLERANCE:
                return False, "ok"
        pred_w, gold_w = _plain_words(pred), _plain_words(gold)
        if pred_w is not None and gold_w is not None:
            return pred_w == gold_w, "ok"
        if len(pred) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
            return False, "unparseable"
        result = (verifier or get_default_verifier()).verify(_clean_for_latex(pred), _clean_for_latex(gold), timeout_s)
        if result is None:
            return False, "timeout"
        return result
    except Exception:  # never let a reward crash a run
        logger.exception("answer check failed; counting as unparseable")
        return False, "unparseable"


def answers_match(pred: str, gold: str, timeout_s: float = 2.0) -> bool:
    """True if ``pred`` and ``gold`` are mathematically equivalent (see :func:`check_answer`)."""
    return check_answer(pred, gold, timeout_s)[0]


# --------------------------------------------------------------------------- #
# Reward                                                                       #
# --------------------------------------------------------------------------- #


@dataclass
class RewardConfig:
    """reward = accuracy_weight * correct + format_bonus * format_ok.

    Paper default: binary correctness (1.0, 0.0).  The authors' code uses
    accuracy_weight=0.9, format_bonus=0.1.
    """

    format_bonus: float = 0.0
    accuracy_weight: float = 1.0
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"RewardConfig.timeout_s must be positive, got {self.timeout_s}")


@dataclass
class RewardResult:
    reward: float
    correct: bool
    format_ok: bool
    extracted: str | None
    reason: str  # one of REASONS


def score_response(response: str, gold: str, cfg: RewardConfig | None = None) -> RewardResult:
    """Score one response against the reference answer; never raises.

    The gold answer may itself be wrapped (``\\boxed{}`` / ``<answer>``); it is
    extracted the same way when it is.
    """
    cfg = cfg or RewardConfig()
    if not isinstance(response, str):
        response = ""
    gold = "" if gold is None else str(gold)
    format_ok = has_valid_format(response)
    extracted = extract_answer(response)
    if extracted is None:
        correct, reason = False, "no_answer"
    else:
        correct, reason = check_answer(extracted, extract_answer(gold) or gold.strip(), cfg.timeout_s)
    reward = cfg.accuracy_weight * float(correct) + cfg.format_bonus * float(format_ok)
    return RewardResult(reward=reward, correct=correct, format_ok=format_ok, extracted=extracted, reason=reason)


def score_responses(responses: list[str], golds: list[str], cfg: RewardConfig | None = None) -> list[RewardResult]:
    """:func:`score_response` over aligned lists."""
    if len(responses) != len(golds):
        raise ValueError(f"score_responses: {len(responses)} responses but {len(golds)} gold answers")
    return [score_response(r, g, cfg) for r, g in zip(responses, golds)]
