"""Benchmark evaluation (megatron_rlsd.evaluation, tools/evaluate.py).

In-process: the five published layouts (MMMU, MathVista, MathVision, ZeroBench, We-Math) built
here as parquet / JSONL files and read through their presets; multiple-choice letter reading;
scoring and aggregation on planted responses from an engine double (the only place a fake
engine is used); bad input. One real run of tools/evaluate.py under torchrun (2 processes, one
vLLM engine each) on a tiny Qwen3-VL checkpoint with a text benchmark and an image benchmark.
"""

import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_tool

from megatron_rlsd.evaluation import (
    PRESETS,
    EvalDataError,
    EvalRecord,
    EvalRow,
    EvalSampling,
    choose_option,
    evaluate_rows,
    format_table,
    gather_records,
    layout_with,
    load_benchmark,
    problem_text,
    summarize,
    summary_metrics,
)
from megatron_rlsd.rollout.vllm_engine import Generation

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(color=(200, 30, 30), size=(24, 16)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


BROKEN = b"\x89PNG\r\n\x1a\n not really a png"


def write_parquet(path: Path, columns: dict, types: dict | None = None) -> Path:
    types = types or {}
    arrays = {k: pa.array(v, type=types.get(k)) for k, v in columns.items()}
    pq.write_table(pa.table(arrays), path)
    return path


# ------------------------------------------------------------------------------ the five layouts
def mmmu_file(tmp: Path) -> Path:
    """MMMU/MMMU (validation split columns): options as the string of a list, up to 7 image
    columns, a letter answer (multiple choice) or an open answer, sometimes a list of them."""
    img = {"bytes": png(), "path": "a.png"}
    none7 = [None] * 4
    return write_parquet(tmp / "mmmu.parquet", {
        "id": ["validation_Art_1", "validation_Art_2", "validation_Math_3", "validation_Math_4"],
        "question": ["<image 1> Which style?", "Compare <image 1> and <image 2>.", "Compute x in <image 1>.", "Which? <image 1>"],
        "options": ["['Baroque', 'Rococo', 'Gothic']", "['same', 'different']", "[]", "['a', 'b']"],
        "explanation": ["", "", "", ""],
        "image_1": [img, img, img, {"bytes": BROKEN, "path": "x.png"}],
        "image_2": [None, img, None, None],
        **{f"image_{i}": none7 for i in range(3, 8)},
        "img_type": ["['Paintings']"] * 4,
        "answer": ["C", "B", "['24/7', '3.429']", "A"],
        "topic_difficulty": ["Easy"] * 4,
        "question_type": ["multiple-choice", "multiple-choice", "open", "multiple-choice"],
        "subfield": ["Art"] * 4,
    }, {f"image_{i}": IMAGE for i in range(1, 8)})  # fmt: skip


def mathvista_file(tmp: Path) -> Path:
    """AI4Math/MathVista: choices a list (null for free-form), the answer an option's text."""
    img = {"bytes": png((10, 200, 10)), "path": None}
    return write_parquet(tmp / "mathvista.parquet", {
        "pid": ["1", "2", "3"],
        "question": ["What is the area?", "How many bars?", "Which is larger?"],
        "image": ["images/1.jpg", "images/2.jpg", "images/3.jpg"],
        "decoded_image": [img, img, img],
        "choices": [["3", "6", "12"], None, ["left", "right"]],
        "unit": [None, None, None],
        "precision": [None, 1.0, None],
        "answer": ["6", "2.5", "middle"],  # the third is no option: skipped
        "question_type": ["multi_choice", "free_form", "multi_choice"],
        "answer_type": ["text", "float", "text"],
        "query": ["...", "...", "..."],
    }, {"decoded_image": IMAGE, "choices": pa.list_(pa.string())})  # fmt: skip


def mathvision_file(tmp: Path) -> Path:
    """MathLLMs/MathVision: options a list ([] for open), a letter or value answer."""
    img = {"bytes": png((10, 10, 200)), "path": "images/1.jpg"}
    return write_parquet(tmp / "mathvision.parquet", {
        "id": ["1", "2"],
        "question": ["<image1> How many edges?", "<image1> Which net folds into a cube?"],
        "options": [[], ["A", "B", "C", "D", "E"]],
        "image": ["images/1.jpg", "images/2.jpg"],
        "decoded_image": [img, img],
        "answer": ["12", "D"],
        "solution": [None, None],
        "level": [2, 3],
        "subject": ["solid geometry", "descriptive geometry"],
    }, {"decoded_image": IMAGE, "options": pa.list_(pa.string())})  # fmt: skip


def zerobench_file(tmp: Path) -> Path:
    """jonathan-roberts1/zerobench: a list of images per question, open answers."""
    img = {"bytes": png((90, 90, 90)), "path": "q.png"}
    return write_parquet(tmp / "zerobench.parquet", {
        "question_id": ["1", "2"],
        "question_text": ["How much do I save? Give the answer in dollars.", "Count the dots in both images."],
        "question_images_decoded": [[img], [img, img]],
        "question_answer": ["11.90", "42"],
        "question_images": [["images/1.png"], ["images/2_1.png", "images/2_2.png"]],
        "image_attribution": ["", ""],
    }, {"question_images_decoded": pa.list_(IMAGE)})  # fmt: skip


def wemath_file(tmp: Path) -> Path:
    """We-Math/We-Math testmini as JSONL (the GitHub testmini.json rows): options one
    "A. ..;B. .." string, a letter answer, the image as a path relative to the file."""
    (tmp / "3steps" / "image").mkdir(parents=True)
    (tmp / "3steps" / "image" / "165-3.png").write_bytes(png((1, 2, 3)))
    rows = [
        {"ID": "3steps_3", "split": "testmini", "knowledge concept": "Area of Circles", "question": "What is the area?",
         "option": "A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer", "answer": "B",
         "image_path": "3steps/image/165-3.png", "key": "3steps_3", "question number": 1575},
        {"ID": "1step_9", "split": "testmini", "knowledge concept": "Angles", "question": "Which angle?",
         "option": "A. 30°;B. 60°", "answer": "A", "image_path": "3steps/image/missing.png", "key": "1step_9",
         "question number": 9},
    ]  # fmt: skip
    path = tmp / "wemath.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


LAYOUT_FILES = {"mmmu": mmmu_file, "mathvista": mathvista_file, "mathvision": mathvision_file,
                "zerobench": zerobench_file, "wemath": wemath_file}  # fmt: skip


def _summary_of(rows):
    return [(r.id, r.answers, r.options, len(r.images)) for r in rows]


def test_presets_read_the_published_layouts(tmp_path):
    loaded = {}
    for name, make in LAYOUT_FILES.items():
        rows, skipped = load_benchmark(make(tmp_path), PRESETS[name])
        loaded[name] = (_summary_of(rows), [(s.prompt_id, s.reason) for s in skipped])
        assert all(r.benchmark == name for r in rows) and all(s.verdict is None for s in skipped)
    assert loaded["mmmu"] == (
        [("validation_Art_1", ("C",), ["Baroque", "Rococo", "Gothic"], 1),
         ("validation_Art_2", ("B",), ["same", "different"], 2),
         ("validation_Math_3", ("24/7", "3.429"), [], 1)],
        [("validation_Math_4", "undecodable_image")],
    )  # fmt: skip
    # MathVista's multiple-choice answer is the option's text: read as its letter
    assert loaded["mathvista"] == (
        [("1", ("B",), ["3", "6", "12"], 1), ("2", ("2.5",), [], 1)], [("3", "answer_not_an_option")]
    )
    assert loaded["mathvision"] == ([("1", ("12",), [], 1), ("2", ("D",), ["A", "B", "C", "D", "E"], 1)], [])
    assert loaded["zerobench"] == ([("1", ("11.90",), [], 1), ("2", ("42",), [], 2)], [])
    assert loaded["wemath"] == (
        [("3steps_3", ("B",), ["200.96", "3215.36", "6280", "32", "No correct answer"], 1)], [("1step_9", "missing_image")]
    )
    # images: embedded bytes stay bytes; paths are resolved against the data file's folder
    rows, _ = load_benchmark(tmp_path / "wemath.jsonl", PRESETS["wemath"])
    assert rows[0].images == [str(tmp_path / "3steps" / "image" / "165-3.png")]
    rows, _ = load_benchmark(tmp_path / "zerobench.parquet", PRESETS["zerobench"])
    assert rows[1].images[0] == png((90, 90, 90))


def test_column_flags_and_default_layout(tmp_path):
    # MathVista read through flags instead of the preset: the path column, not the embedded image
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(png())
    path = mathvista_file(tmp_path)
    layout = layout_with(PRESETS["default"], id="pid", question="question", options="choices", images=["image"])
    rows, skipped = load_benchmark(path, layout, name="vista")
    assert [(s.prompt_id, s.reason) for s in skipped] == [("2", "missing_image"), ("3", "answer_not_an_option")]
    assert rows[0].images == [str(tmp_path / "images" / "1.jpg")] and rows[0].benchmark == "vista"
    # our training layout: options and images optional, ids default to <stem>:<line>
    data = tmp_path / "add.jsonl"
    data.write_text('{"problem": "What is 3 + 4?", "answer": 7}\n\n{"id": "q2", "problem": "1/2 of 4?", "answer": "2"}\n'
                    'not json\n{"problem": "Pick", "options": ["x", "y"], "answer": "y"}\n')  # fmt: skip
    rows, skipped = load_benchmark(data, PRESETS["default"])
    assert _summary_of(rows) == [("add:1", ("7",), [], 0), ("q2", ("2",), [], 0), ("add:5", ("B",), ["x", "y"], 0)]
    assert [(s.prompt_id, s.reason, s.index) for s in skipped] == [("add:4", "bad_json", 2)]


def test_bad_benchmark_files_are_clear_errors(tmp_path):
    vista = mathvista_file(tmp_path)
    with pytest.raises(EvalDataError, match=r"no column 'problem'.*looks like the mathvista layout: use the preset 'mathvista'"):
        load_benchmark(vista, PRESETS["default"])
    with pytest.raises(EvalDataError, match=r"no column 'choice'"):
        load_benchmark(vista, layout_with(PRESETS["mathvista"], options="choice"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalDataError, match="has no rows"):
        load_benchmark(tmp_path / "empty.jsonl", PRESETS["default"])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(EvalDataError, match="not a readable parquet file"):
        load_benchmark(tmp_path / "bad.parquet", PRESETS["default"])
    with pytest.raises(EvalDataError, match="unsupported format '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_benchmark(tmp_path / "x.csv", PRESETS["default"])
    with pytest.raises(EvalDataError, match="no such file"):
        load_benchmark(tmp_path / "nope.jsonl", PRESETS["default"])
    (tmp_path / "all_bad.jsonl").write_text('{"problem": "x"}\n{"problem": "y", "answer": ""}\n')
    with pytest.raises(EvalDataError, match=r"no usable rows \(skipped: \{'missing_answer': 2\}\)"):
        load_benchmark(tmp_path / "all_bad.jsonl", PRESETS["default"])
    # a JSONL file whose objects lack a column the layout names
    with pytest.raises(EvalDataError, match="no column 'options'"):
        load_benchmark(tmp_path / "all_bad.jsonl", layout_with(PRESETS["default"], options="options"))


def test_multiple_choice_letters_and_option_text():
    opts = ["200.96", "3215.36", "6280", "32", "No correct answer"]
    picks = {
        "B": "B", "(b)": "B", "B.": "B", "B: 3215.36": "B", "(B) 3215.36": "B", "Option B": "B", "option (D)": "D",
        "The answer is B": "B", "the correct answer is (C).": "C", "\\text{B}": "B", "**E**": "E", "$C$": "C",
        "3215.36": "B", "No correct answer": "E", "no correct answer.": "E", "6280.0": "C",
        "F": None, "B and C": None, "A triangle": None, "": None, "7": None,
    }  # fmt: skip
    assert {a: choose_option(a, opts) for a in picks} == picks
    assert choose_option("1/2", ["0.5", "0.25"]) == "A"  # equivalent by the verifier
    row = EvalRow("b", 0, "q", "What is the area?", ("B",), options=opts)
    assert problem_text(row) == (
        "What is the area?\n\nOptions:\nA. 200.96\nB. 3215.36\nC. 6280\nD. 32\nE. No correct answer\n\n"
        "Answer with the letter of the correct option."
    )


# ------------------------------------------------------------------------------ scoring and aggregation
class _Tokenizer:
    """Characters as token ids."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class _Encoder:
    """Prompt ids = the characters of the user turn's text."""

    def __init__(self, vision: bool):
        self.tokenizer, self.processor = _Tokenizer(), object() if vision else None

    def encode(self, messages, images):
        content = messages[0]["content"]
        text = content if isinstance(content, str) else content[-1]["text"]
        return [ord(c) for c in text], None


class _PlantedEngine:
    """Engine double: answers each prompt with the planted response for (question, sample),
    sample = the position of the seed among the seeds the question was asked with."""

    def __init__(self, planted: dict[str, list[str]]):
        self.planted, self.calls = planted, []

    def generate(self, prompts, seeds, *, temperature, top_p, max_new_tokens, stop_token_ids, images=None):
        self.calls.append({"n": len(prompts), "seeds": list(seeds), "images": images, "temperature": temperature})
        out, asked = [], {}
        for p, seed in zip(prompts, seeds):
            text = "".join(chr(i) for i in p)
            question = next(q for q in self.planted if q in text)
            j = asked.setdefault(question, [])
            j.append(seed)
            response = self.planted[question][len(j) - 1]
            out.append(Generation([ord(c) for c in response], [0.0] * len(response), "stop"))
        return out


def _rows():
    return [
        EvalRow("arith", 0, "a0", "What is 3 + 4?", ("7",)),
        EvalRow("arith", 1, "a1", "Half of one?", ("1/2",)),
        EvalRow("arith", 2, "a2", "What is 2 + 2?", ("4",)),
        EvalRow("mc", 0, "m0", "Which is largest?", ("C",), options=["1", "2", "3"]),
        EvalRow("mc", 1, "m1", "Which is smallest?", ("A",), options=["1", "2", "3"]),
        EvalRow("mc", 2, "m2", "Which is even?", ("B",), options=["1", "2", "3"], images=[png()]),
    ]


def test_accuracy_of_planted_responses_is_exact():
    from megatron_rlsd.data import PromptTemplates

    planted = {
        "What is 3 + 4?": ["<answer>7</answer>"],  # right
        "Half of one?": ["<thought>so</thought>\\boxed{0.5}"],  # right: 0.5 = 1/2
        "What is 2 + 2?": ["<answer>5</answer>"],  # wrong
        "Which is largest?": ["<answer>(C) 3</answer>"],  # right, a marked letter
        "Which is smallest?": ["<answer>2</answer>"],  # wrong: the text of option B
        "Which is even?": ["no tags at all"],  # no answer
    }
    engine = _PlantedEngine(planted)
    records, summary = evaluate_rows(engine, _rows(), PromptTemplates(), _Encoder(vision=True), EvalSampling(batch_size=4))
    assert [(r.prompt_id, r.verdict, r.reason, r.choice) for r in records] == [
        ("a0", True, "ok", None), ("a1", True, "ok", None), ("a2", False, "ok", None), ("m0", True, "ok", "C"),
        ("m1", False, "ok", "B"), ("m2", False, "no_answer", None),
    ]  # fmt: skip
    assert summary["benchmarks"]["arith"] == {"n": 3, "samples": 1, "accuracy": 2 / 3, "avg@1": 2 / 3, "pass@1": 2 / 3,
                                              "skipped": {}, "skipped_total": 0}  # fmt: skip
    assert summary["benchmarks"]["mc"]["accuracy"] == 1 / 3
    assert summary["mean_accuracy"] == (2 / 3 + 1 / 3) / 2
    # two engine calls of at most 4 questions; images only where a row has them; greedy
    assert [c["n"] for c in engine.calls] == [4, 2] and [c["temperature"] for c in engine.calls] == [0.0, 0.0]
    assert engine.calls[0]["images"] is None and [len(i) for i in engine.calls[1]["images"]] == [0, 1]
    assert summary_metrics(summary) == {
        "eval/arith/accuracy": 2 / 3, "eval/arith/pass@1": 2 / 3, "eval/arith/n": 3.0, "eval/arith/skipped": 0.0,
        "eval/mc/accuracy": 1 / 3, "eval/mc/pass@1": 1 / 3, "eval/mc/n": 3.0, "eval/mc/skipped": 0.0,
        "eval/mean_accuracy": 0.5,
    }  # fmt: skip
    assert format_table(summary).splitlines()[2:] == [
        "arith           3        0     66.67     66.67     66.67",
        "mc              3        0     33.33     33.33     33.33",
        "mean                           50.00",
    ]


def test_avg_and_pass_at_k_and_skips():
    from megatron_rlsd.data import PromptTemplates

    planted = {
        "What is 3 + 4?": ["<answer>7</answer>", "<answer>8</answer>", "<answer>7</answer>"],
        "Half of one?": ["<answer>2</answer>"] * 3,
        "What is 2 + 2?": ["<answer>4</answer>"] * 3,
        "Which is largest?": ["<answer>A</answer>", "<answer>B</answer>", "<answer>3</answer>"],
        "Which is smallest?": ["<answer>C</answer>"] * 3,
    }
    engine = _PlantedEngine(planted)
    sampling = EvalSampling(samples=3, temperature=1.0, batch_size=8, seed=5)
    # a text-only model: the image row is skipped; a short prompt limit skips the longest prompt
    rows = _rows()
    long_row = EvalRow("arith", 3, "a3", "x" * 600, ("1",))
    records, summary = evaluate_rows(engine, rows + [long_row], PromptTemplates(), _Encoder(vision=False),
                                     EvalSampling(**{**sampling.__dict__, "max_prompt_tokens": 500}))  # fmt: skip
    arith, mc = summary["benchmarks"]["arith"], summary["benchmarks"]["mc"]
    # arith: [T, F, T], [F, F, F], [T, T, T] -> avg 5/9, pass 2/3; mc: [F, F, T], [F, F, F] -> 1/6, 1/2
    assert (arith["n"], arith["accuracy"], arith["avg@3"], arith["pass@3"]) == (3, 5 / 9, 5 / 9, 2 / 3)
    assert arith["skipped"] == {"prompt_too_long": 1}
    assert (mc["n"], mc["accuracy"], mc["pass@3"], mc["skipped"]) == (2, 1 / 6, 1 / 2, {"needs_vision_model": 1})
    assert len(records) == 5 * 3 + 2
    # every sample of a question has its own seed, the same in every run
    seeds = engine.calls[0]["seeds"]
    assert len(set(seeds)) == len(seeds) == 15
    evaluate_rows(engine, rows, PromptTemplates(), _Encoder(vision=False), sampling)
    assert engine.calls[1]["seeds"] == seeds
    # gathering (one process) sorts by benchmark (first seen), row and sample
    shuffled = gather_records(records[::-1])
    assert [(r.benchmark, r.index, r.sample) for r in shuffled][:4] == [("mc", 0, 0), ("mc", 0, 1), ("mc", 0, 2), ("mc", 1, 0)]
    with pytest.raises(ValueError, match="all the same; set a temperature > 0"):
        EvalSampling(samples=4)


def test_summary_of_a_benchmark_without_a_score():
    records = [EvalRecord("b", 0, "q", 0, "1", reason="undecodable_image")]
    summary = summarize(records)
    assert summary == {"benchmarks": {"b": {"n": 0, "samples": 1, "accuracy": None, "avg@1": None, "pass@1": None,
                                            "skipped": {"undecodable_image": 1}, "skipped_total": 1}},
                       "mean_accuracy": None}  # fmt: skip
    assert summary_metrics(summary) == {}


# ------------------------------------------------------------------------------ the tool
def _evaluate_tool():
    """tools/evaluate.py as a module (its main() runs in this process)."""
    import importlib.util

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_tool_refuses_bad_input(tmp_path, capsys):
    fake = tmp_path / "model"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    (fake / "model.safetensors").write_bytes(b"")
    (tmp_path / "empty.jsonl").write_text("")
    vista = mathvista_file(tmp_path)
    cases = {
        "neither a Hugging Face folder": ["--model", str(tmp_path), "--data", str(vista)],
        "no such folder": ["--model", str(tmp_path / "nope"), "--data", str(vista)],
        "no column 'problem'": ["--model", str(fake), "--data", str(vista)],
        "empty.jsonl: the file has no rows": ["--model", str(fake), "--data", str(tmp_path / "empty.jsonl")],
        "set a temperature > 0": ["--model", str(fake), "--data", str(vista), "--samples", "4"],
        "--preset given 2 times for 1 --data": ["--model", str(fake), "--data", str(vista), "--preset", "mmmu", "--preset", "mmmu"],
    }
    tool = _evaluate_tool()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")  # a run's resolved config, not an HF one
    (run / "checkpoints" / "latest").write_text("step_0000005\n")
    assert (tool.model_kind(fake), tool.model_kind(run), tool.model_kind(run / "checkpoints")) == ("hf", "checkpoint", "checkpoint")
    for message, args in cases.items():
        assert tool.main([*args, "--out", str(tmp_path / "out")]) == 2, message
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evaluate: error: ") and message in lines[0], (message, lines)
    assert not (tmp_path / "out").exists()  # nothing written before the input checked out
    # as a user runs it: one line, exit code 2, no traceback
    proc = run_tool("evaluate", "--model", str(tmp_path), "--data", str(vista), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"evaluate: error: --model {tmp_path}: neither a Hugging Face folder (config.json + *.safetensors) nor a checkpoint "
        "(a root with 'latest' or a step directory with metadata.json)"
    ]


def test_evaluate_tool_reads_a_benchmark_spread_over_files(tmp_path, capsys):
    """MMMU publishes one parquet file per subject: a named glob is one benchmark, its rows
    indexed across the files."""
    for subject in ("Art", "Math"):
        (tmp_path / "MMMU" / subject).mkdir(parents=True)
        mmmu_file(tmp_path).rename(tmp_path / "MMMU" / subject / "validation-00000-of-00001.parquet")
    tool = _evaluate_tool()
    pattern = f"{tmp_path}/MMMU/*/validation-*.parquet"
    args = tool.parse_args(["--model", "m", "--out", "o", "--preset", "mmmu", "--data", f"mmmu={pattern}"])
    rows, skipped = tool.load_data(args, tool.data_specs(args))
    assert [(r.benchmark, r.index) for r in rows] == [("mmmu", i) for i in (0, 1, 2, 4, 5, 6)]
    assert [(s.index, s.reason) for s in skipped] == [(3, "undecodable_image"), (7, "undecodable_image")]
    args = tool.parse_args(["--model", "m", "--out", "o", "--data", pattern])
    with pytest.raises(tool.UsageError, match="name a benchmark given as a pattern: --data NAME="):
        tool.data_specs(args)


def _memorize(hf_dir: Path, sequences: list[tuple[list[int], list[int]]], steps: int = 40, lr: float = 5e-3) -> float:
    """Fit the HF model to answer each prompt with its response (loss on the responses only),
    in place; returns the final loss."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.tensor([p + r + [0] * (width - len(p) - len(r)) for p, r in sequences])
    labels = torch.tensor([[-100] * len(p) + r + [-100] * (width - len(p) - len(r)) for p, r in sequences])
    mask = (torch.arange(width)[None] < torch.tensor([len(p) + len(r) for p, r in sequences])[:, None]).long()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
    model.save_pretrained(hf_dir)
    return loss.item()


def test_evaluate_tool_end_to_end(tmp_path):
    """tools/evaluate.py under torchrun (2 processes, an engine each) on one of our checkpoints
    (exported to HF by the tool) of a tiny Qwen3-VL that memorized three answers (two right,
    one wrong), with a text benchmark and a MathVista-layout image benchmark."""
    from conftest import torchrun
    from transformers import AutoTokenizer

    from megatron_rlsd.data import PromptTemplates
    from megatron_rlsd.data.vision import PromptEncoder
    from megatron_rlsd.evaluation import encode_row, score_sample
    from megatron_rlsd.models.tiny_vl import build_tiny_qwen3_vl

    hf = build_tiny_qwen3_vl(tmp_path / "hf", seed=7)
    template = tmp_path / "student.txt"
    template.write_text("{problem}")  # short prompts: quick to memorize
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "t0", "problem": "What is 3 + 4?", "answer": "7"},
        {"id": "t1", "problem": "Pick the even number.", "options": ["3", "8", "5"], "answer": "8"},
        {"id": "t2", "problem": "What is 5 + 5?", "answer": "10"},
        {"id": "t3", "problem": "Name the colour of grass.", "answer": "green"},
    ]))  # fmt: skip
    vista = write_parquet(tmp_path / "vista.parquet", {
        "pid": ["1", "2", "3"],
        "question": ["Which bar is tallest?", "How many squares?", "What colour?"],
        "decoded_image": [{"bytes": png((200, 0, 0), (48, 32)), "path": None}, {"bytes": png((0, 0, 200), (32, 64)), "path": None},
                          {"bytes": BROKEN, "path": None}],
        "choices": [["left", "middle", "right"], None, None],
        "answer": ["right", "4", "red"],
    }, {"decoded_image": IMAGE, "choices": pa.list_(pa.string())})  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(hf)
    encoder, templates = PromptEncoder(hf, tokenizer, multimodal=True), PromptTemplates(student="{problem}")
    rows = {("text", r.index): r for r in load_benchmark(text, PRESETS["default"], "text")[0]}
    rows |= {("vista", r.index): r for r in load_benchmark(vista, PRESETS["mathvista"], "vista")[0]}
    memorized = {"t0": "<answer>7</answer>", "t1": "<answer>B</answer>", "t2": "<answer>11</answer>"}
    sequences = [(encode_row(r, templates, encoder)[0], tokenizer(memorized[r.id], add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id]) for r in rows.values() if r.id in memorized]  # fmt: skip
    loss = _memorize(hf, sequences)
    assert loss < 0.02, loss  # measured 0.005 after 40 steps

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    run_tool("convert_hf_to_megatron", "--hf-dir", str(hf), "--out", str(ckpt), "--quiet")
    proc = torchrun("tools/evaluate.py", "--model", str(ckpt), "--data", f"text={text}", "--data", f"vista={vista}",
                    "--preset", "default", "--preset", "mathvista", "--student-template", str(template), "--out", str(out),
                    "--max-new-tokens", "16", "--max-prompt-tokens", "256", "--kv-cache-mb", "64", "--batch-size", "2",
                    nproc=2)  # fmt: skip
    assert "text" in proc.stdout and "vista" in proc.stdout and "mean" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["samples.jsonl", "summary.json", "vllm.log"]  # export removed

    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(list(r) == list(EvalRecord.__dataclass_fields__) for r in records)
    # every question once, in file order, gathered from both processes
    assert [(r["benchmark"], r["prompt_id"], r["sample"]) for r in records] == [
        ("text", "t0", 0), ("text", "t1", 0), ("text", "t2", 0), ("text", "t3", 0), ("vista", "1", 0), ("vista", "2", 0),
        ("vista", "3", 0),
    ]  # fmt: skip
    by_id = {r["prompt_id"]: r for r in records}
    assert [(by_id[i]["response"], by_id[i]["verdict"]) for i in ("t0", "t1", "t2")] == [
        ("<answer>7</answer>", True), ("<answer>B</answer>", True), ("<answer>11</answer>", False)
    ]
    assert by_id["t1"]["choice"] == "B" and by_id["t1"]["answer"] == "B"  # the option text "8" read as its letter
    assert by_id["3"]["verdict"] is None and by_id["3"]["reason"] == "undecodable_image"
    for r in records:
        if r["verdict"] is not None:  # the written verdicts are the verifier's on the written responses
            assert r["response_tokens"] > 0 and r["finish_reason"] in ("stop", "length")
            verdict, extracted, choice, reason = score_sample(rows[(r["benchmark"], r["index"])], r["response"])
            assert (verdict, extracted, choice, reason) == (r["verdict"], r["extracted"], r["choice"], r["reason"])

    summary = json.loads((out / "summary.json").read_text())
    for name, n, skipped in (("text", 4, {}), ("vista", 2, {"undecodable_image": 1})):
        s = summary["benchmarks"][name]
        verdicts = [r["verdict"] for r in records if r["benchmark"] == name and r["verdict"] is not None]
        assert (s["n"], s["skipped"], s["samples"]) == (n, skipped, 1)
        assert s["accuracy"] == s["avg@1"] == s["pass@1"] == sum(verdicts) / len(verdicts)
    assert summary["benchmarks"]["text"]["accuracy"] >= 0.5  # t0 and t1 (t3 unmemorized)
    assert summary["settings"]["processes"] == 2 and summary["settings"]["temperature"] == 0.0
