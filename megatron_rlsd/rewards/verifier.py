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
   ``math_verify.verify`` in a persistent worker process.

Why a worker process: math-verify's own timeout is ``signal.alarm``, which
only works in the main thread (in any other thread it raises ``ValueError``),
has whole-second resolution, and cannot stop a computation stuck in C (sympy
evaluating ``9^{9^{9^9}}`` never returns).  The worker runs math-verify with
its signal timeouts disabled; the caller waits on the pipe for at most
``timeout_s`` and, past it, kills the worker (SIGKILL always works) and starts
a fresh one in the background.  The guard therefore holds in any thread.
Callers in several threads get one worker each (up to ``max_workers``).

Model output is never evaluated as Python: only math-verify's LaTeX path is
used (an ANTLR grammar), never its ``ExprExtractionConfig``, which goes through
``sympy.parse_expr`` (``eval``).  The worker also caps its address space.

When math-verify times out or is unavailable, the result falls back to the
normalised exact match of step 1 (reason "timeout" / "unparseable"); when it
cannot turn a side into an expression, only its string comparison applies
(reason "unparseable").  The reasons are there for counting.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

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
# The math-verify worker process                                               #
# --------------------------------------------------------------------------- #


def _latex_wrap(s: str) -> str:
    if "\\boxed" in s:
        return s
    return "\\boxed{" + s + "}" if _balanced(s) else "$" + s + "$"


def _math_verify_check(pred: str, gold: str) -> tuple[bool, str]:
    """math-verify on two answer strings, signal timeouts off (run in the worker)."""
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig()]
    gold_parsed = parse(_latex_wrap(gold), extraction_config=config, parsing_timeout=None)
    pred_parsed = parse(_latex_wrap(pred), extraction_config=config, parsing_timeout=None)
    match = bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    parsed_both = any(not isinstance(x, str) for x in gold_parsed) and any(not isinstance(x, str) for x in pred_parsed)
    return match, ("ok" if parsed_both else "unparseable")


_WARMUP_PAIRS = (
    ("1/2", "0.5"),
    ("x=3", "3"),
    ("2x+1", "1+2x"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("(1,2)", "(1, 2)"),
    ("50\\%", "0.5"),
    ("\\sqrt{2}", "2"),
    ("2\\pi", "\\frac{\\pi}{2}"),
    ("\\sin(x)", "\\cos(x)"),
    ("\\log(2)", "e^{2}"),
    ("x^2-1", "(x-1)(x+1)"),
    ("[1,2)", "x<2"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)"),
)


def _watch_parent(ppid: int) -> None:
    while os.getppid() == ppid:
        time.sleep(0.5)
    os._exit(0)


def _limit_memory(headroom_mb: int) -> None:
    if headroom_mb <= 0:
        return
    try:
        import resource

        with open("/proc/self/status", encoding="ascii") as f:
            vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        limit = vm_kb * 1024 + headroom_mb * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except Exception:  # not Linux, or not permitted: run without the cap
        pass


def _worker_main() -> None:  # pragma: no cover - runs in the child process
    """Serve JSON-line requests ``{"p": pred, "g": gold}`` on stdin until EOF."""
    # Stop signals are the trainer's to act on (Slurm and terminals signal the whole process
    # group): it finishes the step, checkpoints, and closes our stdin; or we see it die.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not the protocol
    sys.stdout = sys.stderr
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pred, gold in _WARMUP_PAIRS:  # import + first use of sympy's code paths (~1.5 s)
        _math_verify_check(pred, gold)
    _limit_memory(int(os.environ.get("RLSD_VERIFIER_MEMORY_MB", "4096")))
    out.write(b'{"ready": true}\n')
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            match, status = _math_verify_check(str(req["p"]), str(req["g"]))
        except Exception:
            match, status = False, "unparseable"
        out.write(json.dumps({"m": match, "s": status}).encode() + b"\n")


_BOOTSTRAP = """
import sys, types
root, package = sys.argv[1], sys.argv[2]
parts = package.split(".")
for i in range(1, len(parts) + 1):  # stub parent packages: skip their __init__ (torch etc.)
    mod = types.ModuleType(".".join(parts[:i]))
    mod.__path__ = [root + "/" + "/".join(parts[:i])]
    sys.modules[mod.__name__] = mod
__import__(package + ".verifier", fromlist=["_worker_main"])._worker_main()
"""


class _WorkerTimeout(Exception):
    pass


class _Worker:
    """One child process speaking JSON lines; used by one thread at a time."""

    def __init__(self, memory_mb: int):
        package = __name__.rsplit(".", 1)[0]
        root = str(Path(__file__).resolve().parents[package.count(".") + 1])
        env = dict(os.environ, RLSD_VERIFIER_MEMORY_MB=str(memory_mb), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, root, package],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )  # fmt: skip
        self.ready = False
        self._buf = b""

    def _readline(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _WorkerTimeout
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                raise _WorkerTimeout
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError(f"verifier worker exited (rc={self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self, deadline: float) -> None:
        if not self.ready:
            self._readline(deadline)
            self.ready = True

    def request(self, pred: str, gold: str, deadline: float) -> tuple[bool, str]:
        self.proc.stdin.write(json.dumps({"p": pred, "g": gold}).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._readline(deadline)
        return bool(reply["m"]), str(reply["s"])

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except Exception:
                pass


class MathVerifier:
    """A pool of math-verify worker processes with a per-call hard timeout.

    Thread-safe; each concurrent caller checks out its own worker (spawned
    lazily, at most ``max_workers``).  ``start_timeout_s`` bounds the wait for
    a worker's start-up (import + warm-up, about 1 s), which is not charged
    to the per-call ``timeout_s``; :meth:`warmup` starts one ahead of time.
    After ``max_start_failures`` consecutive failed start-ups math-verify is
    disabled for this process (string fallback, reason "unparseable").
    """

    def __init__(
        self,
        max_workers: int | None = None,
        start_timeout_s: float = 60.0,
        memory_mb: int = 4096,
        cache_size: int = 8192,
        max_start_failures: int = 3,
    ):
        self.max_workers = max_workers or max(1, min(8, os.cpu_count() or 1))
        self.start_timeout_s = start_timeout_s
        self.memory_mb = memory_mb
        self.max_start_failures = max_start_failures
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._count = 0
        self._pid = os.getpid()
        self._start_failures = 0
        self._disabled = not sys.executable
        self._cache: collections.OrderedDict[tuple[str, str], tuple[bool, str]] = collections.OrderedDict()
        self._cache_size = cache_size
        self.stats = collections.Counter()

    # -- pool ---------------------------------------------------------------
    def _after_fork_check(self) -> None:
        if os.getpid() != self._pid:  # forked child: the workers belong to the parent
            for worker in self._idle:  # drop our copies of the pipes, leave the processes alone
                for stream in (worker.proc.stdin, worker.proc.stdout):
                    try:
                        stream.close()
                    except Exception:
                        pass
            self._idle, self._count, self._pid = [], 0, os.getpid()
            self._cond = threading.Condition()

    def _acquire(self, deadline: float) -> _Worker | None:
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._count < self.max_workers:
                    self._count += 1
                    try:
                        return _Worker(self.memory_mb)
                    except Exception:
                        self._count -= 1
                        raise
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    if not self._idle:
                        return None

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def _discard(self, worker: _Worker, respawn: bool) -> None:
        worker.kill()
        with self._cond:
            self._count -= 1
            if respawn and not self._disabled and self._count < self.max_workers:
                try:  # start the replacement now so it warms up in the background
                    self._idle.append(_Worker(self.memory_mb))
                    self._count += 1
                except Exception:
                    logger.exception("could not start a math-verify worker")
            self._cond.notify()

    def warmup(self) -> bool:
        """Start one worker and wait until it is ready; False if math-verify is unavailable."""
        self._after_fork_check()
        if self._disabled:
            return False
        worker = self._acquire(time.monotonic() + self.start_timeout_s)
        if worker is None:
            return True  # all workers busy, hence started
        try:
            worker.wait_ready(time.monotonic() + self.start_timeout_s)
        except Exception as exc:
            self._start_failed(worker, exc)
            return False
        self._start_failures = 0
        self._release(worker)
        return True

    def _start_failed(self, worker: _Worker, exc: BaseException) -> None:
        self._start_failures += 1
        if self._start_failures >= self.max_start_failures:
            self._disabled = True
            logger.error(
                "math-verify worker failed to start %d times (%r); using exact string match only", self._start_failures, exc
            )
        else:
            logger.warning("math-verify worker failed to start (%r)", exc)
        self._discard(worker, respawn=False)

    def close(self) -> None:
        """Stop all idle workers (busy ones are stopped when their call returns)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        if os.getpid() == self._pid:
            for worker in idle:
                worker.kill()

    # -- checking -------------------------------------------------------------
    def verify(self, pred: str, gold: str, timeout_s: float = 2.0) -> tuple[bool, str] | None:
        """math-verify result ``(match, "ok" | "unparseable")``, or None on timeout.

        Raises nothing; an unavailable verifier reads as ``(False, "unparseable")``.
        """
        key = (pred, gold)
        with self._cond:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.stats["cache_hit"] += 1
                return self._cache[key]
        self._after_fork_check()
        if self._disabled:
            return False, "unparseable"
        deadline = time.monotonic() + timeout_s
        try:
            worker = self._acquire(deadline)
        except Exception:
            logger.exception("could not start a math-verify worker")
            return False, "unparseable"
        if worker is None:  # every worker busy for the whole timeout
            self.stats["timeout"] += 1
            return None
        if not worker.ready:
            try:
                worker.wait_ready(time.monotonic() + self.start_timeout_s)
                self._start_failures = 0
            except Exception as exc:
                self._start_failed(worker, exc)
                return False, "unparseable"
            deadline = time.monotonic() + timeout_s  # start-up is not the sample's fault
        try:
            result = worker.request(pred, gold, deadline)
        except _WorkerTimeout:
            self.stats["timeout"] += 1
            logger.warning(
                "math-verify timed out after %.1fs on pred=%r gold=%r; worker restarted", timeout_s, pred[:80], gold[:80]
            )
            self._discard(worker, respawn=True)
            return None
        except Exception as exc:  # worker died (memory cap, crash): replace it
            self.stats["worker_error"] += 1
            logger.warning("math-verify worker failed (%r) on pred=%r; worker restarted", exc, pred[:80])
            self._discard(worker, respawn=True)
            return False, "unparseable"
        self._release(worker)
        self.stats["verified"] += 1
        with self._cond:
            self._cache[key] = result
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result


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
