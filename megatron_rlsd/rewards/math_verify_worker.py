"""What runs inside a math-verify worker process of :class:`~megatron_rlsd.rewards.verifier.MathVerifier`.

Only the standard library at import time: a worker is a fresh interpreter that
unpickles :func:`start` and :func:`check` by reference, so importing this module
must stay cheap (math-verify is imported by :func:`start`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys

# Cover the sympy code paths of common answer shapes, so the first real check is fast.
WARMUP_PAIRS = (
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


def start(memory_mb: int) -> None:
    """Pool initializer: harden the process, import and warm up math-verify, cap memory.

    Runs before the worker takes its first task, so none of it (about 1.5 s) is
    charged to a task's timeout.
    """
    # Stop signals are the trainer's to act on (Slurm and terminals signal the whole
    # process group): it finishes its step and checkpoints while we keep serving it.
    # The pool kills us with SIGKILL.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # libraries' prints (Python or C) never reach the console
    os.close(devnull)
    os.environ["OMP_NUM_THREADS"] = "1"  # before numpy (imported by math-verify) sizes its thread pool
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pred, gold in WARMUP_PAIRS:
        _math_verify("\\boxed{" + pred + "}", "\\boxed{" + gold + "}")
    _limit_memory(memory_mb)


def check(pred: str, gold: str, exit_after_s: float) -> tuple[bool, str]:
    """math-verify on two LaTeX answers: ``(match, "ok" | "unparseable")``.

    The pool kills a worker whose task overruns its timeout; if the pool's process
    is gone (parent died), the worker ends itself after ``exit_after_s`` instead:
    faulthandler's watchdog is a C thread, so it fires even while sympy holds the
    GIL in C.  An idle worker of a dead parent exits on its closed task pipe.
    """
    faulthandler.dump_traceback_later(exit_after_s, exit=True, file=sys.stdout)  # fd 1 is /dev/null
    try:
        return _math_verify(pred, gold)
    except Exception:  # MemoryError at the address-space cap included
        return False, "unparseable"
    finally:
        faulthandler.cancel_dump_traceback_later()


def _math_verify(pred: str, gold: str) -> tuple[bool, str]:
    # LaTeX extraction only: ExprExtractionConfig would hand model output to sympy.parse_expr (eval).
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig()]
    gold_parsed = parse(gold, extraction_config=config, parsing_timeout=None)  # None: no signal.alarm
    pred_parsed = parse(pred, extraction_config=config, parsing_timeout=None)
    match = bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    parsed_both = any(not isinstance(x, str) for x in gold_parsed) and any(not isinstance(x, str) for x in pred_parsed)
    return match, ("ok" if parsed_both else "unparseable")


def _limit_memory(headroom_mb: int) -> None:
    """Cap the address space at its current size plus ``headroom_mb`` (0: no cap)."""
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
