"""tools/plot_metrics.py and tools/credit_heatmap.py on fixture runs, and the credit dump format
(megatron_rlsd/credit_dump.py) they read."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_tool
from PIL import Image

from megatron_rlsd.credit_dump import CreditDumpRow, credit_dump_path, credit_rows, read_credit_dump, write_credit_dump

sys.path.insert(0, str(REPO / "tools"))
import credit_heatmap  # noqa: E402
import plot_metrics  # noqa: E402


def write_metrics(run: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    run.mkdir(parents=True)
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def fixture_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Two runs: an RLSD run (resumed: step 3 logged twice, the last row counts; one unreadable
    line; a NaN) and a GRPO run without clip shares."""
    rlsd = [{"step": s, "reward": 0.1 * s, "accuracy": 0.1 * s, "entropy": 0.5 - 0.01 * s, "clip_low": 0.01, "clip_high": 0.02,
             "lambda": 0.5 - 0.01 * s, "train_rollout_logp_diff": 4e-7, "response_len": 20.0 + s, "format_ok": 0.8,
             "truncated": 0.02} for s in (1, 2, 3)]  # fmt: skip
    rlsd.append(dict(rlsd[2], reward=0.9))  # step 3 again, after a resume
    rlsd.append(dict(rlsd[2], step=4, reward=0.4, entropy=float("nan")))
    grpo = [{"step": s, "reward": 0.05 * s, "accuracy": 0.05 * s, "entropy": 0.5, "lambda": 0.0, "response_len": 21.0,
             "format_ok": 0.7, "truncated": 0.03, "train_rollout_logp_diff": 5e-7} for s in (1, 2, 3, 4)]  # fmt: skip
    return write_metrics(tmp_path / "rlsd", rlsd, ("{not json",)), write_metrics(tmp_path / "grpo", grpo)


def test_plot_metrics_reads_runs(tmp_path):
    rlsd, _ = fixture_runs(tmp_path)
    name, rows, bad = plot_metrics.read_run(str(rlsd))
    assert (name, sorted(rows), bad) == ("rlsd", [1, 2, 3, 4], 1)
    assert plot_metrics.series(rows, "reward") == ([1, 2, 3, 4], [0.1, 0.2, 0.9, 0.4])  # the resumed step's last row
    assert plot_metrics.series(rows, "entropy")[0] == [1, 2, 3]  # NaN not drawn
    assert plot_metrics.read_run(f"mine={rlsd}")[0] == "mine"
    assert plot_metrics.ema([1.0, 0.0, 0.0], 0.5) == [1.0, 0.5, 0.25]


def test_plot_metrics_draws_one_subplot_per_metric(tmp_path):
    rlsd, grpo = fixture_runs(tmp_path)
    out = tmp_path / "plots" / "curves.png"
    proc = run_tool("plot_metrics", str(rlsd), f"baseline={grpo}", "--out", str(out), "--smooth", "0.5")
    assert "note: no run logged 'leakage'; left out" in proc.stderr
    assert "skipped 1 unreadable line(s)" in proc.stderr
    # 10 metrics (leakage left out) -> 4 rows x 3 columns of 4.6 x 3.1 inches (+0.6) at 110 dpi
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (round(3 * 4.6 * 110), round((4 * 3.1 + 0.6) * 110))
    few = tmp_path / "few.png"
    assert plot_metrics.main([str(grpo), "--out", str(few), "--metrics", "reward,clip_low"]) == 0
    with Image.open(few) as img:  # clip_low is in no run: one subplot
        assert img.size == (round(4.6 * 110), round((3.1 + 0.6) * 110))
    proc = run_tool("plot_metrics", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"plot_metrics: error: {tmp_path / 'nope'}: no metrics.jsonl " \
        "(give a run's output directory or its metrics.jsonl)"


def test_plot_metrics_bad_input(tmp_path, capsys):
    rlsd, grpo = fixture_runs(tmp_path)
    for args, message in (([str(grpo), "--metrics", "leakage"], "none of the metrics ['leakage'] is in any run"),
                          ([str(rlsd), f"rlsd={grpo}"], "two runs are both named 'rlsd'; name them: NAME=RUN_DIR"),
                          ([str(grpo), "--smooth", "1"], "--smooth 1.0: must be in [0, 1)")):  # fmt: skip
        assert plot_metrics.main([*args, "--out", str(tmp_path / "x.png")]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == f"plot_metrics: error: {message}", last
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------ credit dumps
def dump_rows(step: int) -> list[CreditDumpRow]:
    """Two prompts: one whose samples differ in reward (credit), one whose samples all failed
    (A = 0: no credit)."""

    def row(sid, correct, adv, credit, delta):
        tokens = ["<answer>", "1", "2", "</answer>", "\n"][: len(credit)]
        prompt = "<|im_start|>user\nWhat is 5 + 7?"
        return CreditDumpRow(step, sid, prompt, "12", tokens, credit, delta, adv, float(correct), correct)

    return [
        row("p0#0", False, 0.0, [0.0, 0.0, 0.0], [0.1, -0.2, 0.3]),
        row("p1#0", True, 1.5, [1.4, 1.6, 1.5, 1.5, 1.45], [-0.3, 0.9, 0.0, 0.1, -0.05]),
        row("p1#1", False, -1.5, [-1.6, -1.4, -1.5], [0.2, -0.4, 0.0]),
        row("p1#2", True, 1.5, [1.5, 1.5], None),
    ]


def test_credit_dump_round_trip_and_schema(tmp_path):
    path = write_credit_dump(credit_dump_path(tmp_path, 7), dump_rows(7))
    assert path == tmp_path / "credit" / "step_0000007.jsonl"
    assert read_credit_dump(path) == dump_rows(7)
    first = json.loads(path.read_text().splitlines()[1])
    assert list(first) == ["step", "sample_id", "prompt", "answer", "tokens", "credit", "delta", "advantage", "reward", "correct"]
    bad = dump_rows(7)[1]
    bad.credit = bad.credit[:-1]
    with pytest.raises(ValueError, match="credit must be a list of one number per token"):
        write_credit_dump(tmp_path / "x.jsonl", [bad])
    bad.credit = [1.0, math.nan, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="credit values must be finite"):
        write_credit_dump(tmp_path / "x.jsonl", [bad])
    assert not (tmp_path / "x.jsonl").exists()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(path.read_text().splitlines()[0] + '\n{"step": 7, "sample_id": "q"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: missing key\(s\) \['prompt'"):
        read_credit_dump(broken)


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join({1: "<|image_pad|>", 2: "<|im_end|>"}.get(i, chr(i)) for i in ids)


def test_credit_rows_from_a_batch():
    """What the trainer dumps from a batch on the last stage: per-outcome limits, masked token
    counts, the prompt with runs of a special token collapsed."""
    row_a, row_b = SimpleNamespace(id="a", answer="7"), SimpleNamespace(id="b", answer="9")

    def sample(row, response, correct, adv):
        prompt = [ord(c) for c in "Q:"] + [1, 1, 1] + [ord("?")]
        return SimpleNamespace(row=row, student_prompt=prompt, response=response, correct=correct, advantage=adv,
                               reward=float(correct))

    samples = [sample(row_a, [55, 2], True, 1.0), sample(row_a, [56, 57, 2], False, -1.0), sample(row_a, [55, 2], True, 1.0),
               sample(row_b, [57, 2], False, -0.5)]  # fmt: skip
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    credit = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    delta = -credit / 10
    rows = credit_rows(3, samples, credit, delta, mask, _Tokenizer(), limit=1)
    assert [(r.sample_id, r.correct, r.tokens, r.credit) for r in rows] == [
        ("a#0", True, ["7", "<|im_end|>"], [0.0, 1.0]), ("a#1", False, ["8", "9", "<|im_end|>"], [3.0, 4.0, 5.0]),
    ]  # fmt: skip
    assert rows[1].delta == pytest.approx([-0.3, -0.4, -0.5])
    assert rows[0].prompt == "Q:<|image_pad|>×3?" and rows[0].answer == "7" and rows[0].step == 3
    assert credit_rows(3, samples, credit, None, mask, _Tokenizer())[3].delta is None


def test_credit_heatmap_from_a_fixture_dump(tmp_path, capsys):
    run = tmp_path / "run"
    write_credit_dump(credit_dump_path(run, 4), dump_rows(4)[:2])
    write_credit_dump(credit_dump_path(run, 12), dump_rows(12))
    out = tmp_path / "heat"
    proc = run_tool("credit_heatmap", "--run", str(run), "--out", str(out), "--per-outcome", "1")  # the newest dump
    assert "credit_step_0000012.html" in proc.stdout
    page = (out / "credit_step_0000012.html").read_text()
    # one correct and one incorrect sample carrying credit; the A = 0 one is not shown first
    assert "p1#0" in page and "p1#1" in page and "p0#0" not in page and "p1#2" not in page
    assert page.count("<span style=") == 5 + 3
    assert "A_t = +1.60000\nDelta_t = +0.9000" in page and "A_t = -1.40000\nDelta_t = -0.4000" in page
    assert "&lt;answer&gt;" in page and "\u21b5\n" in page  # tokens escaped; a newline token shown and kept
    # colours: blue for A_t > 0, red for A_t < 0; within a sample the largest |A_t| is the darkest
    spans = page.split("<span style='background:rgb")[1:]
    rgb = [tuple(int(v) for v in s[1 : s.index(")")].split(",")) for s in spans]
    assert all(b > r for r, g, b in rgb[:5]) and all(r > b for r, g, b in rgb[5:])
    assert sum(rgb[1]) == min(sum(c) for c in rgb[:5]) and sum(rgb[0]) == max(sum(c) for c in rgb[:5])
    with Image.open(out / "credit_step_0000012.png") as img:
        assert img.format == "PNG" and img.size[0] > 500 and img.size[1] > 100
    # explicit samples, absolute scale: the same colour for the same |A_t| in different samples
    assert credit_heatmap.main(["--run", str(run), "--step", "12", "--out", str(out), "--sample-id", "p1#2",
                                "--sample-id", "p1#0", "--scale", "absolute"]) == 0  # fmt: skip
    page = (out / "credit_step_0000012.html").read_text()
    assert page.index("p1#2") < page.index("p1#0") and "Delta_t = n/a" in page
    assert credit_heatmap.intensities(dump_rows(12)[1:3], "absolute")[1] == pytest.approx([-1.0, -1.4 / 1.6, -1.5 / 1.6])

    for args, message in (
        (["--step", "5"], "no credit dump for step 5 (dumps: step_0000004.jsonl, step_0000012.jsonl)"),
        (["--step", "12", "--sample-id", "nope"], "no sample 'nope' in the dump"),
    ):
        assert credit_heatmap.main(["--run", str(run), "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("credit_heatmap: error: "), err
    broken = credit_dump_path(run, 13)
    broken.write_text(json.dumps(dict(json.loads(credit_dump_path(run, 4).read_text().splitlines()[0]), delta=[1.0])) + "\n")
    assert credit_heatmap.main(["--run", str(run), "--out", str(out)]) == 2
    assert "step_0000013.jsonl:1: sample 'p0#0': delta must be a list" in capsys.readouterr().err
