"""tools/prepare_mmfinereason.py on fixtures of the published schema, and the loader's image checks."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_tool
from PIL import Image

from megatron_rlsd.data import PromptRow, load_prompt_rows


def png(color, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(color, size=(10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


IMG_A = png((255, 0, 0))  # shared by three rows
IMG_B = png((0, 0, 255))  # only in rows that are skipped for other reasons
IMG_C = jpeg((0, 200, 0))  # re-encoded to PNG
BROKEN = b"\x89PNG\r\n\x1a\n this is not an image"
TRUNCATED = png((9, 9, 9), size=(64, 64))[:60]


def struct(data):
    return None if data is None else {"bytes": data, "path": None}


# (source, id, question, answer, image bytes, pass_rate) -- the columns RLSD needs, plus the rest
# of the MMFineReason-SFT-123K schema so the tool reads only what it must.
SHARDS = [
    [
        ("MMR1", 0, "<image>\nHow many apples are there?", "3", IMG_A, 0.0),
        ("MMR1", 1, "<image>What is x?", "  ", IMG_B, 0.0),  # empty answer
        ("BMMR", 2, "<image>Find the angle.", "45", BROKEN, 0.0),  # undecodable
        ("BMMR", 0, "<image>Which option is right?", "C", IMG_A, 0.0),  # duplicate image
    ],
    [
        ("Euclid30K", 3, "<image>Compute the area.", "12", IMG_C, 0.25),
        ("Euclid30K", 4, None, "1", IMG_A, 0.0),  # missing problem
        ("Euclid30K", 5, "<image>Is it red?", None, IMG_B, 0.0),  # missing answer
        ("Euclid30K", 6, "Same picture again? <image>", "yes", IMG_A, 0.0),  # duplicate image
        ("Euclid30K", 7, "<image>Where is the picture?", "2", None, 0.0),  # missing image
        ("Euclid30K", 8, "<image>Truncated?", "4", TRUNCATED, 0.0),  # undecodable
    ],
]
COLUMNS = {"image": [], "question": [], "answer": [], "ori_question": [], "original_answer": [], "caption": [],
           "qwen3vl_235b_thinking_response": [], "pass_rate": [], "is_consistent": [],
           "consistency_analysis": [], "source": [], "id": []}  # fmt: skip
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

def trace(answer):
    return f"<think>Count, then check: {answer}.</think> <answer>{answer}</answer>"


# the reasoning trace becomes the row's solution; Euclid30K:6 has none (null in the fixture)
EXPECTED_ROWS = [
    {"id": "MMR1:0", "problem": "How many apples are there?", "answer": "3", "images": ["A"], "solution": trace("3")},
    {"id": "BMMR:0", "problem": "Which option is right?", "answer": "C", "images": ["A"], "solution": trace("C")},
    {"id": "Euclid30K:3", "problem": "Compute the area.", "answer": "12", "images": ["C"], "solution": trace("12")},
    {"id": "Euclid30K:6", "problem": "Same picture again?", "answer": "yes", "images": ["A"]},
]
EXPECTED_SKIPS = {"empty_answer": 1, "undecodable_image": 2, "missing_problem": 1, "missing_answer": 1,
                  "missing_image": 1}  # fmt: skip


def table(rows) -> pa.Table:
    cols = {k: [] for k in COLUMNS}
    for source, row_id, question, answer, image, pass_rate in rows:
        cols["image"].append(struct(image))
        cols["question"].append(question)
        cols["answer"].append(answer)
        cols["ori_question"].append(question)
        cols["original_answer"].append(f"The answer is {answer}")
        cols["caption"].append("A picture.")
        cols["qwen3vl_235b_thinking_response"].append(None if (source, row_id) == ("Euclid30K", 6) else trace(answer))
        cols["pass_rate"].append(pass_rate)
        cols["is_consistent"].append(True)
        cols["consistency_analysis"].append("consistent")
        cols["source"].append(source)
        cols["id"].append(row_id)
    types = {"image": IMAGE_TYPE, "pass_rate": pa.float64(), "is_consistent": pa.bool_(), "id": pa.int64()}
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in cols.items()})


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The hub layout: data/train-0000N-of-00002.parquet with embedded image structs."""
    root = tmp_path_factory.mktemp("mmfr")
    (root / "data").mkdir()
    for n, rows in enumerate(SHARDS):
        pq.write_table(table(rows), root / "data" / f"train-{n:05d}-of-00002.parquet")
    # another split: not read (--split train is the default)
    pq.write_table(
        table([("MMR1", 99, "<image>Test split?", "1", IMG_B, 0.0)]), root / "data" / "test-00000-of-00001.parquet"
    )
    (root / "README.md").write_text("dataset card\n")
    return root


def image_name(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32] + ".png"


def expected(rows=EXPECTED_ROWS):
    names = {"A": image_name(IMG_A), "C": image_name(IMG_C)}
    return [dict(r, images=[f"images/{names[i]}" for i in r["images"]]) for r in rows]


def read_out(out):
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows, json.loads((out / "stats.json").read_text())


def test_published_parquet_shards(published, tmp_path):
    out = tmp_path / "out"
    proc = run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(out), "--progress-every", "4")
    rows, stats = read_out(out)
    assert rows == expected()
    assert stats["skipped"] == EXPECTED_SKIPS and stats["skipped_total"] == 6
    assert stats["rows_read"] == 10 and stats["rows_written"] == 4 and stats["filtered_out"] == 0
    assert stats["images_written"] == 2 and stats["image_refs"] == 4  # A stored once for three rows
    assert stats["rows_without_solution"] == 1
    assert stats["input_format"] == "parquet" and len(stats["files"]) == 2 and stats["tool"] == "prepare_mmfinereason"
    # Images: A kept byte-for-byte (already PNG), C re-encoded to PNG; nothing else in images/.
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted([image_name(IMG_A), image_name(IMG_C)])
    assert (out / "images" / image_name(IMG_A)).read_bytes() == IMG_A
    with Image.open(out / "images" / image_name(IMG_C)) as img:
        assert img.format == "PNG" and img.size == (10, 10)
    assert sorted(p.name for p in out.iterdir()) == ["images", "stats.json", "train.jsonl"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no scratch left behind
    # Skips are reported with the row id; progress lines and a summary line are printed.
    for line in ("skip MMR1:1 (train-00000-of-00002.parquet row 1): empty_answer",
                 "skip BMMR:2 (train-00000-of-00002.parquet row 2): undecodable_image",
                 "skip Euclid30K:8 (train-00001-of-00002.parquet row 5): undecodable_image",
                 "skip Euclid30K:7 (train-00001-of-00002.parquet row 4): missing_image"):  # fmt: skip
        assert line in proc.stderr
    assert "read 4 rows, wrote 2, skipped 2, 1 images" in proc.stderr and "read 10 rows" in proc.stderr
    assert ("wrote 4 rows (2 images, 4 image refs)" in proc.stdout
            and "skipped 6 (empty_answer=1, missing_answer=1, missing_image=1, missing_problem=1, "
                "undecodable_image=2)" in proc.stdout)  # fmt: skip
    # The output loads back through the project's loader, images resolved and verified.
    loaded, skipped = load_prompt_rows(out / "train.jsonl", check_images=True)
    assert not skipped
    assert loaded == [PromptRow(id=r["id"], problem=r["problem"], answer=r["answer"], solution=r.get("solution", ""),
                                images=[str(out / p) for p in r["images"]]) for r in expected()]  # fmt: skip


def test_filter_max_rows_and_column_flags(published, tmp_path):
    out = tmp_path / "hard"
    run_tool("prepare_mmfinereason", "--input", str(published / "data"), "--out", str(out), "--filter", "pass_rate=0")
    rows, stats = read_out(out)
    assert rows == [r for r in expected() if r["id"] != "Euclid30K:3"]
    assert stats["filtered_out"] == 1 and stats["filters"] == ["pass_rate=0"] and stats["images_written"] == 1

    # --max-rows counts rows written: a row skipped late (undecodable) does not use up the budget.
    out = tmp_path / "two"
    run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(out), "--max-rows", "2")
    rows, stats = read_out(out)
    assert rows == expected()[:2] and stats["rows_read"] == 4
    assert stats["skipped"] == {"empty_answer": 1, "undecodable_image": 1}

    out = tmp_path / "test_split"
    run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(out), "--split", "test")
    rows, stats = read_out(out)
    assert [r["id"] for r in rows] == ["MMR1:99"]
    assert stats["files"] == [str(published / "data" / "test-00000-of-00001.parquet")]

    # Other columns and options: answers from original_answer, no id prefix, placeholder kept.
    out = tmp_path / "cols"
    run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(out), "--answer-column",
             "original_answer", "--id-prefix-column", "", "--image-placeholder", "", "--keep-image-format",
             "--max-rows", "3", "--workers", "1")  # fmt: skip
    rows, _ = read_out(out)
    assert [r["id"] for r in rows] == ["0", "1", "0#2"]  # MMR1:1 has an answer now; duplicate id renamed
    assert rows[0]["problem"] == "<image>\nHow many apples are there?" and rows[0]["answer"] == "The answer is 3"
    # --keep-image-format stores the JPEG as it came.
    cols = tmp_path / "cols_jpeg"
    run_tool("prepare_mmfinereason", "--input", str(published / "data" / "train-00001-of-00002.parquet"),
             "--out", str(cols), "--keep-image-format", "--max-rows", "1")  # fmt: skip
    rows, _ = read_out(cols)
    assert rows[0]["images"] == [f"images/{image_name(IMG_C)[:-4]}.jpg"]
    assert (cols / rows[0]["images"][0]).read_bytes() == IMG_C


def test_errors_no_rows_and_overwrite(published, tmp_path):
    out = tmp_path / "out"
    proc = run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(out), "--filter", "source=Nope",
                    check=False)  # fmt: skip
    assert proc.returncode == 1 and "no rows written from 10 read" in proc.stderr and "filtered out: 10" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written, no scratch

    proc = run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(out), "--problem-column", "prompt",
                    check=False)  # fmt: skip
    assert proc.returncode == 2 and "--problem-column 'prompt'" in proc.stderr and "'question'" in proc.stderr

    # A scratch folder left by a crashed run is cleared; one the tool did not make is not touched.
    stale = tmp_path / ".out.partial"
    (stale / "images").mkdir(parents=True)
    (stale / ".prepare_mmfinereason").write_text("")
    (stale / "train.jsonl.tmp").write_text('{"id": "half')
    run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(out), "--max-rows", "1")
    assert not stale.exists()
    (tmp_path / ".mine.partial").mkdir()
    proc = run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(tmp_path / "mine"), check=False)
    assert proc.returncode == 2 and "was not made by prepare_mmfinereason" in proc.stderr
    (tmp_path / ".mine.partial").rmdir()

    proc = run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(out), check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--overwrite" in proc.stderr
    assert len(read_out(out)[0]) == 1  # untouched
    run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(out), "--overwrite")
    assert read_out(out)[0] == expected()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # --overwrite never replaces a folder this tool did not write, nor the input.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    proc = run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(other), "--overwrite", check=False)
    assert proc.returncode == 2 and "not an output of prepare_mmfinereason" in proc.stderr
    assert (other / "notes.txt").read_text() == "keep me"
    proc = run_tool("prepare_mmfinereason", "--input", str(published), "--out", str(published / "data" / "x"),
                    check=False)  # fmt: skip
    assert proc.returncode == 2 and "inside --input" in proc.stderr


def test_help_documents_the_schema():
    proc = run_tool("prepare_mmfinereason", "--help")
    for text in ("--problem-column", "--answer-column", "--image-column", "--id-column", "--filter COLUMN=VALUE",
                 "--max-rows", "--overwrite", "save_to_disk", "pass_rate", "stats.json"):  # fmt: skip
        assert text in proc.stdout


def test_save_to_disk_forms(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "question": datasets.Value("string"), "answer": datasets.Value("string"), "image": datasets.Image(),
        "pass_rate": datasets.Value("float64"), "source": datasets.Value("string"), "id": datasets.Value("int64"),
    })  # fmt: skip
    records = [r for shard in SHARDS for r in shard]
    ds = datasets.Dataset.from_dict(
        {"question": [r[2] for r in records], "answer": [r[3] for r in records],
         "image": [struct(r[4]) for r in records], "pass_rate": [r[5] for r in records],
         "source": [r[0] for r in records], "id": [r[1] for r in records]},
        features=features,
    )  # fmt: skip
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))

    for name, extra in (
        ("saved", []),
        ("saved", ["--reader", "arrow"]),
        ("saved_dict", ["--split", "train", "--reader", "arrow"]),
    ):
        out = tmp_path / f"out_{name}_{len(extra)}"
        proc = run_tool("prepare_mmfinereason", "--input", str(tmp_path / name), "--out", str(out), *extra)
        rows, stats = read_out(out)
        # no reasoning-trace column in these copies: no solutions, said once
        assert "no column 'qwen3vl_235b_thinking_response': rows get no reference solution" in proc.stderr
        no_trace = [{k: v for k, v in r.items() if k != "solution"} for r in EXPECTED_ROWS]
        assert rows == expected(no_trace) and stats["skipped"] == EXPECTED_SKIPS, (name, extra)
        assert stats["input_format"] == ("dataset_dict" if name == "saved_dict" else "dataset")
    proc = run_tool("prepare_mmfinereason", "--input", str(tmp_path / "saved_dict"), "--out", str(tmp_path / "x"),
                    "--split", "validation", check=False)  # fmt: skip
    assert proc.returncode == 2 and "split 'validation'" in proc.stderr


# --------------------------------------------------------------------------- loader image checks


def test_loader_missing_and_undecodable_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(IMG_A)
    (tmp_path / "img" / "broken.png").write_bytes(BROKEN)
    (tmp_path / "img" / "text.png").write_text("hello")
    lines = [
        {"id": "ok", "problem": "p", "answer": "1", "images": ["img/ok.png"]},
        {"id": "ok-twice", "problem": "p", "answer": "1", "images": ["img/ok.png", str(tmp_path / "img" / "ok.png")]},
        {"id": "gone", "problem": "p", "answer": "1", "images": ["img/ok.png", "img/gone.png"]},
        {"id": "broken", "problem": "p", "answer": "1", "images": ["img/broken.png"]},
        {"id": "text", "problem": "p", "answer": "1", "images": "img/text.png"},
        {"id": "url", "problem": "p", "answer": "1", "images": ["https://example.com/x.png"]},
        {"id": "broken-again", "problem": "p", "answer": "1", "images": ["img/broken.png"]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows, skipped = load_prompt_rows(path, check_images=True)
    assert [r.id for r in rows] == ["ok", "ok-twice", "url"]
    assert skipped == {"missing_image": ["gone (line 3)"],
                       "undecodable_image": ["broken (line 4)", "text (line 5)", "broken-again (line 7)"]}  # fmt: skip
    # Off by default: paths are resolved but not opened.
    rows, skipped = load_prompt_rows(path)
    assert len(rows) == 7 and not skipped
