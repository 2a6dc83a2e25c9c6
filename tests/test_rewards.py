"""Rewards: answer extraction, format check, math equivalence with a hard timeout, scoring."""

from __future__ import annotations

import os
import signal
import threading
import time

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
from megatron_rlsd.rewards import verifier as verifier_mod

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


# --------------------------------------------------------------------------- timeouts


def test_pathological_input_times_out_and_recovers():
    (match, reason), seconds = timed(check_answer, PATHOLOGICAL, "1", timeout_s=0.5)
    assert (match, reason) == (False, "timeout")
    assert seconds < 0.5 + 1.5
    # Falls back to the normalised exact match on timeout.
    assert check_answer(PATHOLOGICAL, PATHOLOGICAL, timeout_s=0.5) == (True, "ok")
    # The killed worker was replaced: a normal symbolic check works again.
    assert check_answer("3x+2", "2+3x", timeout_s=SLOW_OK) == (True, "ok")


def test_timeout_holds_in_a_worker_thread():
    results = {}

    def run():
        results["out"] = timed(score_response, f"<answer>{PATHOLOGICAL}</answer>", "2", RewardConfig(timeout_s=0.5))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    result, seconds = results["out"]
    assert result.reason == "timeout" and result.correct is False and result.reward == 0.0
    assert seconds < 0.5 + 1.5


def test_concurrent_threads_get_correct_answers():
    pairs = [(f"{k}x+{k + 1}", f"{k + 1}+{k}x", True) for k in (2, 3)] + [(f"{k}x", f"{k + 1}x", False) for k in (2, 3)]
    out: dict[int, tuple[bool, str]] = {}

    def run(i, pred, gold):
        out[i] = check_answer(pred, gold, timeout_s=10.0)

    threads = [threading.Thread(target=run, args=(i, p, g)) for i, (p, g, _) in enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [out[i] for i in range(len(pairs))] == [(expected, "ok") for _, _, expected in pairs]


def _fake_worker(body: str) -> str:
    """A worker bootstrap that reports ready, then behaves as ``body`` per request line."""
    return (
        "import sys, time\n"
        "sys.stdout.write('{\"ready\": true}\\n'); sys.stdout.flush()\n"
        f"for line in sys.stdin:\n    {body}\n"
    )


def test_slow_verifier_is_cut_at_the_timeout(monkeypatch):
    monkeypatch.setattr(verifier_mod, "_BOOTSTRAP", _fake_worker("time.sleep(60)"))
    verifier = MathVerifier(max_workers=1)
    try:
        assert verifier.warmup()
        for timeout_s in (0.3, 0.6):
            result, seconds = timed(check_answer, "2y", "y+y", timeout_s=timeout_s, verifier=verifier)
            assert result == (False, "timeout")
            assert timeout_s <= seconds < timeout_s + 1.5
        assert verifier.stats["timeout"] == 2
    finally:
        verifier.close()


def test_crashing_or_silent_workers_fall_back(monkeypatch):
    monkeypatch.setattr(verifier_mod, "_BOOTSTRAP", _fake_worker("sys.exit(3)"))
    verifier = MathVerifier(max_workers=1)
    try:
        assert check_answer("2y", "y+y", verifier=verifier) == (False, "unparseable")
        assert verifier.stats["worker_error"] == 1
    finally:
        verifier.close()
    # A worker that never becomes ready: bounded start-up wait, then disabled.
    monkeypatch.setattr(verifier_mod, "_BOOTSTRAP", "import time; time.sleep(60)")
    verifier = MathVerifier(max_workers=1, start_timeout_s=0.2, max_start_failures=2)
    try:
        for _ in range(3):
            result, seconds = timed(check_answer, "2y", "y+y", verifier=verifier)
            assert result == (False, "unparseable") and seconds < 2.0
        assert verifier._disabled
        assert check_answer("2", "2.0", verifier=verifier) == (True, "ok")  # fast paths still work
    finally:
        verifier.close()


def test_workers_leave_stop_signals_to_the_trainer():
    """Slurm and terminals signal the whole process group; the trainer checkpoints on SIGTERM /
    SIGUSR1 and still needs its verifier for the step it is finishing."""
    verifier = MathVerifier(max_workers=1)
    try:
        assert verifier.warmup()
        worker = verifier._idle[0]
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            os.kill(worker.proc.pid, sig)
        time.sleep(0.5)
        assert worker.proc.poll() is None
        assert check_answer("2y", "y+y", verifier=verifier) == (True, "ok")
        assert verifier._idle == [worker] and verifier.stats["worker_error"] == 0
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
        # A worker restarted after an earlier timeout may still be starting: its
        # start-up is bounded separately (start_timeout_s), not by timeout_s.
        warm = bool(verifier._idle) and all(w.ready for w in verifier._idle)
        result, seconds = timed(score_response, text, g, cfg)
        assert result.reason in REASONS
        assert 0.0 <= result.reward <= 1.0
        assert seconds < cfg.timeout_s + (1.5 if warm else verifier.start_timeout_s)
