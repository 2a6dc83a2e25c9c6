"""A tiny synthetic visual task with verifiable answers, for the embedded VL default.

Each image is a small PNG (``size`` x ``size`` px, default 48) with one to ``max_shapes``
solid squares and circles in four colours on a white background.  Shapes never touch (a gap
of at least two pixels), are drawn without anti-aliasing, and use exact palette colours, so
every answer can be checked from the pixels alone.  Questions (answers are one short word):

* ``count_color``:   "How many red shapes are in the image?"   -> "2"   (may be "0")
* ``count_shape``:   "How many circles are in the image?"      -> "1"   (may be "0")
* ``largest_color``: "What color is the largest shape?"        -> "blue"
  (the largest shape covers at least 1.2x the pixels of any other)

:func:`make_synthetic_vl_rows` writes the images and returns rows with their paths;
:func:`sft_text_vl` gives the ideal response (like :func:`.synthetic.sft_text`; each row carries it
as its ``solution``), and
:func:`synthetic_vl_corpus` the task's text for training a tiny tokenizer.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from .dataset import PromptRow

__all__ = [
    "BACKGROUND",
    "COLORS",
    "SHAPES",
    "SYNTHETIC_VL_TASKS",
    "make_synthetic_vl_rows",
    "sft_text_vl",
    "synthetic_vl_corpus",
]

SYNTHETIC_VL_TASKS = ("count_color", "count_shape", "largest_color")
COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (230, 190, 20)}
SHAPES = ("square", "circle")
BACKGROUND = (255, 255, 255)

_GAP = 2  # empty pixels between any two shapes
_MIN_SIDE = 6  # smallest square side / circle diameter (a 6 px circle does not fill its box)
_LARGEST_MARGIN = 1.2  # largest_color: largest area >= this x the runner-up's

_COUNT_COLOR = re.compile(r"^How many (\w+) shapes are in the image\?$")
_COUNT_SHAPE = re.compile(r"^How many (\w+)s are in the image\?$")
_LARGEST = "What color is the largest shape?"


def _question(task: str, rng: random.Random, shapes: list[tuple[str, str, int, int, int]], areas: list[int]):
    """(problem, answer) for ``task`` over ``shapes`` = [(color, shape, x, y, side)]."""
    if task == "count_color":
        color = rng.choice(list(COLORS))
        return f"How many {color} shapes are in the image?", str(sum(s[0] == color for s in shapes))
    if task == "count_shape":
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are in the image?", str(sum(s[1] == shape for s in shapes))
    largest = max(range(len(shapes)), key=areas.__getitem__)
    return _LARGEST, shapes[largest][0]


def _place(rng: random.Random, size: int, count: int) -> list[tuple[int, int, int]] | None:
    """``count`` non-touching boxes (x, y, side) inside the canvas, or None if they do not fit."""
    boxes: list[tuple[int, int, int]] = []
    max_side = max(_MIN_SIDE, size // 3)
    for _ in range(count):
        for _attempt in range(50):
            side = rng.randint(_MIN_SIDE, max_side)
            x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
            if all(x + side + _GAP <= bx or bx + bs + _GAP <= x or y + side + _GAP <= by or by + bs + _GAP <= y
                   for bx, by, bs in boxes):  # fmt: skip
                boxes.append((x, y, side))
                break
        else:
            return None
    return boxes


def _draw(size: int, shapes: list[tuple[str, str, int, int, int]]):
    """(RGB image, pixel area of each shape)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    areas = []
    for color, shape, x, y, side in shapes:
        box = [x, y, x + side - 1, y + side - 1]
        # the area is measured on a mask drawn the same way, so it is exact whatever PIL rasterises
        mask = Image.new("L", (size, size), 0)
        (ImageDraw.Draw(mask).rectangle if shape == "square" else ImageDraw.Draw(mask).ellipse)(box, fill=255)
        areas.append(mask.histogram()[255])
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLORS[color])
    return image, areas


def make_synthetic_vl_rows(
    n: int,
    seed: int,
    out_dir: str | os.PathLike,
    *,
    task: str | None = None,
    size: int = 48,
    max_shapes: int = 4,
) -> list[PromptRow]:
    """``n`` rows with one PNG each, written to ``out_dir/<id>.png``; same seed, same rows and bytes.

    ``task`` is one of :data:`SYNTHETIC_VL_TASKS`, or None to cycle through all of them.
    Image paths in the rows are absolute (as :func:`.dataset.load_prompt_rows` returns them).
    """
    if task is not None and task not in SYNTHETIC_VL_TASKS:
        raise ValueError(f"unknown synthetic VL task {task!r}; choose from {SYNTHETIC_VL_TASKS} or None (all)")
    if n < 0 or not 32 <= size <= 256 or not 1 <= max_shapes <= 8:
        raise ValueError(
            f"make_synthetic_vl_rows: need n >= 0, 32 <= size <= 256 and 1 <= max_shapes <= 8, "
            f"got n={n}, size={size}, max_shapes={max_shapes}"
        )
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"vl:{task}:{seed}:{size}:{max_shapes}")
    rows = []
    for i in range(n):
        row_task = task or SYNTHETIC_VL_TASKS[i % len(SYNTHETIC_VL_TASKS)]
        while True:
            count = rng.randint(2 if row_task == "largest_color" else 1, max_shapes)
            boxes = _place(rng, size, count)
            if boxes is None:
                continue
            shapes = [(rng.choice(list(COLORS)), rng.choice(SHAPES), x, y, side) for x, y, side in boxes]
            image, areas = _draw(size, shapes)
            if row_task == "largest_color":
                first, second = sorted(areas, reverse=True)[:2]
                if first < _LARGEST_MARGIN * second:
                    continue
            break
        problem, answer = _question(row_task, rng, shapes, areas)
        row_id = f"synthetic-vl-{seed}-{i}"
        path = out / f"{row_id}.png"
        image.save(path, format="PNG")
        row = PromptRow(id=row_id, problem=problem, answer=answer, images=[str(path)])
        row.solution = sft_text_vl(row)
        rows.append(row)
    return rows


def sft_text_vl(row: PromptRow) -> str:
    """The ideal short response, e.g. ``<thought>I count 2 red shapes.</thought><answer>2</answer>``."""
    problem = row.problem.strip()
    if m := _COUNT_COLOR.match(problem):
        thought = f"I count {row.answer} {m.group(1)} shapes."
    elif m := _COUNT_SHAPE.match(problem):
        thought = f"I count {row.answer} {m.group(1)}s."
    elif problem == _LARGEST:
        thought = f"The largest shape is {row.answer}."
    else:
        thought = f"The answer is {row.answer}"
    return f"<thought>{thought}</thought><answer>{row.answer}</answer>"


def synthetic_vl_corpus(max_shapes: int = 4) -> list[str]:
    """Every question, answer and ideal response of the task (for training a tiny tokenizer)."""
    questions = [f"How many {color} shapes are in the image?" for color in COLORS]
    questions += [f"How many {shape}s are in the image?" for shape in SHAPES]
    questions.append(_LARGEST)
    responses = []
    for q in questions:
        answers = list(COLORS) if q == _LARGEST else [str(k) for k in range(max_shapes + 1)]
        responses += [sft_text_vl(PromptRow(id="", problem=q, answer=a)) for a in answers]
    words = " ".join([*COLORS, *SHAPES, *(f"{s}s" for s in SHAPES), "shape", "shapes", "image", "color", "largest"])
    return [*questions, *responses, words]
