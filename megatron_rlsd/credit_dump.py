"""Per-token credit dumps: what the trainer writes every `trainer.dump_credit_interval` steps and
tools/credit_heatmap.py draws.

File: ``OUTPUT/credit/step_NNNNNNN.jsonl`` (:func:`credit_dump_path`), one JSON object per
dumped sample, keys in this order:

==============  ==============  ==========================================================
key             type            meaning
==============  ==============  ==========================================================
``step``        int             the optimizer step the credit was computed for (1-based)
``sample_id``   str             ``"<prompt row id>#<n>"``: the n-th dumped sample of that prompt
``prompt``      str             the student prompt as text (chat template applied; a run of
                                one repeated special token, e.g. image placeholders, written
                                once with ``×count``)
``answer``      str             the reference answer
``tokens``      list[str]       the response tokens, each decoded on its own
``credit``      list[float]     A_t, the token advantage the surrogate used (len = tokens)
``delta``       list[float] |   Delta_t = log P_T(y_t | x, r, y_<t) - log P_S(y_t | x, y_<t)
                null            at the rollout temperature (len = tokens); null for loss
                                modes without a teacher pass (grpo)
``advantage``   float           A, the sequence advantage
``reward``      float           the verifier's reward
``correct``     bool            the verifier's verdict
==============  ==============  ==========================================================

For RLSD, ``credit[t] = A * ((1 - lambda) + lambda * clip(exp(sign(A) * delta[t]), 1 - eps_w,
1 + eps_w))`` (algorithms/rlsd.py). All numbers are finite. Files are written atomically (a
temporary file renamed into place), so a reader never sees half a dump.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = ["CREDIT_SUBDIR", "CreditDumpRow", "credit_dump_path", "credit_rows", "read_credit_dump", "write_credit_dump"]

CREDIT_SUBDIR = "credit"


@dataclass
class CreditDumpRow:
    """One dumped sample (the schema is in the module doc)."""

    step: int
    sample_id: str
    prompt: str
    answer: str
    tokens: list[str]
    credit: list[float]
    delta: list[float] | None
    advantage: float
    reward: float
    correct: bool

    def validate(self) -> None:
        """Raises ValueError naming the first field that breaks the schema."""
        if not isinstance(self.tokens, list) or not all(isinstance(t, str) for t in self.tokens):
            raise ValueError(f"sample {self.sample_id!r}: tokens must be strings")
        n = len(self.tokens)
        for name in ("credit", "delta"):
            values = getattr(self, name)
            if values is None and name == "delta":
                continue
            if not isinstance(values, list) or len(values) != n:
                raise ValueError(f"sample {self.sample_id!r}: {name} must be a list of one number per token ({n} tokens)")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise ValueError(f"sample {self.sample_id!r}: {name} values must be finite numbers")
        for name in ("advantage", "reward"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"sample {self.sample_id!r}: {name} must be a finite number, got {v!r}")
        if not isinstance(self.correct, bool) or isinstance(self.step, bool) or not isinstance(self.step, int):
            raise ValueError(f"sample {self.sample_id!r}: step must be an int and correct a bool")


def credit_dump_path(output_dir: str | os.PathLike, step: int) -> Path:
    """``OUTPUT/credit/step_NNNNNNN.jsonl``."""
    return Path(output_dir) / CREDIT_SUBDIR / f"step_{step:07d}.jsonl"


def write_credit_dump(path: str | os.PathLike, rows: Sequence[CreditDumpRow]) -> Path:
    """Validate `rows` and write them as JSONL at `path` (parent folders created), atomically."""
    path = Path(path)
    for row in rows:
        row.validate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_credit_dump(path: str | os.PathLike) -> list[CreditDumpRow]:
    """The rows of a dump. Raises FileNotFoundError, or ValueError naming the file and line of
    a row that is not valid JSON or breaks the schema."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such credit dump")
    names = [f.name for f in fields(CreditDumpRow)]
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                missing = [k for k in names if k not in obj]
                if missing:
                    raise ValueError(f"missing key(s) {missing}")
                row = CreditDumpRow(**{k: obj[k] for k in names})
                row.validate()
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            rows.append(row)
    return rows


_SPECIAL_RUN = re.compile(r"(<\|[A-Za-z0-9_]+\|>)\1+")


def _prompt_text(tokenizer, ids: Sequence[int]) -> str:
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    return _SPECIAL_RUN.sub(lambda m: f"{m.group(1)}×{len(m.group(0)) // len(m.group(1))}", text)


def credit_rows(step: int, samples: Sequence, credit, delta, mask, tokenizer, limit: int = 4) -> list[CreditDumpRow]:
    """Dump rows for up to `limit` correct and `limit` incorrect samples of a batch, in batch
    order. Runs where the credit lives (the last pipeline stage of a data-parallel rank).

    `samples`: rollout.samples.Sample, the batch the tensors belong to; `credit`, `delta`,
    `mask`: [B, R] tensors over response positions (`delta` may be None); `tokenizer` decodes
    the prompt and each response token."""
    credit, mask = credit.detach().float().cpu(), mask.detach().cpu()
    delta = None if delta is None else delta.detach().float().cpu()
    taken = {True: 0, False: 0}
    per_prompt: dict[str, int] = {}
    rows = []
    for i, s in enumerate(samples):
        if taken[bool(s.correct)] >= limit:
            continue
        taken[bool(s.correct)] += 1
        n = int(mask[i].sum())
        ids = list(s.response[:n])
        k = per_prompt.get(s.row.id, 0)
        per_prompt[s.row.id] = k + 1
        rows.append(CreditDumpRow(
            step=int(step), sample_id=f"{s.row.id}#{k}", prompt=_prompt_text(tokenizer, s.student_prompt), answer=s.row.answer,
            tokens=[tokenizer.decode([t], skip_special_tokens=False) for t in ids], credit=credit[i, :n].tolist(),
            delta=None if delta is None else delta[i, :n].tolist(), advantage=float(s.advantage), reward=float(s.reward),
            correct=bool(s.correct),
        ))  # fmt: skip
    return rows
