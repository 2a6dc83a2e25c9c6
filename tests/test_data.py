"""Data: JSONL/parquet loading with counted skips, resumable sampler, templates, synthetic tasks."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_rlsd.data import (
    DEFAULT_STUDENT_TEMPLATE,
    EpochSampler,
    PromptRow,
    PromptTemplates,
    encode_prompt,
    load_prompt_rows,
    make_synthetic_rows,
    render_chat,
    sft_text,
    write_jsonl,
)
from megatron_rlsd.rewards import answers_match, extract_answer, has_valid_format, score_response


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- loading


def test_jsonl_every_skip_reason_is_returned_with_its_rows(tmp_path, caplog):
    lines = [
        json.dumps({"id": "good-1", "problem": "What is 1 + 1?", "answer": "2"}),
        json.dumps({"problem": "No id here", "answer": 7}),  # int answer -> "7", default id
        json.dumps({"id": 5, "problem": "float answer", "answer": 2.5, "images": "img/a.png"}),
        "",  # blank line: not a row
        "{not json",
        json.dumps([1, 2, 3]),
        json.dumps({"id": "np", "answer": "1"}),
        json.dumps({"id": "blank-problem", "problem": "   ", "answer": "1"}),
        json.dumps({"id": "bad-problem", "problem": ["x"], "answer": "1"}),
        json.dumps({"id": "na", "problem": "p", "answer": None}),
        json.dumps({"id": "bool-answer", "problem": "p", "answer": True}),
        json.dumps({"id": "list-answer", "problem": "p", "answer": [1]}),
        json.dumps({"id": "long", "problem": "x" * 50, "answer": "1"}),
        json.dumps({"id": "bad-images", "problem": "p", "answer": "1", "images": [3]}),
        json.dumps({"problem": "p", "answer": "  "}),  # no id of its own: labelled <stem>:<line>
    ]
    path = write_lines(tmp_path / "mix.jsonl", lines)
    with caplog.at_level(logging.DEBUG, logger="megatron_rlsd.data.dataset"):
        rows, skipped = load_prompt_rows(path, max_problem_chars=40)
    assert [r.id for r in rows] == ["good-1", "mix:2", "5"]
    assert rows[1].answer == "7" and rows[2].answer == "2.5"
    assert rows[2].images == [str(tmp_path / "img" / "a.png")]
    assert rows[0].images == []
    # Every skipped row, per reason, in file order; line numbers are 1-based, blank lines included.
    assert skipped == {
        "bad_json": ["mix:5"],
        "not_an_object": ["mix:6"],
        "missing_problem": ["np (line 7)", "blank-problem (line 8)"],
        "bad_problem": ["bad-problem (line 9)"],
        "missing_answer": ["na (line 10)", "mix:15"],
        "bad_answer": ["bool-answer (line 11)", "list-answer (line 12)"],
        "too_long": ["long (line 13)"],
        "bad_images": ["bad-images (line 14)"],
    }
    assert caplog.records == []  # the caller reports


def test_parquet_and_column_mapping(tmp_path):
    table = pa.table(
        {
            "uid": ["a", None, "c", "d"],
            "question": ["What is 2 + 2?", "What is 3 + 3?", "", "What is 1 + 0?"],
            "solution": ["4", "6", "1", None],
            "pictures": [["/abs/x.png"], [], None, []],
        }
    )
    path = tmp_path / "set.parquet"
    pq.write_table(table, path)
    columns = {"id": "uid", "problem": "question", "answer": "solution", "images": "pictures"}
    rows, skipped = load_prompt_rows(path, columns=columns)
    assert rows == [
        PromptRow(id="a", problem="What is 2 + 2?", answer="4", images=["/abs/x.png"]),
        PromptRow(id="set:1", problem="What is 3 + 3?", answer="6", images=[]),  # 0-based row index
    ]
    assert skipped == {"missing_problem": ["c (row 2)"], "missing_answer": ["d (row 3)"]}  # 0-based rows
    # Without the mapping nothing is usable: the error names the file, the counts and the fix.
    with pytest.raises(ValueError, match=r"set\.parquet.*missing_problem.*columns"):
        load_prompt_rows(path)
    with pytest.raises(ValueError, match="unknown field"):
        load_prompt_rows(path, columns={"question": "problem"})


def test_parquet_numeric_answers(tmp_path):
    path = tmp_path / "num.parquet"
    pq.write_table(pa.table({"problem": ["p1", "p2"], "answer": [8.0, 0.25]}), path)
    rows, _ = load_prompt_rows(path)
    assert [r.answer for r in rows] == ["8", "0.25"]


def test_empty_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_rows(tmp_path / "nope.jsonl")
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="empty.jsonl.*no usable rows"):
        load_prompt_rows(empty)
    bad = write_lines(tmp_path / "bad.jsonl", ["{oops", json.dumps({"problem": "p"})])
    with pytest.raises(ValueError, match=r"bad\.jsonl.*'bad_json': 1.*'missing_answer': 1"):
        load_prompt_rows(bad)
    csv = write_lines(tmp_path / "data.csv", ["a,b"])
    with pytest.raises(ValueError, match="unsupported"):
        load_prompt_rows(csv)


# --------------------------------------------------------------------------- sampler


def test_sampler_is_a_deterministic_per_epoch_shuffle():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    first = a.next_indices(10)
    assert sorted(first) == list(range(10))
    assert first == b.next_indices(10)
    second = a.next_indices(10)
    assert sorted(second) == list(range(10)) and second != first  # a new order each epoch
    assert EpochSampler(10, seed=4).next_indices(10) != first
    assert a.state_dict()["epoch"] == 2 and a.state_dict()["position"] == 0
    assert a.next_indices(0) == []


def test_sampler_resumes_exactly_across_an_epoch_boundary():
    reference = EpochSampler(7, seed=11)
    expected = reference.next_indices(40)  # spans six epochs

    sampler = EpochSampler(7, seed=11)
    got = sampler.next_indices(5)
    state = json.loads(json.dumps(sampler.state_dict()))  # survives a JSON checkpoint
    assert state["epoch"] == 0 and state["position"] == 5
    restored = EpochSampler(7, seed=11)
    restored.load_state_dict(state)
    got += restored.next_indices(4)  # crosses the boundary: 2 from epoch 0, 2 from epoch 1
    assert restored.state_dict()["epoch"] == 1 and restored.state_dict()["position"] == 2
    again = EpochSampler(7, seed=11)
    again.load_state_dict(restored.state_dict())
    got += again.next_indices(31)
    assert got == expected

    with pytest.raises(ValueError, match="seed"):
        EpochSampler(7, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="num_rows"):
        EpochSampler(8, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        EpochSampler(7, seed=11).load_state_dict({"epoch": 0, "position": 7})


# --------------------------------------------------------------------------- templates


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from megatron_rlsd.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


ROW = PromptRow(id="r", problem="  Compute \\frac{1}{2} + {answer}?  ", answer="\\boxed{1}")


def test_default_templates():
    templates = PromptTemplates()
    student = templates.student_messages(ROW)
    assert student == [{"role": "user", "content": templates.student_text(ROW)}]
    text = student[0]["content"]
    assert "<thought> </thought>" in text and "<answer> </answer>" in text
    assert text.endswith("Compute \\frac{1}{2} + {answer}?")  # stripped; "{answer}" in the problem is literal
    assert "\\boxed{1}" not in text  # the student never sees the reference answer
    teacher = templates.teacher_messages(ROW)[0]["content"]
    assert teacher.startswith("Compute \\frac{1}{2} + {answer}?\n\nHere is a reference solution:\n\\boxed{1}\n\n")
    assert "After understanding the reference solution" in teacher and teacher.endswith("</answer> tags.")


def test_template_files_and_validation(tmp_path):
    student = tmp_path / "student.txt"
    teacher = tmp_path / "teacher.txt"
    student.write_text("Q: {problem}\nPut the result in \\boxed{}.", encoding="utf-8")
    teacher.write_text("Q: {problem}\nReference: {answer}", encoding="utf-8")
    templates = PromptTemplates.from_files(student, teacher)
    assert templates.student_text(ROW) == "Q: Compute \\frac{1}{2} + {answer}?\nPut the result in \\boxed{}."
    assert templates.teacher_text(ROW) == "Q: Compute \\frac{1}{2} + {answer}?\nReference: \\boxed{1}"
    assert PromptTemplates.from_files(teacher_path=teacher).student == DEFAULT_STUDENT_TEMPLATE

    no_answer = tmp_path / "teacher_no_answer.txt"
    no_answer.write_text("Q: {problem}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"teacher_no_answer\.txt.*\{answer\}"):
        PromptTemplates.from_files(teacher_path=no_answer)
    no_problem = tmp_path / "student_no_problem.txt"
    no_problem.write_text("Solve it.", encoding="utf-8")
    with pytest.raises(ValueError, match=r"student_no_problem\.txt.*\{problem\}"):
        PromptTemplates.from_files(student_path=no_problem)
    with pytest.raises(FileNotFoundError):
        PromptTemplates.from_files(student_path=tmp_path / "missing.txt")


def test_images_become_content_parts():
    row = PromptRow(id="v", problem="What is shown?", answer="a cat", images=["/x/1.png", "/x/2.png"])
    for message in (PromptTemplates().student_messages(row)[0], PromptTemplates().teacher_messages(row)[0]):
        parts = message["content"]
        assert [p["type"] for p in parts] == ["image", "image", "text"]
        assert [p.get("image") for p in parts[:2]] == row.images


def test_encode_prompt_with_the_chat_template(tiny_tokenizer):
    templates = PromptTemplates()
    messages = templates.teacher_messages(ROW)
    text = render_chat(tiny_tokenizer, messages)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = encode_prompt(tiny_tokenizer, messages)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tiny_tokenizer.decode(ids) == text
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    # Same ids as transformers' own tokenize=True path (a list or a BatchEncoding).
    direct = tiny_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    direct = direct["input_ids"] if not isinstance(direct, list) else direct
    assert ids == list(direct)
    student_ids = encode_prompt(tiny_tokenizer, templates.student_messages(ROW))
    assert student_ids != ids

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat_template"):
        encode_prompt(NoTemplate(), messages)


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("task", ["add", "max", "copy"])
def test_synthetic_rows_are_deterministic_and_verified(task, tmp_path):
    rows = make_synthetic_rows(30, seed=1, task=task)
    assert rows == make_synthetic_rows(30, seed=1, task=task)
    assert rows != make_synthetic_rows(30, seed=2, task=task)
    assert len({r.id for r in rows}) == 30
    for row in rows:
        response = sft_text(row)
        assert has_valid_format(response) and extract_answer(response) == row.answer
        assert answers_match(extract_answer(response), row.answer)
        result = score_response(response, row.answer)
        assert result.correct and result.reason == "ok"
        assert not answers_match(str(int(row.answer) + 1), row.answer)
        assert len(response) < 80
    # Round trip through JSONL.
    path = write_jsonl(rows, tmp_path / "sub" / f"{task}.jsonl")
    loaded, skipped = load_prompt_rows(path)
    assert loaded == rows and not skipped


def test_synthetic_add_values():
    rows = make_synthetic_rows(200, seed=0, task="add", max_operand=9)
    for row in rows:
        a, b = (int(x) for x in row.problem.removeprefix("What is ").removesuffix("?").split(" + "))
        assert 0 <= a <= 9 and 0 <= b <= 9 and row.answer == str(a + b)
    assert sft_text(PromptRow(id="x", problem="What is 3 + 5?", answer="8")) == "<thought>3 + 5 = 8</thought><answer>8</answer>"
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_synthetic_rows(1, seed=0, task="mul")
