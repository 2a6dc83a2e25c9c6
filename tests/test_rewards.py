"""Rewards: answer extraction, format check, math equivalence with a hard timeout, scoring."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_rlsd.rewards import (
    REASONS,
    MathVerifier,
    RewardConfig,
    answers_match,
    check_answer,
    extract_answer,
    get_default_verifier,
    has_valid_format,
    normalize_answer,
    score_response,
)
from megatron_rlsd.rewards import math_verify_worker

# sympy never finishes this comparison (it evaluates the power tower).
PATHOLOGICAL = "9^{9^{9^{9}}}"
# Generous per-call timeout where a test asserts a math-verify *result*: a
# loaded CI machine can slow a cold sympy path past the 2 s default.
SLOW_OK = 20.0


@pytest.fixture(scope="module", autouse=True)
def warm_verifier():
    assert get_default_verifier().warmup(), "math-verify worker did not start"
    yield


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<thought>t</thought><answer> 42 </answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>1</answer> and a truncated <answer>2", "1"),
        ("no tags, but \\boxed{\\frac{1}{2}} here", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{ {a}{b{c}} }", "{a}{b{c}}"),
        ("\\boxed{\\boxed{3}}", "\\boxed{3}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{1} and an unbalanced \\boxed{2", "1"),
        ("unbalanced \\boxed{\\frac{1}{2}", None),
        ("} stray \\boxed{5} }", "5"),
        ("<answer>7</answer> wins over \\boxed{8}", "7"),
        ("<answer>   </answer>", None),
        ("nothing here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 150_000,  # ~1 MB of unclosed boxes: a naive rescan is quadratic
        "<answer>" * 130_000 + "</answer>",
        "{" * 500_000 + "}" * 500_000 + "\\boxed{x}",
        "<thought>" + "a" * 1_000_000,
    ],
)
def test_extract_is_linear_on_1mb(text):
    for fn in (extract_answer, has_valid_format):
        _, seconds = timed(fn, text)
        assert seconds < 2.0  # linear scans take milliseconds; quadratic ones take minutes


def test_extract_never_raises_on_non_strings():
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert has_valid_format(b"<thought>") is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<thought>think</thought><answer>3</answer>", True),
        ("  <thought>a</thought>\nsome text\n<answer>3</answer>\n", True),
        ("<thought></thought><answer></answer>", True),
        ("<answer>3</answer>", False),
        ("<thought>a</thought>", False),
        ("preamble <thought>a</thought><answer>3</answer>", False),
        ("<thought>a</thought><answer>3</answer> trailing", False),
        ("<answer>3</answer><thought>a</thought>", False),
        ("<thought>a<answer>3</answer>", False),
        ("<thought>a</thought></answer>", False),
    ],
)
def test_has_valid_format(text, ok):
    assert has_valid_format(text) is ok


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{2}{4}", "1/2"),
        ("8.0", "8"),
        ("$8$", "8."),
        ("x=3", "3"),  # math-verify 0.9 reduces an assignment to its value
        ("3", "x=3"),
        ("0.333333", "\\frac{1}{3}"),  # math-verify rounds floats to 6 places
        ("2x+1", "1+2x"),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
        ("50\\%", "0.5"),
        ("\\boxed{12}", "12"),
        ("Yes", "yes"),
    ],
)
def test_equivalent_answers(pred, gold):
    assert check_answer(pred, gold, timeout_s=SLOW_OK) == (True, "ok")
    assert answers_match(pred, gold, timeout_s=SLOW_OK)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("9", "8"),
        ("0.5", "0.6"),
        ("1/3", "0.33"),
        ("2x+1", "2x-1"),
        ("\\sqrt{2}", "2"),
        ("no", "on"),  # math-verify alone reads these as the products n*o == o*n
        ("", "3"),
        ("3", ""),
    ],
)
def test_wrong_answers(pred, gold):
    match, reason = check_answer(pred, gold, timeout_s=SLOW_OK)
    assert not match and reason in ("ok", "unparseable")
    assert not answers_match(pred, gold)


def test_normalize_answer():
    assert normalize_answer(" $ \\boxed{ 1 / 2 } $. ") == "1/2"
    assert normalize_answer("\\text{ yes }") == "yes"
    assert normalize_answer("\\boxed{1}+\\boxed{2}") == "\\boxed{1}+\\boxed{2}"  # not one wrapper


def test_model_output_is_never_evaluated_as_python(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for gold in ("0", payload):
        assert check_answer(payload, gold if gold != payload else "1", timeout_s=SLOW_OK)[0] is False
    assert not marker.exists()


# --------------------------------------------------------------------------- the worker pool


def test_concurrent_threads_get_correct_answers():
    pairs = [(f"{k}x+{k + 1}", f"{k + 1}+{k}x", True) for k in range(2, 6)]
    pairs += [(f"{k}x", f"{k + 1}x", False) for k in range(2, 6)]
    out: dict[int, tuple[bool, str]] = {}

    def run(i, pred, gold):
        out[i] = check_answer(pred, gold, timeout_s=SLOW_OK)

    threads = [threading.Thread(target=run, args=(i, p, g)) for i, (p, g, _) in enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [out.get(i) for i in range(len(pairs))] == [(expected, "ok") for _, _, expected in pairs]


def worker_pid(verifier: MathVerifier) -> int:
    """pid of the worker that takes the next task: the only one when max_workers=1 (waits until it is ready)."""
    return verifier._pool.schedule(os.getpid).result(timeout=120)


def is_running(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def wait_until_busy(pid: int, cpu_s: float = 0.0) -> None:
    """Until the worker (idle: sleeping) computes, and has used ``cpu_s`` of CPU since the call."""
    process = psutil.Process(pid)
    start, deadline = process.cpu_times().user, time.monotonic() + 60
    while process.status() != psutil.STATUS_RUNNING or process.cpu_times().user - start < cpu_s:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def solo():
    """A one-worker verifier whose worker the tests can find, signal and kill."""
    verifier = MathVerifier(max_workers=1, memory_mb=256)
    assert verifier.warmup()
    yield verifier
    verifier.close()


def test_timeouts_kill_the_worker_and_a_new_one_takes_over(solo):
    """From a worker thread: math-verify's own timeout (signal.alarm) works only in the main one."""
    pid, timeouts = worker_pid(solo), solo.stats["timeout"]
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=timed(check_answer, PATHOLOGICAL, "1", 0.5, verifier=solo)))
    thread.start()
    thread.join(timeout=60)
    result, seconds = out["r"]
    assert result == (False, "timeout") and solo.stats["timeout"] == timeouts + 1
    assert 0.5 <= seconds < 0.5 + 1.5
    assert not psutil.pid_exists(pid)  # killed and reaped, not left computing
    # The replacement's start-up (~2.5 s of CPU) is not charged to the next call's timeout.
    assert check_answer("3x+1", "1+3x", timeout_s=1.0, verifier=solo) == (True, "ok")
    assert worker_pid(solo) != pid
    # Falls back to the normalised exact match on timeout.
    assert check_answer(PATHOLOGICAL, PATHOLOGICAL, timeout_s=0.5) == (True, "ok")


def test_workers_leave_stop_signals_to_the_trainer(solo):
    """Slurm and terminals signal the whole process group; the trainer checkpoints on SIGTERM /
    SIGUSR1 and still needs its verifier for the step it is finishing."""
    pid, errors = worker_pid(solo), solo.stats["worker_error"]
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        os.kill(pid, sig)
    time.sleep(0.5)
    assert is_running(pid) and worker_pid(solo) == pid
    n = 3 * 10**7  # ~0.5 s of summing
    busy = solo._pool.schedule(sum, (range(n),))
    wait_until_busy(pid)
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        os.kill(pid, sig)
    assert busy.result(timeout=120) == n * (n - 1) // 2 and worker_pid(solo) == pid
    assert check_answer("7y", "y+6y", timeout_s=SLOW_OK, verifier=solo) == (True, "ok")
    assert solo.stats["worker_error"] == errors


def test_worker_stdout_is_discarded(solo):
    assert os.readlink(f"/proc/{worker_pid(solo)}/fd/1") == os.devnull  # libraries' prints go nowhere


_SCRIPT = """
import os, sqlite3, sys  # sqlite3 stands in for the torch / vLLM a trainer script imports
sys.path.insert(0, {repo!r})
print("main ran", flush=True)  # no __main__ guard on purpose
from megatron_rlsd.rewards import MathVerifier

verifier = MathVerifier(max_workers=1)
assert verifier.warmup()
pid = verifier._pool.schedule(os.getpid).result()
for who in ("self", pid):
    with open(f"/proc/{{who}}/maps") as f:
        print(who == "self" and "parent" or "worker", "_sqlite3" in f.read())
verifier.close()
"""


def test_workers_import_only_what_they_need(tmp_path):
    """Workers are fresh interpreters (a fork would carry the trainer's libraries and threads)
    that skip the caller's __main__ (spawn re-imports it: seconds of torch import per worker)."""
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1])))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n") == ["main ran", "parent True", "worker False", ""]


def test_worker_memory_is_capped(solo):
    pid = worker_pid(solo)
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        soft = next(line.split()[3] for line in f if line.startswith("Max address space"))
    vm_size = psutil.Process(pid).memory_info().vms
    assert soft != "unlimited" and 0 < int(soft) - vm_size <= 256 * 2**20
    with pytest.raises(MemoryError):
        solo._pool.schedule(bytearray, (512 * 2**20,)).result(timeout=60)
    assert worker_pid(solo) == pid  # a MemoryError is an answer, not a crash
    assert check_answer("8y", "y+7y", timeout_s=SLOW_OK, verifier=solo) == (True, "ok")


def test_dead_workers_are_replaced(solo):
    # Killed while idle (pebble then declares the whole pool broken): the next call gets a new pool.
    pid = worker_pid(solo)
    os.kill(pid, signal.SIGKILL)
    assert check_answer("9y", "y+8y", timeout_s=SLOW_OK, verifier=solo) == (True, "ok")
    # Killed mid-task (memory cap in C, OOM killer): that call falls back, the next one works.
    pid, errors = worker_pid(solo), solo.stats["worker_error"]
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=check_answer(PATHOLOGICAL, "1", 30.0, verifier=solo)))
    thread.start()
    # Well into the task: pebble breaks the whole pool if a worker dies before it has seen the
    # task's acknowledgement (and the task is then retried on a new pool).
    wait_until_busy(pid, cpu_s=0.3)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert result["out"] == (False, "unparseable") and solo.stats["worker_error"] == errors + 1
    assert check_answer("10y", "y+9y", timeout_s=SLOW_OK, verifier=solo) == (True, "ok")


# Stand-ins for math_verify_worker's functions; workers import them from this module by name.
def _crash(pred, gold, exit_after_s):
    os._exit(3)


def _no_start(memory_mb):
    pass


def _never_ready(memory_mb):
    time.sleep(120)


def test_crashing_or_never_ready_workers_fall_back(monkeypatch):
    monkeypatch.setattr(math_verify_worker, "start", _no_start)
    monkeypatch.setattr(math_verify_worker, "check", _crash)
    verifier = MathVerifier(max_workers=1)
    try:
        assert check_answer("2y", "y+y", timeout_s=SLOW_OK, verifier=verifier) == (False, "unparseable")
        assert verifier.stats["worker_error"] == 1
    finally:
        verifier.close()
    # Workers that never become ready: a bounded wait, then math-verify is switched off.
    monkeypatch.setattr(math_verify_worker, "start", _never_ready)
    verifier = MathVerifier(max_workers=1, start_timeout_s=0.5, max_start_failures=2)
    try:
        for _ in range(3):
            result, seconds = timed(check_answer, "2y", "y+y", timeout_s=0.5, verifier=verifier)
            assert result == (False, "unparseable") and seconds < 0.5 + 0.5 + 1.5
        assert verifier._disabled and verifier._pool is None
        assert check_answer("2", "2.0", verifier=verifier) == (True, "ok")  # fast paths still work
    finally:
        verifier.close()


def test_overlong_answers_skip_math_verify():
    long_answer = "x+" * 2000 + "1"
    assert check_answer(long_answer, "1") == (False, "unparseable")
    assert check_answer(long_answer, long_answer) == (True, "ok")


# --------------------------------------------------------------------------- scoring


def test_score_response():
    good = "<thought>1+1</thought><answer>2</answer>"
    slow_ok = RewardConfig(timeout_s=SLOW_OK)
    assert score_response(good, "2") == score_response(good, "2", RewardConfig())
    r = score_response(good, "2")
    assert (r.reward, r.correct, r.format_ok, r.extracted, r.reason) == (1.0, True, True, "2", "ok")
    authors = RewardConfig(format_bonus=0.1, accuracy_weight=0.9)
    assert score_response(good, "2", authors).reward == pytest.approx(1.0)
    assert score_response(good, "3", authors).reward == pytest.approx(0.1)
    authors.timeout_s = SLOW_OK
    assert score_response("the answer is \\boxed{\\frac{1}{2}}", "0.5", authors).reward == pytest.approx(0.9)
    r = score_response("I don't know", "2", authors)
    assert (r.reward, r.reason, r.extracted) == (0.0, "no_answer", None)
    r = score_response("<answer>\\frac{</answer>", "7", slow_ok)
    assert (r.correct, r.reason) == (False, "unparseable")
    # A wrapped gold answer is extracted like a response.
    assert score_response(good, "\\boxed{2}").correct
    assert score_response(None, "2").reason == "no_answer"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        RewardConfig(timeout_s=0)


_FRAGMENTS = st.sampled_from(
    ["<answer>", "</answer>", "<thought>", "</thought>", "\\boxed{", "{", "}", "\\frac{1}{2}", "x=", "^{", "$", "\\", "0.5", "9"]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(st.one_of(st.text(max_size=20), _FRAGMENTS), max_size=12).map("".join), gold=st.text(max_size=12))
def test_fuzz_never_raises_and_is_bounded(text, gold):
    extracted = extract_answer(text)
    assert extracted is None or isinstance(extracted, str)
    assert isinstance(has_valid_format(text), bool)
    cfg = RewardConfig(format_bonus=0.1, accuracy_weight=0.9, timeout_s=1.0)
    verifier = get_default_verifier()
    for g in (gold, "1/2"):
        result, seconds = timed(score_response, text, g, cfg)
        assert result.reason in REASONS
        assert 0.0 <= result.reward <= 1.0
        assert seconds < cfg.timeout_s + 1.5
        if result.reason == "timeout":  # the killed worker's replacement starts in the background:
            assert verifier.warmup()  # wait for a ready worker, so the next bound holds


def test_start_spawns_the_workers_in_the_background():
    """The trainer starts the reward workers before loading its model: start() returns at once
    and the workers import math-verify on their own; the first check then finds them ready."""
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    verifier = MathVerifier(max_workers=2)
    try:
        t0 = time.monotonic()
        verifier.start()
        assert time.monotonic() - t0 < 1.0  # importing math-verify takes seconds: not waited for
        deadline = time.monotonic() + 60
        while len({p.pid for p in me.children()} - before) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len({p.pid for p in me.children()} - before) == 2  # both workers, unasked
        assert check_answer("2x+1", "1+2x", timeout_s=SLOW_OK, verifier=verifier)[0] is True
    finally:
        verifier.close()
