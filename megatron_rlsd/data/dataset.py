"""Prompt datasets (JSONL / parquet) and a resumable epoch sampler.

A row is ``{id, problem, answer[, images]}``.  Bad rows are skipped and
returned per reason, never silently dropped and never fatal hours into a run:

=====================  =====================================================
reason                 cause
=====================  =====================================================
``bad_json``           a JSONL line that is not valid JSON
``not_an_object``      valid JSON that is not an object (``[1, 2]``, ``"x"``)
``missing_problem``    problem absent, null or blank
``bad_problem``        problem not a string / int / float (bool, list, NaN)
``missing_answer``     answer absent, null or blank
``bad_answer``         answer not a string / int / float (bool, list, NaN)
``bad_images``         images not a string or a list of strings (or of
                       ``{"path": str}`` objects as written by HF datasets)
``too_long``           problem longer than ``max_problem_chars``
``missing_image``      (``check_images=True``) a local image file that does
                       not exist
``undecodable_image``  (``check_images=True``) a local image file that PIL
                       cannot open / ``verify()`` (truncated, not an image)
=====================  =====================================================

Numeric answers become strings (``7`` -> ``"7"``, ``8.0`` -> ``"8"``,
``2.5`` -> ``"2.5"``).  Ids default to ``"<file stem>:<n>"`` where ``n`` is the 1-based line number
(JSONL) or the 0-based row index (parquet).  Relative image paths are
resolved against the data file's folder.  With ``check_images=True`` every
local image is checked once per distinct path (exists, ``PIL.Image.open``
+ ``verify()``: reads the file, decodes no pixels); URLs are not checked.

The field parsers (:func:`row_id`, :func:`text_field`, :func:`image_sources`, raising
:class:`SkipRow`) also serve tools/prepare_mmfinereason.py, which reads the published schema.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FIELDS", "EpochSampler", "PromptRow", "SkipRow", "image_sources", "load_prompt_rows", "row_id", "text_field",
]  # fmt: skip

FIELDS = ("id", "problem", "answer", "images", "solution")


@dataclass
class PromptRow:
    id: str
    problem: str
    answer: str
    images: list[str] = field(default_factory=list)
    solution: str = ""  # optional reference solution (a worked response; the warm start trains on it)


class SkipRow(Exception):
    """A row that is skipped, and why (``reason``, e.g. ``missing_answer``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed object or SkipRow) per non-blank line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                yield lineno, SkipRow("bad_json")


def iter_parquet(path: Path, columns: list[str]) -> Iterator[tuple[int, Any]]:
    """(0-based row index, dict) per row, read batch by batch."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    index = 0
    for batch in pf.iter_batches(batch_size=4096, columns=present):
        for record in batch.to_pylist():
            yield index, record
            index += 1


# ------------------------------------------------------------------ fields (shared with tools/)
def as_object(record: Any) -> dict:
    """A reader's record (`iter_jsonl` / `iter_parquet`) as a dict, or the SkipRow that says why not."""
    if isinstance(record, SkipRow):
        raise record
    if not isinstance(record, dict):
        raise SkipRow("not_an_object")
    return record


def row_id(raw: Any, default: str) -> str:
    """A row's id as text, or ``default`` when it has none (absent, blank, a list or an object)."""
    if raw is None or isinstance(raw, (dict, list)) or not str(raw).strip():
        return default
    return str(raw)


def text_field(value: Any, name: str, *, numbers: bool = True, blank: str | None = None) -> str:
    """A text field (``name`` is ``problem`` or ``answer``): a non-blank string, returned as is,
    or with ``numbers`` a finite int / float written as text (an integer-valued float ``answer``
    without ``.0``).  Raises SkipRow: ``missing_<name>`` when absent, ``blank`` (default
    ``missing_<name>``) when a blank string, ``bad_<name>`` for any other value (bool, list, NaN)."""
    if value is None:
        raise SkipRow(f"missing_{name}")
    if isinstance(value, str):
        if not value.strip():
            raise SkipRow(blank or f"missing_{name}")
        return value
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if numbers and isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if name == "answer" and value.is_integer() and abs(value) < 2**53 else str(value)
    raise SkipRow(f"bad_{name}")


def image_sources(value: Any, invalid: str) -> list[tuple[bytes | None, str | None]]:
    """The images of an images cell: a path, raw bytes, an HF ``datasets`` Image struct
    ``{"bytes", "path"}``, or a list of these.  Returns ``(bytes, path)`` per image, each None
    when absent or empty; an item of any other type raises ``SkipRow(invalid)``."""
    if value is None:
        return []
    sources = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
        elif isinstance(item, (bytes, bytearray)):
            data, path = item, None
        elif isinstance(item, str):
            data, path = None, item
        else:
            raise SkipRow(invalid)
        data = bytes(data) if isinstance(data, (bytes, bytearray)) and data else None
        sources.append((data, path if isinstance(path, str) and path else None))
    return sources


def _images_field(value: Any, base: Path) -> list[str]:
    """Image paths (relative ones resolved against ``base``; URLs kept); embedded bytes without a
    path are ``bad_images``: a prompt file refers to image files."""
    images = []
    for _, path in image_sources(value, invalid="bad_images"):
        if path is None:
            raise SkipRow("bad_images")
        images.append(path if "://" in path or os.path.isabs(path) else str(base / path))
    return images


def check_image(image: str) -> str | None:
    """``None`` if a local image file exists and PIL can verify it, else the skip reason."""
    if "://" in image:
        return None  # a URL: not checked at load time
    if not os.path.isfile(image):
        return "missing_image"
    from PIL import Image

    try:
        with Image.open(image) as img:
            img.verify()
    except Exception:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        return "undecodable_image"
    return None


def load_prompt_rows(
    path: str | os.PathLike,
    *,
    max_problem_chars: int | None = None,
    columns: Mapping[str, str] | None = None,
    check_images: bool = False,
) -> tuple[list[PromptRow], dict[str, list[str]]]:
    """Read prompt rows from ``.jsonl`` or ``.parquet``; returns ``(rows, skipped)``.

    ``columns`` maps our field names to the file's, e.g. ``{"problem": "question"}``.
    ``skipped`` maps each skip reason (see the module docstring) to the labels of all rows
    skipped for it, in file order: the row's id (``"<stem>:<n>"`` when it has none), or
    ``"<id> (line N)"`` / ``"<id> (row N)"`` when the row has an id of its own.  Nothing is
    logged: the caller reports.  ``check_images`` skips rows whose local image files are
    missing or not decodable (``missing_image`` / ``undecodable_image``), one cheap
    ``verify()`` per distinct path.

    Raises FileNotFoundError for a missing file, ValueError for an unknown
    extension, a bad ``columns`` mapping, or a file without a single usable row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt data file not found: {path}")
    mapping = {name: name for name in FIELDS}
    unknown = set(columns or {}) - set(FIELDS)
    if unknown:
        raise ValueError(f"columns: unknown field(s) {sorted(unknown)}; expected a subset of {list(FIELDS)}")
    mapping.update(columns or {})
    # a column the caller mapped to another field (e.g. answers in a "solution" column) is not
    # also read as the optional reference solution
    solution_column = mapping["solution"] if mapping["solution"] not in {mapping[f] for f in FIELDS if f != "solution"} else None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records, where = iter_jsonl(path), "line"
    elif suffix == ".parquet":
        records, where = iter_parquet(path, list(mapping.values())), "row"
    else:
        raise ValueError(f"{path}: unsupported data format {suffix!r}; use .jsonl or .parquet")

    rows: list[PromptRow] = []
    skipped: dict[str, list[str]] = {}
    image_status: dict[str, str | None] = {}  # path -> skip reason or None (checked once per path)
    for n, record in records:
        default_id = f"{path.stem}:{n}"
        rid = default_id
        try:
            record = as_object(record)
            rid = row_id(record.get(mapping["id"]), default_id)
            problem = text_field(record.get(mapping["problem"]), "problem")
            answer = text_field(record.get(mapping["answer"]), "answer").strip()
            if max_problem_chars is not None and len(problem) > max_problem_chars:
                raise SkipRow("too_long")
            images = _images_field(record.get(mapping["images"]), path.parent)
            if check_images:
                for image in images:
                    if image not in image_status:
                        image_status[image] = check_image(image)
                    if image_status[image] is not None:
                        raise SkipRow(image_status[image])
        except SkipRow as skip:
            skipped.setdefault(skip.reason, []).append(rid if rid == default_id else f"{rid} ({where} {n})")
            continue
        solution = record.get(solution_column) if solution_column else None
        rows.append(PromptRow(id=rid, problem=problem, answer=answer, images=images,
                              solution=solution if isinstance(solution, str) else ""))  # fmt: skip

    if not rows:
        counts = {reason: len(labels) for reason, labels in skipped.items()}
        raise ValueError(
            f"{path}: no usable rows (skipped: {counts or 'file is empty'}); "
            f"expected fields {mapping['problem']!r} and {mapping['answer']!r} (set `columns` to map other names)"
        )
    return rows, skipped


class EpochSampler:
    """Deterministic per-epoch shuffle over ``num_rows`` indices, resumable exactly.

    Epoch ``e`` visits ``permutation(num_rows)`` drawn from
    ``numpy.random.default_rng([seed, e])``; :meth:`next_indices` continues
    across epoch boundaries.  The state is just ``(epoch, position)``, so a
    restored sampler yields the same indices the original would have.
    """

    def __init__(self, num_rows: int, seed: int = 0):
        if num_rows <= 0:
            raise ValueError(f"EpochSampler: num_rows must be positive, got {num_rows}")
        if seed < 0:
            raise ValueError(f"EpochSampler: seed must be non-negative, got {seed}")
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def _current(self) -> np.ndarray:
        if self._perm is None:
            self._perm = self.permutation(self.epoch)
        return self._perm

    def next_indices(self, k: int) -> list[int]:
        """The next ``k`` row indices (crossing into new epochs as needed)."""
        if k < 0:
            raise ValueError(f"next_indices: k must be >= 0, got {k}")
        out: list[int] = []
        while len(out) < k:
            perm = self._current()
            take = min(k - len(out), self.num_rows - self.position)
            out.extend(int(i) for i in perm[self.position : self.position + take])
            self.position += take
            if self.position == self.num_rows:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "num_rows"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"EpochSampler: checkpoint has {key}={state[key]} but this run has {getattr(self, key)}; "
                    "resume with the same dataset and seed"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_rows:
            raise ValueError(f"EpochSampler: invalid state epoch={epoch} position={position} for {self.num_rows} rows")
        self.epoch, self.position, self._perm = epoch, position, None
