"""Convert MMFineReason (as published on the Hugging Face hub) into this project's training format.

    python tools/prepare_mmfinereason.py --input MMFR_DIR --out DATA_DIR

MMFR_DIR is either a local copy of the published parquet shards (e.g. the `data/` folder of
OpenDataArena/MMFineReason-SFT-123K-Qwen3-VL-235B-Thinking, `train-000NN-of-00018.parquet`; the
*.parquet files below MMFR_DIR are read in sorted path order, only --split's when their names or
folders show the split) or a `datasets` dataset written by
`save_to_disk` (a Dataset folder with state.json + dataset_info.json, or a DatasetDict folder with
dataset_dict.json; --split picks the split).  Images are embedded in the rows as HF `datasets`
Image structs {"bytes": ..., "path": ...}; a list of them (several images per row) also works.

Published schema of MMFineReason-SFT-123K (the set RLSD trains on; the 586K release reads the same):
  question                        the problem text, with an "<image>" placeholder
  answer                          the short reference answer (RLSD's privileged context r)
  image                           Image struct {"bytes", "path"}, one per row
  id, source                      int64 id and the name of the source dataset it came from
  pass_rate                       Qwen3-VL-4B-Thinking pass rate; 0.0 marks the "hard" rows (all
                                  rows of the 123K release have 0.0)
  qwen3vl_235b_thinking_response  the verified reasoning trace of Qwen3-VL-235B-A22B-Thinking:
                                  written as the row's `solution` (OPSD's privileged context as
                                  the RLSD paper ran it; --solution-column, '' to leave it out)
  original_answer, ori_question, caption, is_consistent,
  consistency_analysis            not used here
Every column name is a flag, so other releases (some configs of older ones name the answer
`solution`) and renamed copies work too.

DATA_DIR gets
  train.jsonl   {"id", "problem", "answer", "images": ["images/<sha256>.png", ...][, "solution"]} per
                row ("solution" where the row has a non-blank one; rows_without_solution counts
                the others)
                (paths relative to DATA_DIR; megatron_rlsd.data.load_prompt_rows resolves them)
  images/       each distinct image once, named by the SHA-256 of its source bytes, so an image
                shared by several rows is stored once
  stats.json    rows read / written / filtered, skips per reason, image counts, the settings

Rows are skipped and counted per reason, never silently dropped:
  missing_problem    problem null, absent or blank      bad_problem   problem not a string
  missing_answer     answer null or absent              empty_answer  answer a blank string
  bad_answer         answer not a string or finite number
  missing_image      the problem shows an image placeholder but the row has no image, or an
                     image struct has neither bytes nor a readable file path
  undecodable_image  PIL cannot decode the image bytes (broken, truncated, or over PIL's
                     decompression-bomb pixel limit)
The first few skips of each reason are printed with the row id, and a final line gives rows
written and skipped per reason.  A run that writes no rows exits 1 and leaves no output.
The image placeholder ("<image>", --image-placeholder) is removed from the problem text: our
prompt templates put the images as their own content parts ahead of the text.

--filter COLUMN=VALUE keeps only matching rows (repeatable, all must match; numbers compare
numerically: --filter pass_rate=0 keeps the rows no Qwen3-VL-4B-Thinking rollout solved, the
123K subset's definition, from a larger release that has the column).

Everything is written into a scratch folder next to DATA_DIR and moved into place at the end,
so a crash never leaves a half-written train.jsonl in DATA_DIR.  A non-empty DATA_DIR is never
replaced without --overwrite (and then only if it holds a previous output of this tool).
"""

import argparse
import concurrent.futures
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import _bootstrap  # noqa: F401

from megatron_rlsd.data.dataset import SkipRow, image_sources, row_id, text_field

TOOL = "prepare_mmfinereason"
MARKER = ".prepare_mmfinereason"  # marks our scratch folder
REPORT_FIRST = 5  # skipped rows printed per reason
BATCH_ROWS = 256  # rows read (and images decoded) per batch


class UsageError(Exception):
    """A problem with the input or flags: one clear line, exit code 2."""


# ----------------------------------------------------------------------------------- reading
def detect_format(path: Path) -> str:
    """``parquet`` (a shard folder or one file), ``dataset`` or ``dataset_dict`` (save_to_disk)."""
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise UsageError(f"{path}: not a .parquet file; pass a folder of parquet shards or a save_to_disk folder")
        return "parquet"
    if not path.is_dir():
        raise UsageError(f"input not found: {path}")
    if (path / "dataset_dict.json").is_file():
        return "dataset_dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return "parquet"


def parquet_files(path: Path, split: str) -> list[Path]:
    """One file, or the *.parquet files below a folder; only ``split``'s if the hub names show splits
    (``train-00000-of-00018.parquet``, or a ``train/`` folder as in refs/convert/parquet)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise UsageError(
            f"{path}: no *.parquet files and no save_to_disk dataset (state.json + dataset_info.json) found"
        )
    in_split = [f for f in files if f.name.startswith((f"{split}-", f"{split}.")) or f.parent.name == split]
    return in_split or files


def saved_dataset_dir(path: Path, fmt: str, split: str) -> Path:
    if fmt == "dataset":
        return path
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    if split not in splits:
        raise UsageError(f"{path}: split {split!r} not in the saved DatasetDict (splits: {splits}); use --split")
    return path / split


def arrow_files(dataset_dir: Path) -> list[Path]:
    state = json.loads((dataset_dir / "state.json").read_text())
    files = [dataset_dir / f["filename"] for f in state.get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise UsageError(f"{dataset_dir}: state.json lists no data files or missing ones {missing}")
    return files


class Source:
    """The input: its format, files and column names, and its rows in batches of dicts."""

    def __init__(self, path: Path, split: str, reader: str):
        self.path = path
        self.format = detect_format(path)
        self.reader = reader
        if self.format == "parquet":
            import pyarrow.parquet as pq

            self.files = parquet_files(path, split)
            self.columns = list(pq.ParquetFile(self.files[0]).schema_arrow.names)
        else:
            self.dataset_dir = saved_dataset_dir(path, self.format, split)
            self.files = arrow_files(self.dataset_dir)
            info = json.loads((self.dataset_dir / "dataset_info.json").read_text())
            self.columns = list(info.get("features", {}))
            if reader != "arrow":
                try:
                    import datasets  # noqa: F401

                    self.reader = "datasets"
                except ImportError:
                    if reader == "datasets":
                        raise UsageError("--reader datasets needs the `datasets` package (pip install datasets)")
                    self.reader = "arrow"

    def describe(self) -> str:
        if self.format == "parquet":
            return f"{len(self.files)} parquet file(s)"
        return f"save_to_disk dataset ({len(self.files)} arrow file(s), read with {self.reader})"

    def batches(self, columns: list[str]) -> Iterator[tuple[str, int, list[dict]]]:
        """Yields (file label, index of the batch's first row in that file, rows as dicts)."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            for f in self.files:
                pf = pq.ParquetFile(f)
                missing = [c for c in columns if c not in pf.schema_arrow.names]
                if missing:
                    raise UsageError(f"{f}: column(s) {missing} not found (columns: {pf.schema_arrow.names})")
                start = 0
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    rows = batch.to_pylist()
                    yield f.name, start, rows
                    start += len(rows)
        elif self.reader == "datasets":
            import datasets

            ds = datasets.load_from_disk(str(self.dataset_dir)).select_columns(columns)
            start = 0
            for table in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):  # raw {"bytes", "path"} structs
                rows = table.to_pylist()
                yield self.dataset_dir.name, start, rows
                start += len(rows)
        else:  # the arrow IPC stream files save_to_disk writes, read without `datasets`
            import pyarrow as pa

            start = 0
            for f in self.files:
                with pa.memory_map(str(f)) as source:
                    for batch in pa.ipc.open_stream(source):
                        batch = batch.select(columns)
                        for offset in range(0, batch.num_rows, BATCH_ROWS):
                            rows = batch.slice(offset, BATCH_ROWS).to_pylist()
                            yield self.dataset_dir.name, start, rows
                            start += len(rows)


# ----------------------------------------------------------------------------------- rows
def parse_filter(text: str) -> tuple[str, str]:
    column, sep, value = text.partition("=")
    if not sep or not column:
        raise argparse.ArgumentTypeError(f"--filter expects COLUMN=VALUE, got {text!r}")
    return column, value


def matches(cell, want: str) -> bool:
    """Does a cell equal the --filter VALUE?  Numbers compare numerically, bools as true/false."""
    if cell is None:
        return want.strip().lower() in ("", "none", "null")
    if isinstance(cell, bool):
        return want.strip().lower() in (("true", "1") if cell else ("false", "0"))
    if isinstance(cell, (int, float)):
        try:
            return float(cell) == float(want)
        except ValueError:
            return False
    return str(cell) == want


def image_items(value, base: Path) -> list[bytes]:
    """The source bytes of each image in an image cell (struct, list of structs, bytes or path)."""
    out = []
    for data, path in image_sources(value, invalid="missing_image"):
        if data is None and path:  # a path-only struct: an image file next to the data
            file = Path(path) if os.path.isabs(path) else base / path
            data = file.read_bytes() if file.is_file() else None
        if not data:
            raise SkipRow("missing_image")
        out.append(data)
    return out


def row_id_of(record: dict, id_column: str, prefix_column: str, label: str, index: int) -> str:
    """``SOURCE:ID``, ``ID``, or ``<file stem>:<row index>`` when the row has no id."""
    rid = row_id(record.get(id_column) if id_column else None, f"{Path(label).stem}:{index}")
    if prefix_column and record.get(prefix_column) not in (None, ""):
        rid = f"{record[prefix_column]}:{rid}"
    return rid


def parse_fields(record: dict, args: argparse.Namespace, base: Path, stats: Counter) -> tuple[str, str, list[bytes], str]:
    """(problem, answer, image bytes, solution or "") of one record; raises SkipRow."""
    problem = text_field(record.get(args.problem_column), "problem", numbers=False)
    answer = text_field(record.get(args.answer_column), "answer", blank="empty_answer").strip()
    blobs = image_items(record.get(args.image_column), base) if args.image_column else []
    if args.image_placeholder:
        placeholders = problem.count(args.image_placeholder)
        if placeholders and not blobs:
            raise SkipRow("missing_image")
        stats["placeholder_mismatch"] += placeholders != len(blobs)
        problem = problem.replace(args.image_placeholder, "").strip()
        if not problem:
            raise SkipRow("missing_problem")
    solution = record.get(args.solution_column) if args.solution_column else None
    solution = solution.strip() if isinstance(solution, str) else ""
    return problem, answer, blobs, solution


def convert_image(digest: str, data: bytes, *, folder: Path, keep_format: bool) -> str | None:
    """Decode ``data`` fully and write it to ``folder``, named by ``digest``; the file name, or None."""
    from PIL import Image

    dest = folder / digest[:32]
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes every pixel: truncated / corrupt data fails here
            fmt = (img.format or "").upper()
            if keep_format and fmt:
                ext = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
                name = f"{dest.name}.{ext}"
                (dest.parent / name).write_bytes(data)
                return name
            name = f"{dest.name}.png"
            if fmt == "PNG":  # already PNG and decodable: keep the exact bytes
                (dest.parent / name).write_bytes(data)
                return name
            if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
                img = img.convert("RGBA" if "A" in img.mode else "RGB")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, DecompressionBomb...)
        return None
    (dest.parent / name).write_bytes(buf.getvalue())
    return name


# ----------------------------------------------------------------------------------- output
def check_output(out: Path, inp: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    o, i = out.resolve(), inp.resolve()
    if o == i or o in i.parents or i in o.parents:
        raise UsageError(f"--out {out} must not contain or be inside --input {inp}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out} is not empty; pass --overwrite to replace it")
        stats = out / "stats.json"
        try:
            ours = json.loads(stats.read_text()).get("tool") == TOOL
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UsageError(
                f"--out {out} is not empty and is not an output of {TOOL} (no stats.json from it); "
                "refusing to replace it even with --overwrite: choose another --out or empty it"
            )


def scratch_dir(out: Path) -> Path:
    scratch = out.parent / f".{out.name}.partial"
    if scratch.exists():
        if not (scratch / MARKER).is_file():
            raise UsageError(f"{scratch} exists and was not made by {TOOL}; remove it or choose another --out")
        shutil.rmtree(scratch)  # left over from a crashed run
    (scratch / "images").mkdir(parents=True)
    (scratch / MARKER).write_text("scratch folder of tools/prepare_mmfinereason.py; safe to delete\n")
    return scratch


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(scratch: Path, out: Path) -> None:
    """Move the finished scratch folder to ``out`` (replacing an old output, or an empty folder)."""
    (scratch / MARKER).unlink()
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        else:
            out.rmdir()
    os.rename(scratch, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--input",
        required=True,
        type=Path,
        help="folder of the published parquet shards (or one .parquet file), or a save_to_disk folder",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty, or see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out written by this tool")
    p.add_argument(
        "--split",
        default="train",
        help="split of a saved DatasetDict, or of parquet shards named <split>-*.parquet (default: train)",
    )
    p.add_argument("--problem-column", default="question", help="problem text column (default: question)")
    p.add_argument("--answer-column", default="answer", help="reference answer column (default: answer)")
    p.add_argument(
        "--solution-column",
        default="qwen3vl_235b_thinking_response",
        help="reference solution (reasoning trace) column, written as `solution` (default: "
        "qwen3vl_235b_thinking_response; '' or a missing column: none)",
    )
    p.add_argument(
        "--image-column",
        default="image",
        help="image column: Image struct or list of them (default: image; '' for text-only data)",
    )
    p.add_argument(
        "--id-column", default="id", help="row id column (default: id; '' or a missing column: <file>:<row index>)"
    )
    p.add_argument(
        "--id-prefix-column",
        default="source",
        help="column prefixed to the id as PREFIX:ID, to keep the ids of rows merged from many source datasets "
        "apart (default: source; '' for none; ignored when the column does not exist)",
    )
    p.add_argument(
        "--image-placeholder",
        default="<image>",
        help="text removed from the problem (default: <image>; '' keeps the text as is)",
    )
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        type=parse_filter,
        metavar="COLUMN=VALUE",
        help="keep only rows whose COLUMN equals VALUE (repeatable; e.g. pass_rate=0)",
    )
    p.add_argument("--max-rows", type=int, default=None, help="stop after writing this many rows")
    p.add_argument(
        "--keep-image-format",
        action="store_true",
        help="store images in their source encoding (.jpg, .png, ...) instead of re-encoding to PNG",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="threads decoding / encoding images (default: min(8, CPUs))",
    )
    p.add_argument("--progress-every", type=int, default=10000, help="progress line every N rows read (0: none)")
    p.add_argument(
        "--reader",
        choices=["auto", "datasets", "arrow"],
        default="auto",
        help="how to read a save_to_disk folder: datasets.load_from_disk, or its arrow files "
        "directly with pyarrow (auto: datasets if installed)",
    )
    return p


class Converter:
    """Rows in, train.jsonl lines and image files (in the scratch folder) out, with the counters."""

    def __init__(self, args: argparse.Namespace, source: Source, scratch: Path, pool, jsonl):
        self.args, self.pool, self.jsonl = args, pool, jsonl
        self.id_column = args.id_column if args.id_column in source.columns else ""
        self.prefix_column = args.id_prefix_column if args.id_prefix_column in source.columns else ""
        self.base = args.input if args.input.is_dir() else args.input.parent
        self.convert = functools.partial(convert_image, folder=scratch / "images", keep_format=args.keep_image_format)
        self.stats: Counter = Counter()
        self.skipped: Counter = Counter()
        self.image_names: dict[str, str | None] = {}  # sha256 -> file name, or None if undecodable
        self.referenced: set[str] = set()  # image file names used by written rows
        self.seen_ids: set[str] = set()

    def columns(self) -> list[str]:
        a = self.args
        wanted = (a.problem_column, a.answer_column, a.image_column, a.solution_column, self.id_column, self.prefix_column)
        return list(dict.fromkeys(c for c in (*wanted, *(c for c, _ in a.filter)) if c))

    def done(self) -> bool:
        return self.args.max_rows is not None and self.stats["rows_written"] >= self.args.max_rows

    def skip(self, reason: str, row_id: str, label: str, index: int) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= REPORT_FIRST:
            print(f"{TOOL}: skip {row_id} ({label} row {index}): {reason}", file=sys.stderr)

    def add_batch(self, label: str, first: int, batch: list[dict]) -> None:
        pos = 0
        while pos < len(batch) and not self.done():
            # At most as many rows as --max-rows still needs; some may be skipped later (a broken
            # image), and the loop then goes on in this batch.
            want = len(batch) if self.args.max_rows is None else self.args.max_rows - self.stats["rows_written"]
            parsed = []
            while pos < len(batch) and len(parsed) < want:
                if (row := self.parse(label, first + pos, batch[pos])) is not None:
                    parsed.append(row)
                pos += 1
            self.decode_images(parsed)
            for row in parsed:
                self.write(*row)

    def parse(self, label: str, index: int, record: dict):
        """(row id, problem, answer, solution, image digests, index, image bytes), or None if filtered /
        skipped."""
        self.stats["rows_read"] += 1
        row_id = row_id_of(record, self.id_column, self.prefix_column, label, index)
        if not all(matches(record.get(c), v) for c, v in self.args.filter):
            self.stats["filtered_out"] += 1
            return None
        try:
            problem, answer, blobs, solution = parse_fields(record, self.args, self.base, self.stats)
        except SkipRow as skip:
            self.skip(skip.reason, row_id, label, index)
            return None
        digests = [hashlib.sha256(data).hexdigest() for data in blobs]
        return row_id, problem, answer, solution, digests, (label, index), blobs

    def decode_images(self, parsed: list) -> None:
        """Decode and write the images not seen before, in parallel, each distinct one once."""
        new: dict[str, bytes] = {}
        for *_, digests, _where, blobs in parsed:
            for digest, data in zip(digests, blobs):
                if digest not in self.image_names:
                    new.setdefault(digest, data)
        names = self.pool.map(self.convert, list(new), list(new.values()))
        self.image_names.update(zip(new, names))
        self.stats["images_decoded"] += sum(self.image_names[d] is not None for d in new)

    def write(self, row_id: str, problem: str, answer: str, solution: str, digests: list[str], where, _blobs) -> None:
        if any(self.image_names[d] is None for d in digests):
            self.skip("undecodable_image", row_id, *where)
            return
        if row_id in self.seen_ids:  # keep ids unique: the second "x" becomes "x#2"
            self.stats["duplicate_ids_renamed"] += 1
            n = 2
            while f"{row_id}#{n}" in self.seen_ids:
                n += 1
            row_id = f"{row_id}#{n}"
        self.seen_ids.add(row_id)
        names = [self.image_names[d] for d in digests]
        self.referenced.update(names)
        self.stats["image_refs"] += len(names)
        self.stats["rows_without_images"] += not names
        line = {"id": row_id, "problem": problem, "answer": answer, "images": [f"images/{n}" for n in names]}
        if solution:
            line["solution"] = solution
        self.stats["rows_without_solution"] += not solution
        self.jsonl.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.stats["rows_written"] += 1

    def progress(self, elapsed: float) -> str:
        s = self.stats
        return (
            f"read {s['rows_read']} rows, wrote {s['rows_written']}, skipped {sum(self.skipped.values())}, "
            f"{s['images_decoded']} images ({s['rows_read'] / max(elapsed, 1e-9):.0f} rows/s)"
        )


def run(args: argparse.Namespace) -> int:
    if args.max_rows is not None and args.max_rows <= 0:
        raise UsageError(f"--max-rows must be positive, got {args.max_rows}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    args.out = Path(os.path.abspath(args.out))  # "." or "x/" name a folder with a parent
    source = Source(args.input, args.split, args.reader)
    check_output(args.out, args.input, args.overwrite)
    needed = {"--problem-column": args.problem_column, "--answer-column": args.answer_column}
    if args.image_column:
        needed["--image-column"] = args.image_column
    needed.update((f"--filter {column}", column) for column, _ in args.filter)
    missing = [f"{flag} {col!r}" for flag, col in needed.items() if col not in source.columns]
    if missing:
        raise UsageError(f"{args.input}: column(s) not found: {', '.join(missing)}; columns are {source.columns}")
    if args.solution_column and args.solution_column not in source.columns:
        print(f"{TOOL}: no column {args.solution_column!r}: rows get no reference solution", file=sys.stderr)
        args.solution_column = ""

    print(f"{TOOL}: reading {args.input}: {source.describe()}", file=sys.stderr, flush=True)
    start = time.monotonic()
    scratch = scratch_dir(args.out)
    jsonl_tmp = scratch / "train.jsonl.tmp"
    try:
        with (
            open(jsonl_tmp, "w", encoding="utf-8") as jsonl,
            concurrent.futures.ThreadPoolExecutor(args.workers) as pool,
        ):
            conv = Converter(args, source, scratch, pool, jsonl)
            next_progress = args.progress_every
            for label, first, batch in source.batches(conv.columns()):
                conv.add_batch(label, first, batch)
                if args.progress_every and conv.stats["rows_read"] >= next_progress:
                    print(f"{TOOL}: {conv.progress(time.monotonic() - start)}", file=sys.stderr, flush=True)
                    next_progress = (conv.stats["rows_read"] // args.progress_every + 1) * args.progress_every
                if conv.done():
                    break
            jsonl.flush()
            os.fsync(jsonl.fileno())
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise

    stats, skipped = conv.stats, conv.skipped
    summary = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items())) or "none"
    if not stats["rows_written"]:
        shutil.rmtree(scratch, ignore_errors=True)
        print(
            f"{TOOL}: error: no rows written from {stats['rows_read']} read (skipped: {summary}; filtered out: "
            f"{stats['filtered_out']}); check --problem-column/--answer-column/--image-column and --filter "
            f"against the columns {source.columns}",
            file=sys.stderr,
        )
        return 1

    # Images decoded for rows that were then skipped (another image of the row was broken) go, so
    # images/ holds exactly what train.jsonl references.
    for f in (scratch / "images").iterdir():
        if f.name not in conv.referenced:
            f.unlink()
    os.replace(jsonl_tmp, scratch / "train.jsonl")
    record = {
        "tool": TOOL,
        "input": str(args.input),
        "input_format": source.format,
        "files": [str(f) for f in source.files],
        "columns": {
            "problem": args.problem_column,
            "answer": args.answer_column,
            "images": args.image_column,
            "id": conv.id_column,
            "id_prefix": conv.prefix_column,
        },
        "filters": [f"{c}={v}" for c, v in args.filter],
        "max_rows": args.max_rows,
        **{k: stats[k] for k in ("rows_read", "rows_written", "filtered_out")},
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "images_written": len(conv.referenced),
        **{k: stats[k] for k in ("image_refs", "rows_without_images", "rows_without_solution", "placeholder_mismatch", "duplicate_ids_renamed")},
        "seconds": round(time.monotonic() - start, 3),
    }
    write_atomic(scratch / "stats.json", json.dumps(record, indent=2) + "\n")
    publish(scratch, args.out)
    print(
        f"{TOOL}: wrote {stats['rows_written']} rows ({len(conv.referenced)} images, {stats['image_refs']} image "
        f"refs) to {args.out / 'train.jsonl'}; skipped {sum(skipped.values())} ({summary}); "
        f"filtered out {stats['filtered_out']}"
    )
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
