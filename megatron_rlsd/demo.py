"""The embedded default's own files: a tiny random model and a synthetic verifiable task.

Run as a step of its own before training, by the entry point when the config's `demo` section asks
for it (examples/tiny_cpu.yaml, examples/tiny_vl_cpu.yaml); production configs leave it empty and
nothing here runs. Files that exist are kept, so a rerun (or a resume) trains on the same ones.
Synthetic rows carry a `solution` (the ideal response) for the supervised warm start.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_rlsd.config import Config

# demo.synthetic_task for the visual task (every question kind in turn); a single kind also works
SHAPES_TASK = "shapes"


def _build_model(cfg: Config) -> None:
    d = cfg.demo
    size = dict(num_layers=d.tiny_layers, hidden_size=d.tiny_hidden, num_heads=d.tiny_heads,
                num_kv_heads=d.tiny_kv_heads, intermediate_size=2 * d.tiny_hidden, seed=cfg.trainer.seed)  # fmt: skip
    if d.tiny_model == "vl":
        from megatron_rlsd.data.synthetic_vl import synthetic_vl_corpus
        from megatron_rlsd.models.tiny import default_corpus
        from megatron_rlsd.models.tiny_vl import build_tiny_qwen3_vl

        build_tiny_qwen3_vl(cfg.model.hf_dir, corpus=default_corpus() + synthetic_vl_corpus(), **size)
    else:
        from megatron_rlsd.models.tiny import build_tiny_qwen3

        build_tiny_qwen3(cfg.model.hf_dir, **size)
    print(f"demo: built a tiny Qwen3{'-VL' if d.tiny_model == 'vl' else ''} in {cfg.model.hf_dir}", flush=True)


def _write_rows(cfg: Config) -> None:
    from megatron_rlsd.data.synthetic import make_synthetic_rows, write_jsonl
    from megatron_rlsd.data.synthetic_vl import SYNTHETIC_VL_TASKS, make_synthetic_vl_rows

    d, path = cfg.demo, Path(cfg.data.train_file)
    if d.synthetic_task == SHAPES_TASK or d.synthetic_task in SYNTHETIC_VL_TASKS:
        task = None if d.synthetic_task == SHAPES_TASK else d.synthetic_task
        rows = make_synthetic_vl_rows(d.synthetic_rows, seed=cfg.data.seed, out_dir=path.parent / "images", task=task, size=64)
    else:
        rows = make_synthetic_rows(d.synthetic_rows, seed=cfg.data.seed, task=d.synthetic_task, max_operand=d.synthetic_max_operand)
    write_jsonl(rows, path)
    print(f"demo: wrote {len(rows)} synthetic '{d.synthetic_task}' rows to {path}", flush=True)


def prepare(cfg: Config) -> None:
    """Rank 0 makes what is missing; every rank waits for it (collective when distributed)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        if cfg.demo.tiny_model and not (Path(cfg.model.hf_dir) / "config.json").is_file():
            _build_model(cfg)
        if cfg.demo.synthetic_task and not Path(cfg.data.train_file).is_file():
            _write_rows(cfg)
    if dist.is_initialized():
        dist.barrier()
