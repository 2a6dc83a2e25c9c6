"""Evaluate a model on benchmark files: accuracy (greedy) or avg@k / pass@k (k samples).

    python tools/evaluate.py --model MODEL --data FILE [--data FILE ...] --out DIR [options]
    torchrun --nproc-per-node N tools/evaluate.py ...        (data parallel, see below)

MODEL is a Hugging Face folder (config.json + *.safetensors) or one of our checkpoints (a
checkpoint root, whose `latest` step is used, a training run's output directory, or a step
directory); a checkpoint is first exported to a temporary HF folder inside DIR (streaming,
megatron_rlsd.checkpoint.convert) and removed at the end.

FILE is a JSONL or parquet benchmark file, optionally named: NAME=FILE (default name: the file's
stem), or a quoted glob pattern whose files form one named benchmark (MMMU's subjects:
--data 'mmmu=MMMU/*/validation-*.parquet'). Column layouts: --preset (default: our {id,
problem, answer[, options][, images]} files; mmmu, mathvista, mathvision, zerobench, wemath:
their published columns, listed in docs/evaluation.md) and the column flags, which override the
preset's names. One --preset applies to every --data; or give one per --data, in order.

Generation runs in vLLM (megatron_rlsd.rollout.vllm_engine.VLLMEngine, the trainer's rollout
engine) on the student prompt template, greedy by default; --samples K with --temperature > 0
samples K responses per question. Scoring is the project's verifier; multiple-choice answers are
read as an option letter or an option's text.

DIR gets
  samples.jsonl   one record per sample (and per skipped question): benchmark, prompt_id, index,
                  sample, answer, response, extracted, choice, verdict, reason, finish_reason,
                  response_tokens (megatron_rlsd.evaluation.EvalRecord)
  summary.json    per benchmark: n, samples, accuracy, avg@k, pass@k, skipped per reason,
                  skipped_total; mean_accuracy; the settings
  vllm.log        vLLM's own log
and the table is printed. A progress bar goes to stderr (rank 0's share under torchrun).

Several processes: under torchrun every process hosts one engine with the whole model and
evaluates every world-size-th question; rank 0 gathers the records and writes the outputs.
Tensor parallelism inside one engine is not available (the rollout engine runs one model copy
per process), so the model must fit one device. Several nodes need DIR on a shared filesystem
when MODEL is a checkpoint (rank 0 exports it there for everyone).

Bad input (no such file, a missing column, an empty file, a model folder that is neither kind,
bad flags) stops with one `evaluate: error:` line and exit code 2; unusable rows are skipped and
counted per reason in the summary.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401

from megatron_rlsd.evaluation import PRESETS, EvalDataError, EvalSampling, format_table, layout_with, load_benchmark

# what torchrun and torch.elastic put in the environment: an export subprocess must not join them
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


class UsageError(Exception):
    """Bad input: reported as one `evaluate: error:` line, exit code 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, checkpoint root, or checkpoint step directory")
    p.add_argument("--data", action="append", required=True, metavar="[NAME=]FILE", help="benchmark file (repeatable)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--preset", action="append", choices=list(PRESETS), help="column layout (once, or once per --data)")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="responses per question (K > 1 needs --temperature > 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-prompt-tokens", type=int, default=4096,
                   help="longer prompts (chat template and image tokens included) are skipped")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="questions per engine call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per question and sample)")
    p.add_argument("--student-template", help="prompt template file with {problem} (default: the built-in student template)")
    p.add_argument("--id-column")
    p.add_argument("--question-column")
    p.add_argument("--options-column", help='multiple-choice options ("" : none)')
    p.add_argument("--answer-column")
    p.add_argument("--image-column", action="append", help="image column (repeatable, in order)")
    p.add_argument("--kv-cache-mb", type=int, default=1024, help="CPU: vLLM KV cache per process")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="GPU: share of device memory vLLM may use")
    return p.parse_args(argv)


def data_specs(args) -> list[tuple[str, list[Path], str]]:
    """(benchmark name, files, preset) per --data. A glob pattern is one benchmark of all the
    files it matches (in sorted order) and must be named."""
    presets = args.preset or ["default"]
    if len(presets) not in (1, len(args.data)):
        raise UsageError(f"--preset given {len(presets)} times for {len(args.data)} --data files; give it once or once per --data")
    specs = []
    for i, item in enumerate(args.data):
        name, sep, pattern = item.partition("=")
        if not sep or Path(item).exists():
            name, pattern = "", item
        files = [Path(pattern)]
        if not files[0].exists() and glob.has_magic(pattern):
            files = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            if not files:
                raise UsageError(f"--data {item}: the pattern matches no file")
            if not name:
                raise UsageError(f"--data {item}: name a benchmark given as a pattern: --data NAME={pattern}")
        specs.append((name or files[0].stem, files, presets[i if len(presets) > 1 else 0]))
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"two --data files are both named {max(names, key=names.count)!r}; name them: --data NAME=FILE")
    return specs


def load_data(args, specs):
    """All benchmarks' rows (concatenated) and skipped records."""
    rows, skipped = [], []
    for name, files, preset in specs:
        layout = layout_with(PRESETS[preset], id=args.id_column, question=args.question_column, options=args.options_column,
                             answer=args.answer_column, images=args.image_column)  # fmt: skip
        count = 0
        for path in files:
            try:
                r, s = load_benchmark(path, layout, name, first_index=count)
            except EvalDataError as e:
                raise UsageError(str(e)) from None
            rows += r
            skipped += s
            count += len(r) + len(s)
    return rows, skipped


def model_kind(path: Path) -> str:
    """"hf" or "checkpoint" (a training run's output directory counts as its checkpoint root);
    UsageError for anything else."""
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if (path / "latest").is_file() or (path / "metadata.json").is_file() or (path / "checkpoints" / "latest").is_file():
        return "checkpoint"
    raise UsageError(
        f"--model {path}: neither a Hugging Face folder (config.json + *.safetensors) nor a checkpoint (a root with "
        f"'latest' or a step directory with metadata.json)"
    )


def export_checkpoint(ckpt: Path, out_dir: Path) -> Path:
    """Rank 0: the checkpoint as a temporary HF folder under `out_dir`, exported by
    tools/convert_megatron_to_hf.py in a process of its own (its own one-process group: the
    export's checkpoint reads are collectives, which the other ranks do not join)."""
    tmp = Path(tempfile.mkdtemp(prefix=".hf-export-", dir=out_dir))
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    converter = Path(__file__).with_name("convert_megatron_to_hf.py")
    cmd = [sys.executable, str(converter), "--ckpt", str(ckpt), "--out", str(tmp / "hf")]
    if subprocess.run(cmd, env=env).returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"--model {ckpt}: exporting the checkpoint to HF failed (see the converter's error above)")
    return tmp


def hf_buckets(hf_dir: Path, bucket_bytes: int = 256 << 20):
    """The folder's tensors as (HF name, tensor) lists of about `bucket_bytes`, read memory-mapped
    one bucket at a time. Tied embeddings: the embedding goes out as lm_head.weight too (vLLM keeps
    its own copy of the head)."""
    from megatron_rlsd.checkpoint.safetensors_io import HFWeights

    weights = HFWeights(hf_dir)
    names = sorted(weights.names())
    if "lm_head.weight" not in names:
        embeddings = [n for n in names if n.endswith("embed_tokens.weight")]
        if len(embeddings) == 1:
            names.append(embeddings[0] + "\0lm_head.weight")
    bucket, size = [], 0
    for name in names:
        source, _, target = name.partition("\0")
        tensor = weights.get(source)
        bucket.append((target or source, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def max_positions(config: dict) -> int | None:
    return config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")


def run(args) -> int:
    import torch.distributed as dist

    try:
        sampling = EvalSampling(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                                max_prompt_tokens=args.max_prompt_tokens)  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    specs = data_specs(args)
    model = Path(args.model)
    if not model.exists():
        raise UsageError(f"--model {model}: no such folder")
    kind = model_kind(model)
    if kind == "checkpoint" and (model / "checkpoints" / "latest").is_file():
        model = model / "checkpoints"  # a training run's output directory
    if args.student_template and not Path(args.student_template).is_file():
        raise UsageError(f"--student-template {args.student_template}: no such file")
    rows, skipped = load_data(args, specs)  # every rank: cheap, and bad data stops before any engine starts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from megatron_rlsd.parallel import ParallelConfig, destroy_distributed, init_distributed

    platform = init_distributed(ParallelConfig())
    rank, world = dist.get_rank(), dist.get_world_size()
    export = None
    try:
        if kind == "checkpoint":
            result = [None]  # (exported folder, error message) from rank 0
            if rank == 0:
                try:
                    result[0] = (str(export_checkpoint(model, out)), None)
                except UsageError as e:
                    result[0] = (None, str(e))
            dist.broadcast_object_list(result, src=0)
            folder, error = result[0]
            if error is not None:
                raise UsageError(error)
            export = Path(folder)
        hf_dir = export / "hf" if export else model
        records, summary = evaluate_model(args, platform, hf_dir, rows, skipped, sampling, rank, world, out)
        if rank == 0:
            print(format_table(summary))
            print(f"wrote {out / 'samples.jsonl'} and {out / 'summary.json'}")
        return 0
    finally:
        if export is not None and rank == 0:  # every rank is done with it: the records were gathered
            shutil.rmtree(export, ignore_errors=True)
        destroy_distributed()


def evaluate_model(args, platform, hf_dir: Path, rows, skipped, sampling, rank: int, world: int, out: Path):
    """Build the engine with `hf_dir`'s weights, evaluate this rank's share, gather (before the
    engine closes: closing it ends torch.distributed), and (rank 0) write the outputs. Returns
    (records, summary) on rank 0, ([], None) elsewhere."""
    from dataclasses import asdict, replace

    from transformers import AutoTokenizer

    from megatron_rlsd.config import RolloutConfig
    from megatron_rlsd.data import PromptTemplates
    from megatron_rlsd.data.vision import PromptEncoder
    from megatron_rlsd.evaluation import evaluate_rows, gather_records, shard_rows, summarize
    from megatron_rlsd.rollout.vllm_engine import VLLMEngine

    config = json.loads((hf_dir / "config.json").read_text())
    try:
        templates = PromptTemplates.from_files(args.student_template)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    encoder = PromptEncoder(hf_dir, tokenizer, multimodal="vision_config" in config)
    max_len = sampling.max_prompt_tokens + sampling.max_new_tokens
    if (limit := max_positions(config)) and max_len > limit:
        if limit <= sampling.max_new_tokens:
            raise UsageError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in the model's "
                             f"{limit} positions")  # fmt: skip
        sampling = replace(sampling, max_prompt_tokens=limit - sampling.max_new_tokens)
        max_len = limit
    rollout = RolloutConfig(kv_cache_mb=args.kv_cache_mb, gpu_memory_utilization=args.gpu_memory_utilization)
    engine = VLLMEngine(hf_dir, rollout, platform, max_model_len=max_len, seed=args.seed, log_file=out / "vllm.log")
    engine.update_weights(hf_buckets(hf_dir))
    records, _ = evaluate_rows(engine, shard_rows(rows, rank, world), templates, encoder, sampling, progress=rank == 0)
    records = gather_records(records + (skipped if rank == 0 else []))
    engine.close()  # last: it takes torch.distributed down with it
    if rank != 0:
        return [], None
    summary = summarize(records)
    summary["settings"] = {"model": str(args.model), "data": args.data, "preset": args.preset or ["default"],
                           "processes": world, **asdict(sampling)}  # fmt: skip
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return records, summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"evaluate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
