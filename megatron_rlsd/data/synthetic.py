"""Synthetic verifiable tasks for the embedded tiny default (CPU smoke runs).

Tasks (all answers are short integers the verifier checks exactly):

* ``add``:  "What is 3 + 5?"                      -> "8"
* ``max``:  "What is the largest of 3, 7, 2?"     -> "7"
* ``copy``: "Repeat this number: 4821"            -> "4821"

:func:`sft_text` gives the ideal response in the required format; every row carries it as its
``solution``, on which a tiny model is warm-started with a few supervised steps before RL.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

from .dataset import PromptRow

__all__ = ["SYNTHETIC_TASKS", "make_synthetic_rows", "sft_text", "write_jsonl"]

SYNTHETIC_TASKS = ("add", "max", "copy")

_ADD = re.compile(r"^What is (-?\d+) \+ (-?\d+)\?$")
_MAX = re.compile(r"^What is the largest of ([-\d, ]+)\?$")
_COPY = re.compile(r"^Repeat this number: (\d+)$")


def make_synthetic_rows(n: int, seed: int, task: str = "add", max_operand: int = 9) -> list[PromptRow]:
    """``n`` rows of ``task`` with operands in ``[0, max_operand]``; same seed, same rows."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {SYNTHETIC_TASKS}")
    if n < 0 or max_operand < 1:
        raise ValueError(f"make_synthetic_rows: need n >= 0 and max_operand >= 1, got n={n}, max_operand={max_operand}")
    rng = random.Random(f"{task}:{seed}:{max_operand}")
    rows = []
    for i in range(n):
        if task == "add":
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            problem, answer = f"What is {a} + {b}?", str(a + b)
        elif task == "max":
            values = [rng.randint(0, max_operand) for _ in range(3)]
            problem, answer = f"What is the largest of {', '.join(map(str, values))}?", str(max(values))
        else:
            digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 4)))
            problem, answer = f"Repeat this number: {digits}", digits
        row = PromptRow(id=f"synthetic-{task}-{seed}-{i}", problem=problem, answer=answer)
        row.solution = sft_text(row)
        rows.append(row)
    return rows


def sft_text(row: PromptRow) -> str:
    """The ideal short response, e.g. ``<thought>3 + 5 = 8</thought><answer>8</answer>``."""
    problem = row.problem.strip()
    if m := _ADD.match(problem):
        thought = f"{m.group(1)} + {m.group(2)} = {row.answer}"
    elif m := _MAX.match(problem):
        thought = f"max({m.group(1)}) = {row.answer}"
    elif m := _COPY.match(problem):
        thought = f"The number is {m.group(1)}"
    else:
        thought = f"The answer is {row.answer}"
    return f"<thought>{thought}</thought><answer>{row.answer}</answer>"


def write_jsonl(rows: Iterable[PromptRow], path: str | os.PathLike) -> Path:
    """Write rows as JSONL (``id``, ``problem``, ``answer``; ``images``, ``solution`` when set);
    returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            record = {"id": row.id, "problem": row.problem, "answer": row.answer}
            if row.images:
                record["images"] = list(row.images)
            if row.solution:
                record["solution"] = row.solution
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
