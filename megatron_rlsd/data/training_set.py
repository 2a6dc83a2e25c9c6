"""The training run's prompt rows: loaded, filtered by prompt length, and reported at start-up."""

from __future__ import annotations

import torch.distributed as dist

from megatron_rlsd.config import ConfigError

from .dataset import PromptRow, load_prompt_rows
from .templates import PromptTemplates

PROMPT_TOO_LONG = "prompt_too_long"
_REPORT_IDS = 5  # row labels named per skip reason


def load_training_rows(data_cfg, encoder, templates: PromptTemplates) -> list[PromptRow]:
    """The usable rows of `data.train_file`, and a start-up report of the others (rank 0).

    Skipped, counted and reported one line per reason with the first row labels: the rows the
    loader rejects (data/dataset.py: bad_json, missing_problem, bad_answer, ...) and
    `prompt_too_long`, rows whose student prompt after the chat template (image tokens included)
    has more than `data.max_prompt_tokens` tokens: the rollout engine would refuse them mid-run.
    Each rank measures a share of the rows. A dataset without a usable row is a ConfigError.
    Works without torch.distributed too (one process)."""
    path = data_cfg.train_file
    try:
        rows, skipped = load_prompt_rows(path, check_images=data_cfg.check_images)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.train_file {e}") from None
    total = len(rows) + sum(len(v) for v in skipped.values())
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    limit = data_cfg.max_prompt_tokens
    too_long = [i for i in range(rank, len(rows), world)
                if len(encoder.encode(templates.student_messages(rows[i]), rows[i].images)[0]) > limit]  # fmt: skip
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, too_long)
        too_long = sorted(i for share in shares for i in share)
    if too_long:
        skipped[PROMPT_TOO_LONG] = [rows[i].id for i in too_long]
        drop = set(too_long)
        rows = [r for i, r in enumerate(rows) if i not in drop]
    n_skipped = sum(len(v) for v in skipped.values())
    if rank == 0:
        print(f"data: {path}: {total} rows, {len(rows)} usable, {n_skipped} skipped", flush=True)
        for reason, labels in sorted(skipped.items()):
            what = f" (> data.max_prompt_tokens={limit} tokens after the chat template)" if reason == PROMPT_TOO_LONG else ""
            print(f"data: skipped {len(labels)} row(s) {reason}{what}: first ids {', '.join(labels[:_REPORT_IDS])}", flush=True)
    if not rows:
        raise ConfigError(
            f"data.train_file {path}: no usable rows ({', '.join(f'{k}: {len(v)}' for k, v in sorted(skipped.items()))}); "
            f"fix the data, or raise data.max_prompt_tokens if the prompts are too long"
        )
    return rows
