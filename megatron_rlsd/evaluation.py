"""Benchmark evaluation with the rollout engine: loading benchmark files, multiple-choice
scoring, generation in batches, and per-benchmark accuracy / avg@k / pass@k.

The same code serves tools/evaluate.py (a model from disk) and validation during training (an
engine that already holds the policy's weights):

    rows, skipped = load_benchmark(path, PRESETS["mathvista"])          # every rank
    mine = shard_rows(rows, rank, world)                                # this rank's share
    records, _ = evaluate_rows(engine, mine, templates, encoder, EvalSampling(...))
    records = gather_records(records + skipped_on_rank0)                # collective; all on rank 0
    summary = summarize(records)                                        # rank 0

Benchmark files are JSONL or parquet, one question per row. A :class:`Layout` names the columns:
the question, the reference answer, optionally an id, the multiple-choice options and one or more
image columns. :data:`PRESETS` holds the published layouts of MMMU, MathVista, MathVision,
ZeroBench and We-Math (docs/evaluation.md lists their columns). Options may be a list, the
string form of a Python list (MMMU: ``"['1', '2']"``), a letter-keyed dict or a delimited string
(We-Math: ``"A. 3;B. 4;C. 5"``). Images may be file paths (relative ones resolved against the
data file's folder), raw bytes or HF ``datasets`` Image structs ``{"bytes", "path"}`` (parquet),
or a list of these; several image columns (MMMU's ``image_1`` .. ``image_7``) are read in order.

Unusable rows are skipped and counted per reason, never fatal (the record of a skipped row has
``verdict`` None): ``bad_json``, ``not_an_object``, ``missing_question``, ``bad_question``,
``missing_answer``, ``bad_answer``, ``bad_options``, ``answer_not_an_option`` (a multiple-choice
answer that is neither an option letter nor an option's text), ``bad_images``, ``missing_image``,
``undecodable_image``; at generation time ``prompt_too_long`` (over
``EvalSampling.max_prompt_tokens`` after the chat template, image tokens included) and
``needs_vision_model`` (images given to a text-only model). A file that cannot be read at all (no
such file, unknown format, a named column absent, no usable row) raises :class:`EvalDataError`.

Prompts: the student template (data/templates.py) with the question as its problem; for a
multiple-choice question the options are appended as lettered lines ("A. ...") with an
instruction to answer with the letter. Scoring: the project's verifier
(rewards.score_response) for open questions; for multiple choice the extracted answer
(``<answer>`` tags or ``\\boxed{}``) is read as a letter ("B", "(B)", "B. text", "Option B",
"the answer is B") or as an option's text (exact, then equivalent by the verifier), and the
verdict is whether that option is the reference one.
"""

from __future__ import annotations

import ast
import io
import math
import re
import sys
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from megatron_rlsd.data.dataset import (
    PromptRow, SkipRow, as_object, check_image, iter_jsonl, iter_parquet, image_sources, row_id, text_field,
)  # fmt: skip
from megatron_rlsd.rewards import RewardConfig, check_answer, extract_answer, normalize_answer, score_response

__all__ = [
    "PRESETS",
    "EvalDataError",
    "EvalRecord",
    "EvalRow",
    "EvalSampling",
    "Layout",
    "choose_option",
    "encode_row",
    "evaluate_rows",
    "format_table",
    "gather_records",
    "layout_with",
    "load_benchmark",
    "problem_text",
    "score_sample",
    "shard_rows",
    "summarize",
    "summary_metrics",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the letter of the correct option."


class EvalDataError(ValueError):
    """A benchmark file that cannot be evaluated at all (the message names the file and the fix)."""


# ------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class Layout:
    """Column names of a benchmark file. A named column must exist in the file unless its field
    is in `optional` (the id always is: rows without one are labelled "<file stem>:<n>"); an
    empty name ("") means the file has no such column."""

    question: str
    answer: str
    id: str | None = None
    options: str | None = None
    images: tuple[str, ...] = ()
    optional: frozenset[str] = frozenset({"id"})

    def columns(self) -> list[str]:
        return [c for c in (self.id, self.question, self.options, self.answer, *self.images) if c]

    def required(self) -> list[str]:
        named = {"question": [self.question], "answer": [self.answer], "options": [self.options], "images": list(self.images)}
        return [c for f, cols in named.items() if f not in self.optional for c in cols if c]


# The published column names (Hugging Face dataset cards, parquet exports):
#   MMMU/MMMU             id, question, options (str of a list), answer (letter or text), image_1..7
#   AI4Math/MathVista     pid, question, choices (list or null), answer (option text or value),
#                         decoded_image (image; `image` holds the relative path)
#   MathLLMs/MathVision   id, question, options (list, [] when open), answer (letter or value),
#                         decoded_image (image; `image` holds the relative path)
#   jonathan-roberts1/zerobench   question_id, question_text, question_answer,
#                         question_images_decoded (list of images; `question_images` the paths)
#   We-Math/We-Math       ID, question, option ("A. ..;B. .."), answer (letter), image_path (image)
PRESETS: dict[str, Layout] = {
    # our training files ({id, problem, answer[, images]}), with an optional options column
    "default": Layout(question="problem", answer="answer", id="id", options="options", images=("images",),
                      optional=frozenset({"id", "options", "images"})),
    "mmmu": Layout(question="question", answer="answer", id="id", options="options",
                   images=tuple(f"image_{i}" for i in range(1, 8))),
    "mathvista": Layout(question="question", answer="answer", id="pid", options="choices", images=("decoded_image",)),
    "mathvision": Layout(question="question", answer="answer", id="id", options="options", images=("decoded_image",)),
    "zerobench": Layout(question="question_text", answer="question_answer", id="question_id", images=("question_images_decoded",)),
    "wemath": Layout(question="question", answer="answer", id="ID", options="option", images=("image_path",)),
}


# ------------------------------------------------------------------------------------ rows
@dataclass
class EvalRow:
    """One benchmark question. `answers`: the reference answer(s), any of which counts (for a
    multiple-choice question: its option letter). `images`: file paths or encoded bytes."""

    benchmark: str
    index: int  # position in the benchmark file (0-based over its rows, skipped ones included)
    id: str
    question: str
    answers: tuple[str, ...]
    options: list[str] = field(default_factory=list)
    images: list[str | bytes] = field(default_factory=list)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)


@dataclass
class EvalRecord:
    """One generated sample (or one skipped question: `verdict` None, `reason` why) as written
    to the per-sample JSONL."""

    benchmark: str
    prompt_id: str
    index: int
    sample: int  # 0..k-1 (0 for a skipped question)
    answer: str  # the reference answer (alternatives joined by " | ")
    response: str | None = None
    extracted: str | None = None  # the answer as extracted from the response
    choice: str | None = None  # multiple choice: the option letter read from `extracted`
    verdict: bool | None = None
    reason: str = ""  # verifier reason (ok, no_answer, no_choice, timeout, unparseable) or skip reason
    finish_reason: str | None = None
    response_tokens: int = 0


def _skip(row_or_label, benchmark: str, index: int, reason: str, answer: str = "") -> EvalRecord:
    label = row_or_label.id if isinstance(row_or_label, EvalRow) else row_or_label
    return EvalRecord(benchmark=benchmark, prompt_id=label, index=index, sample=0, answer=answer, reason=reason)


_LIST_LIKE = re.compile(r"^\s*\[.*\]\s*$", re.DOTALL)
# a letter item of a delimited options string: start or ';' / newline, then "A." / "(A)" / "A:"
_OPTION_ITEM = re.compile(r"(?:^|[;\n])\s*\(?([A-Z])\s*[.:：．)]\s*")
_LETTER_PREFIX = re.compile(r"^\(?([A-Z])\s*[.:：．)]\s+")


def _literal_list(text: str):
    """The list written as a Python/JSON literal in `text`, else None (never evaluates code)."""
    if len(text) > 100_000 or not _LIST_LIKE.match(text):
        return None
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    return value if isinstance(value, list) else None


def _option_text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SkipRow("bad_options")
    if isinstance(value, float) and not math.isfinite(value):
        raise SkipRow("bad_options")
    return str(value).strip()


def parse_options(value: Any) -> list[str]:
    """A cell of the options column -> the option texts in letter order ([] for an open question).
    Raises SkipRow("bad_options") for anything else."""
    if value is None:
        return []
    if isinstance(value, dict):
        keys = sorted(value)
        if keys != list(LETTERS[: len(keys)]):
            raise SkipRow("bad_options")
        return [_option_text(value[k]) for k in keys]
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        listed = _literal_list(text)
        if listed is not None:
            return parse_options(listed)
        items = list(_OPTION_ITEM.finditer(text))
        if not items or [m.group(1) for m in items] != list(LETTERS[: len(items)]) or items[0].start() != 0:
            raise SkipRow("bad_options")
        ends = [m.start() for m in items[1:]] + [len(text)]
        return [text[m.end() : end].strip().rstrip(";").strip() for m, end in zip(items, ends)]
    if isinstance(value, (list, tuple)):
        options = [_option_text(v) for v in value]
        if len(options) > len(LETTERS):
            raise SkipRow("bad_options")
        # items that carry their own "A. " prefixes, in order: drop them
        prefixes = [_LETTER_PREFIX.match(o) for o in options]
        if options and all(prefixes) and [m.group(1) for m in prefixes] == list(LETTERS[: len(options)]):
            options = [o[m.end() :].strip() for o, m in zip(options, prefixes)]
        return options
    raise SkipRow("bad_options")


def _same_text(a: str, b: str) -> bool:
    return normalize_answer(a).lower() == normalize_answer(b).lower()


def gold_option(answer: str, options: Sequence[str]) -> str:
    """The reference option's letter: the answer is a letter in range ("B", "(B)"), or the text
    of exactly one option. Raises SkipRow("answer_not_an_option")."""
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", answer.strip())
    if m and (letter := m.group(1).upper()) in LETTERS[: len(options)]:
        return letter
    matches = [LETTERS[i] for i, o in enumerate(options) if _same_text(answer, o)]
    if len(matches) == 1:
        return matches[0]
    raise SkipRow("answer_not_an_option")


def _answer_alternatives(answer: str) -> tuple[str, ...]:
    """MMMU writes some open answers as a list of accepted values ("['24/7', '3.429']")."""
    listed = _literal_list(answer)
    if listed and all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in listed):
        return tuple(str(a).strip() for a in listed)
    return (answer.strip(),)


def _image_items(record: dict, layout: Layout, base: Path) -> list[str | bytes]:
    """Every image of a row, column by column: embedded bytes when present, else the path
    (relative ones resolved against `base`). Raises SkipRow for unusable or missing images."""
    images: list[str | bytes] = []
    for column in layout.images:
        for data, path in image_sources(record.get(column), invalid="bad_images"):
            if data is not None:
                images.append(data)
            elif path is None or "://" in path:
                raise SkipRow("bad_images")  # neither bytes nor a local file
            else:
                images.append(path if Path(path).is_absolute() else str(base / path))
    return images


def _check_image_item(image: str | bytes) -> str | None:
    """None if the image opens and verifies, else the skip reason (reads, decodes no pixels)."""
    if isinstance(image, str):
        return check_image(image)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as img:
            img.verify()
    except Exception:  # PIL raises many types for broken data
        return "undecodable_image"
    return None


def _columns_hint(columns: set[str]) -> str:
    fits = [name for name, layout in PRESETS.items() if set(layout.required()) <= columns]
    if fits:
        return f"this looks like the {fits[0]} layout: use the preset {fits[0]!r}"
    return "name the question / answer / options / image columns, or pick a preset"


def load_benchmark(path: str | Path, layout: Layout, name: str | None = None,
                   first_index: int = 0) -> tuple[list[EvalRow], list[EvalRecord]]:  # fmt: skip
    """Read one benchmark file: its usable rows, and one skipped record per unusable row.
    Rows are indexed from `first_index` (a benchmark spread over several files continues the
    count of the previous ones).

    Raises EvalDataError: no such file, an unsupported extension, a required column that no
    row has, an empty file, or no usable row."""
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records, columns = iter_jsonl(path), None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            columns = set(pq.ParquetFile(path).schema_arrow.names)
        except Exception as e:  # pyarrow's errors for a file that is not parquet
            raise EvalDataError(f"{path}: not a readable parquet file ({e})") from None
        _check_columns(path, layout, columns)
        records = iter_parquet(path, layout.columns())
    else:
        raise EvalDataError(f"{path}: unsupported format {suffix!r}; use .jsonl or .parquet")

    rows: list[EvalRow] = []
    skipped: list[EvalRecord] = []
    seen: set[str] = set()
    count = 0
    for n, record in records:
        index, default_id = first_index + count, f"{path.stem}:{n}"
        count += 1
        label = default_id
        try:
            record = as_object(record)
            seen.update(record)
            label = row_id(record.get(layout.id), default_id) if layout.id else default_id
            question = text_field(record.get(layout.question), "question")
            answer = text_field(record.get(layout.answer), "answer").strip()
            options = parse_options(record.get(layout.options)) if layout.options else []
            answers = (gold_option(answer, options),) if options else _answer_alternatives(answer)
            images = _image_items(record, layout, path.parent)
            for image in images:
                if (reason := _check_image_item(image)) is not None:
                    raise SkipRow(reason)
        except SkipRow as skip:
            skipped.append(_skip(label, name, index, skip.reason))
            continue
        rows.append(EvalRow(benchmark=name, index=index, id=label, question=question, answers=answers, options=options,
                            images=images))  # fmt: skip
    if count == 0:
        raise EvalDataError(f"{path}: the file has no rows")
    if columns is None:  # JSONL: the columns are what the objects had
        _check_columns(path, layout, seen)
    if not rows:
        counts: dict[str, int] = {}
        for r in skipped:
            counts[r.reason] = counts.get(r.reason, 0) + 1
        raise EvalDataError(f"{path}: no usable rows (skipped: {counts}); check the column flags or the data")
    return rows, skipped


def _check_columns(path: Path, layout: Layout, columns: set[str]) -> None:
    missing = [c for c in layout.required() if c not in columns]
    if missing:
        shown = ", ".join(sorted(columns)[:30]) or "none"
        raise EvalDataError(f"{path}: no column {missing[0]!r} (columns: {shown}); {_columns_hint(columns)}")


def shard_rows(rows: Sequence, rank: int, world: int) -> list:
    """This rank's share of `rows` (every world-th row from `rank`: balanced across benchmarks)."""
    return list(rows[rank::world])


# ------------------------------------------------------------------------------------ prompts
def problem_text(row: EvalRow) -> str:
    """The problem as the student template receives it: the question, and for a multiple-choice
    question its options as lettered lines and the instruction to answer with the letter."""
    if not row.is_multiple_choice:
        return row.question
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(row.options)]
    return f"{row.question.strip()}\n\nOptions:\n" + "\n".join(lines) + f"\n\n{MC_INSTRUCTION}"


def open_image(image):
    """A PIL image from a path or encoded bytes (ValueError naming the problem if undecodable)."""
    from megatron_rlsd.data.vision import load_image

    if isinstance(image, bytes):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(image)) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot decode embedded image: {e}") from None
    return load_image(image)


# ------------------------------------------------------------------------------------ scoring
_CHOICE_WRAPPER = re.compile(r"^(?:\\(?:text|textbf|mathrm|mathbf|boxed)\{(.*)\}|\*\*(.*)\*\*|\"(.*)\"|'(.*)')$", re.DOTALL)
_BARE_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\]]?$")
# "B." / "B:" / "(B) text" / "Option B" / "the answer is (B)": a capital letter with its own
# punctuation or an introducing word (a bare "A triangle" stays text)
_MARKED_LETTER = re.compile(
    r"^(?:(?i:(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?)\s*[:：]?\s*"
    r"[(\[]?([A-Z])[)\]]?(?=$|[\s.:：,)])"
    r"|[(\[]([A-Z])[)\]]"
    r"|([A-Z])\s*[.:：．)](?:\s|$))"
)


# only texts with a digit or a math sign can be equivalent without being equal (spares math-verify
# calls on word options)
_MATHY = re.compile(r"[\d\\^_=+\-*/]")


def _clean_choice(text: str) -> str:
    s = text.strip().replace("$", "").strip()
    for _ in range(4):
        m = _CHOICE_WRAPPER.match(s)
        if m is None:
            break
        s = next(g for g in m.groups() if g is not None).strip()
    return s.rstrip(".").strip()


def choose_option(extracted: str, options: Sequence[str]) -> str | None:
    """The option letter an extracted answer picks, or None when it names no single option.

    In order: a bare letter ("B", "(b)"); an option's exact text; a marked letter ("B. 12",
    "(B) 12", "Option B", "The answer is B"); an answer equivalent to exactly one option by the
    verifier (``0.5`` for ``1/2``; only texts with a digit or a math sign are compared so).
    Letters outside the options' range pick nothing."""
    valid = LETTERS[: len(options)]
    s = _clean_choice(extracted)
    if not s:
        return None
    if (m := _BARE_LETTER.match(s)) and m.group(1).upper() in valid:
        return m.group(1).upper()
    exact = [LETTERS[i] for i, o in enumerate(options) if _same_text(s, o)]
    if len(exact) == 1:
        return exact[0]
    m = _MARKED_LETTER.match(s)
    if m is not None:
        letter = next(g for g in m.groups() if g is not None)
        if letter in valid:
            return letter
    if not _MATHY.search(s):
        return None  # words: the exact comparison above was the verifier's word comparison
    equivalent = [LETTERS[i] for i, o in enumerate(options) if _MATHY.search(o) and check_answer(s, o)[0]]
    return equivalent[0] if len(equivalent) == 1 else None


def score_sample(row: EvalRow, response: str, reward_cfg: RewardConfig | None = None) -> tuple[bool, str | None, str | None, str]:
    """``(verdict, extracted answer, chosen letter, reason)`` of one response to `row`.

    Open questions: the verifier (any reference alternative may match). Multiple choice: the
    option the extracted answer picks (reason ``no_choice`` when it picks none)."""
    if row.is_multiple_choice:
        extracted = extract_answer(response)
        if extracted is None:
            return False, None, None, "no_answer"
        choice = choose_option(extracted, row.options)
        return choice == row.answers[0], extracted, choice, "ok" if choice else "no_choice"
    result = None
    for gold in row.answers:
        result = score_response(response, gold, reward_cfg)
        if result.correct:
            break
    return result.correct, result.extracted, None, result.reason


# ------------------------------------------------------------------------------------ running
@dataclass
class EvalSampling:
    """How evaluation samples. Greedy (temperature 0) gives one sample per question; `samples`
    > 1 needs a temperature > 0 (avg@k, pass@k)."""

    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    batch_size: int = 64  # questions per engine call (each with `samples` requests)
    seed: int = 0
    max_prompt_tokens: int | None = None  # longer prompts are skipped (prompt_too_long)

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("samples, batch size and max new tokens must be >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"{self.samples} samples per question at temperature 0 are all the same; set a temperature > 0")


def _seed(seed: int, row: EvalRow, sample: int) -> int:
    # ints only: hash() of strings differs between processes
    return hash((seed, zlib.crc32(row.benchmark.encode()), row.index, sample)) % (2**31)


def encode_row(row: EvalRow, templates, encoder, max_prompt_tokens: int | None = None):
    """`(prompt ids, PIL images)` of `row` as evaluation prompts it (student template, chat
    template, image placeholders expanded by the processor), or the reason it is skipped."""
    if row.images and getattr(encoder, "processor", None) is None:
        return "needs_vision_model"
    try:
        images = [open_image(i) for i in row.images]
    except ValueError:
        return "undecodable_image"
    prompt = PromptRow(id=row.id, problem=problem_text(row), answer=row.answers[0], images=images)
    ids, _ = encoder.encode(templates.student_messages(prompt), images)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        return "prompt_too_long"
    return ids, images


def evaluate_rows(engine, rows: Sequence[EvalRow], templates, encoder, sampling: EvalSampling, *,
                  reward_cfg: RewardConfig | None = None, progress: bool = False) -> tuple[list[EvalRecord], dict]:  # fmt: skip
    """Generate `sampling.samples` responses per row with `engine` (awake, holding the weights
    to evaluate) and score them. Local to this process: for several ranks give each its
    :func:`shard_rows` share, then :func:`gather_records` and :func:`summarize`.

    `templates`: data.templates.PromptTemplates (the student template is used); `encoder`:
    data.vision.PromptEncoder of the engine's model. `progress`: a bar on stderr. Returns the
    records (one per sample, one per skipped row) and their :func:`summarize`."""
    from tqdm import tqdm

    tokenizer = encoder.tokenizer
    stop = [t for t in (tokenizer.eos_token_id,) if t is not None]
    k = sampling.samples
    records: list[EvalRecord] = []
    bar = tqdm(total=len(rows), unit="question", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for start in range(0, len(rows), sampling.batch_size):
        batch = rows[start : start + sampling.batch_size]
        runnable, prompts, images, seeds = [], [], [], []
        for row in batch:
            encoded = encode_row(row, templates, encoder, sampling.max_prompt_tokens)
            if isinstance(encoded, str):
                records.append(_skip(row, row.benchmark, row.index, encoded, " | ".join(row.answers)))
                continue
            runnable.append(row)
            for j in range(k):
                prompts.append(encoded[0])
                images.append(encoded[1])
                seeds.append(_seed(sampling.seed, row, j))
        gens = engine.generate(prompts, seeds, temperature=sampling.temperature, top_p=sampling.top_p,
                               max_new_tokens=sampling.max_new_tokens, stop_token_ids=stop,
                               images=images if any(images) else None)  # fmt: skip
        for i, gen in enumerate(gens):
            row, j = runnable[i // k], i % k
            text = tokenizer.decode(gen.response_ids, skip_special_tokens=True)
            verdict, extracted, choice, reason = score_sample(row, text, reward_cfg)
            records.append(EvalRecord(
                benchmark=row.benchmark, prompt_id=row.id, index=row.index, sample=j, answer=" | ".join(row.answers),
                response=text, extracted=extracted, choice=choice, verdict=verdict, reason=reason,
                finish_reason=gen.finish_reason, response_tokens=len(gen.response_ids),
            ))  # fmt: skip
        bar.update(len(batch))
    bar.close()
    return records, summarize(records)


def gather_records(records: list[EvalRecord], dst: int = 0) -> list[EvalRecord]:
    """Collective: every rank's records, on rank `dst` in (benchmark, row, sample) order; [] on
    the other ranks. Without torch.distributed (or a world of one), the records sorted. Call it
    before VLLMEngine.close(), which ends torch.distributed."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size() if dist.get_rank() == dst else None
        dist.gather_object([asdict(r) for r in records], parts, dst=dst)
        if dist.get_rank() != dst:
            return []
        records = [EvalRecord(**r) for part in parts for r in part]
    order = {}
    for r in records:
        order.setdefault(r.benchmark, len(order))
    return sorted(records, key=lambda r: (order[r.benchmark], r.index, r.sample))


# ------------------------------------------------------------------------------------ summary
def summarize(records: Sequence[EvalRecord]) -> dict:
    """Per benchmark (in first-seen order): questions scored `n`, samples per question,
    `accuracy` (the mean verdict over all samples, = avg@k), `avg@k`, `pass@k` (share of
    questions with at least one correct sample), skipped questions per reason; and
    `mean_accuracy`, the unweighted mean over benchmarks with a score."""
    per: dict[str, dict] = {}
    for r in records:
        b = per.setdefault(r.benchmark, {"verdicts": {}, "skipped": {}})
        if r.verdict is None:
            b["skipped"][r.reason] = b["skipped"].get(r.reason, 0) + 1
        else:
            b["verdicts"].setdefault(r.index, []).append(bool(r.verdict))
    out = {}
    for name, b in per.items():
        groups = list(b["verdicts"].values())
        k = max((len(g) for g in groups), default=1)
        flat = [v for g in groups for v in g]
        acc = sum(flat) / len(flat) if flat else None
        out[name] = {
            "n": len(groups), "samples": k, "accuracy": acc, f"avg@{k}": acc,
            f"pass@{k}": sum(any(g) for g in groups) / len(groups) if groups else None,
            "skipped": dict(sorted(b["skipped"].items())), "skipped_total": sum(b["skipped"].values()),
        }  # fmt: skip
    scored = [s["accuracy"] for s in out.values() if s["accuracy"] is not None]
    return {"benchmarks": out, "mean_accuracy": sum(scored) / len(scored) if scored else None}


def summary_metrics(summary: dict, prefix: str = "eval/") -> dict[str, float]:
    """Flat metrics for metrics.jsonl / TensorBoard: `eval/<benchmark>/accuracy`, `.../pass@k`,
    `.../n`, `.../skipped` and `eval/mean_accuracy` (benchmarks without a score left out)."""
    m = {}
    for name, s in summary["benchmarks"].items():
        if s["accuracy"] is None:
            continue
        k = s["samples"]
        m |= {f"{prefix}{name}/accuracy": s["accuracy"], f"{prefix}{name}/pass@{k}": s[f"pass@{k}"],
              f"{prefix}{name}/n": float(s["n"]), f"{prefix}{name}/skipped": float(s["skipped_total"])}  # fmt: skip
    if summary["mean_accuracy"] is not None:
        m[f"{prefix}mean_accuracy"] = summary["mean_accuracy"]
    return m


def format_table(summary: dict) -> str:
    """The summary as a fixed-width text table, one line per benchmark and the mean."""

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    benches = summary["benchmarks"]
    k = max((s["samples"] for s in benches.values()), default=1)
    width = max([len("benchmark"), len("mean")] + [len(n) for n in benches])
    head = f"{'benchmark':<{width}}  {'n':>6}  {'skipped':>7}  {'accuracy':>8}  {f'avg@{k}':>8}  {f'pass@{k}':>8}"
    lines = [head, "-" * len(head)]
    for name, s in benches.items():
        kk = s["samples"]
        lines.append(f"{name:<{width}}  {s['n']:>6}  {s['skipped_total']:>7}  {pct(s['accuracy']):>8}  "
                     f"{pct(s[f'avg@{kk}']):>8}  {pct(s[f'pass@{kk}']):>8}")  # fmt: skip
    lines.append(f"{'mean':<{width}}  {'':>6}  {'':>7}  {pct(summary['mean_accuracy']):>8}")
    return "\n".join(lines)


def layout_with(layout: Layout, **columns) -> Layout:
    """`layout` with the given columns replaced (None keeps the layout's; "" means none). A
    column named here must exist in the file."""
    changes = {k: v for k, v in columns.items() if v is not None}
    if "images" in changes:
        changes["images"] = tuple(c for c in changes["images"] if c)
    return replace(layout, optional=layout.optional - changes.keys(), **changes)
