"""The synthetic visual task: deterministic, answers verified from the pixels alone."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_rlsd.data import load_prompt_rows, write_jsonl
from megatron_rlsd.data.synthetic_vl import (
    BACKGROUND,
    COLORS,
    SYNTHETIC_VL_TASKS,
    make_synthetic_vl_rows,
    sft_text_vl,
    synthetic_vl_corpus,
)
from megatron_rlsd.rewards import answers_match, extract_answer, score_response


def components(pixels: np.ndarray) -> list[tuple[str, int, bool]]:
    """(colour name, pixel count, fills its bounding box) for each 4-connected same-colour blob."""
    h, w, _ = pixels.shape
    seen = np.zeros((h, w), dtype=bool)
    out = []
    for name, rgb in COLORS.items():
        mask = np.all(pixels == rgb, axis=-1)
        for y0, x0 in zip(*np.nonzero(mask & ~seen)):
            if seen[y0, x0]:
                continue
            queue, cells = deque([(y0, x0)]), []
            seen[y0, x0] = True
            while queue:
                y, x = queue.popleft()
                cells.append((y, x))
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            ys, xs = zip(*cells)
            box = (max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1)
            out.append((name, len(cells), len(cells) == box))
    return out


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return make_synthetic_vl_rows(60, seed=7, out_dir=tmp_path_factory.mktemp("vl"))


def test_rows_are_deterministic(rows, tmp_path):
    again = make_synthetic_vl_rows(60, seed=7, out_dir=tmp_path / "again")
    assert [(r.id, r.problem, r.answer) for r in again] == [(r.id, r.problem, r.answer) for r in rows]
    for a, b in zip(rows, again):
        assert Path(a.images[0]).read_bytes() == Path(b.images[0]).read_bytes()  # byte-identical PNGs
    other = make_synthetic_vl_rows(60, seed=8, out_dir=tmp_path / "other")
    assert [(r.problem, r.answer) for r in other] != [(r.problem, r.answer) for r in rows]
    assert len({r.id for r in rows}) == 60
    # task=None cycles through every task
    assert {r.problem for r in rows[2::3]} == {"What color is the largest shape?"}
    assert len(SYNTHETIC_VL_TASKS) == 3


def test_answers_are_correct_by_construction(rows):
    seen_answers = set()
    for row in rows:
        assert len(row.images) == 1 and row.images[0].endswith(f"{row.id}.png")
        with Image.open(row.images[0]) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (48, 48)
            pixels = np.asarray(img)
        # exact palette colours only: no anti-aliasing, nothing else drawn
        palette = {tuple(c) for c in pixels.reshape(-1, 3)}
        assert palette <= {BACKGROUND, *COLORS.values()}
        blobs = components(pixels)
        assert 1 <= len(blobs) <= 4
        words = row.problem.split()
        if row.problem == "What color is the largest shape?":
            ranked = sorted(blobs, key=lambda b: b[1], reverse=True)
            assert ranked[0][0] == row.answer and ranked[0][1] >= 1.2 * ranked[1][1]
        elif words[3] == "shapes":  # How many <colour> shapes are in the image?
            assert row.answer == str(sum(b[0] == words[2] for b in blobs))
        else:  # How many squares / circles are in the image?
            want_square = words[2] == "squares"
            assert words[2] in ("squares", "circles")
            assert row.answer == str(sum(b[2] == want_square for b in blobs))
        seen_answers.add(row.answer)
    assert "0" in seen_answers and seen_answers & set(COLORS)  # zero counts and colour answers both occur


def test_sft_text_and_round_trip(rows, tmp_path):
    for row in rows:
        response = sft_text_vl(row)
        assert extract_answer(response) == row.answer and score_response(response, row.answer).correct
    assert sft_text_vl(rows[2]).startswith("<thought>The largest shape is ")
    assert not answers_match("red", "blue")
    path = write_jsonl(rows, tmp_path / "vl.jsonl")
    loaded, skipped = load_prompt_rows(path, check_images=True)
    assert loaded == rows and not skipped


def test_single_task_and_validation(tmp_path):
    counts = make_synthetic_vl_rows(12, seed=0, out_dir=tmp_path, task="count_shape", size=32, max_shapes=2)
    assert all(
        r.problem in ("How many squares are in the image?", "How many circles are in the image?") for r in counts
    )
    assert all(r.answer in ("0", "1", "2") for r in counts)
    with Image.open(counts[0].images[0]) as img:
        assert img.size == (32, 32)
    with pytest.raises(ValueError, match="unknown synthetic VL task"):
        make_synthetic_vl_rows(1, seed=0, out_dir=tmp_path, task="count_dogs")
    with pytest.raises(ValueError, match="size"):
        make_synthetic_vl_rows(1, seed=0, out_dir=tmp_path, size=8)


def test_corpus_covers_the_task_text(rows):
    from megatron_rlsd.models.tiny import build_tiny_tokenizer, default_corpus

    corpus = synthetic_vl_corpus()
    assert all(isinstance(t, str) and t for t in corpus)
    for row in rows:
        assert row.problem in corpus and sft_text_vl(row) in corpus
    tok = build_tiny_tokenizer(default_corpus() + corpus)
    for text in (rows[0].problem, sft_text_vl(rows[2])):
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
