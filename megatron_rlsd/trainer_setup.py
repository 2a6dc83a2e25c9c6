"""Building what the trainer runs on (model, optimizer, engine, data) and its checkpoints.

Kept apart from trainer.py so that the loop reads as the algorithm.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rlsd.checkpoint import dist as ckpt
from megatron_rlsd.config import Config, ConfigError, check_resume, resume_step_dir, to_dict
from megatron_rlsd.data import PromptTemplates, load_prompt_rows, make_synthetic_rows, sft_text, write_jsonl
from megatron_rlsd.data.synthetic_vl import SYNTHETIC_VL_TASKS, make_synthetic_vl_rows, sft_text_vl, synthetic_vl_corpus
from megatron_rlsd.data.vision import PromptEncoder

# data.synthetic_task for the visual task (every question kind in turn); a single kind also works
SHAPES_TASK = "shapes"


@dataclass
class Setup:
    platform: object
    model: object  # Megatron DDP-wrapped GPTModel stage
    shape: object
    optimizer: object
    tokenizer: object
    engine: object
    rows: list
    templates: PromptTemplates
    encoder: PromptEncoder


def _prepare_files(cfg: Config) -> None:
    """Rank 0 materialises the embedded default's tiny model and synthetic data if asked."""
    if dist.get_rank() == 0:
        m, d = cfg.model, cfg.data
        if m.build_tiny and not (Path(m.hf_dir) / "config.json").is_file():
            size = dict(num_layers=m.tiny_layers, hidden_size=m.tiny_hidden, num_heads=m.tiny_heads,
                        num_kv_heads=m.tiny_kv_heads, intermediate_size=2 * m.tiny_hidden, seed=cfg.trainer.seed)  # fmt: skip
            if m.tiny_vision:
                from megatron_rlsd.models.tiny import default_corpus
                from megatron_rlsd.models.tiny_vl import build_tiny_qwen3_vl

                build_tiny_qwen3_vl(m.hf_dir, corpus=default_corpus() + synthetic_vl_corpus(), **size)
            else:
                from megatron_rlsd.models.tiny import build_tiny_qwen3

                build_tiny_qwen3(m.hf_dir, **size)
            print(f"built tiny Qwen3{'-VL' if m.tiny_vision else ''} in {m.hf_dir}", flush=True)
        if d.synthetic_task and not Path(d.train_file).is_file():
            if is_visual_task(d.synthetic_task):
                task = None if d.synthetic_task == SHAPES_TASK else d.synthetic_task
                images = Path(d.train_file).parent / "images"
                rows = make_synthetic_vl_rows(d.synthetic_rows, seed=d.seed, out_dir=images, task=task, size=64)
            else:
                rows = make_synthetic_rows(d.synthetic_rows, seed=d.seed, task=d.synthetic_task, max_operand=d.synthetic_max_operand)
            write_jsonl(rows, d.train_file)
            print(f"wrote {len(rows)} synthetic '{d.synthetic_task}' rows to {d.train_file}", flush=True)
    dist.barrier()


def is_visual_task(task: str) -> bool:
    return task == SHAPES_TASK or task in SYNTHETIC_VL_TASKS


def build_optimizer(cfg: Config, model, lr: float):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optim
    bf16 = cfg.model.params_dtype == "bfloat16"
    oc = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        clip_grad=o.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=model.ddp_config.use_distributed_optimizer,
    )  # fmt: skip
    return get_megatron_optimizer(oc, [model])


def apply_optim_hparams(optimizer, cfg: Config, lr: float) -> None:
    """Set lr, weight decay and betas on every parameter group from the config, as
    get_megatron_optimizer sets them (this trainer has a constant lr and no LR scheduler; note
    that without one Megatron's per-group wd_mult is not applied, so norms are decayed too).
    Called after a checkpoint's parameter groups were loaded: optim.* may change on resume."""
    o = cfg.optim
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = o.weight_decay
        if "betas" in group:
            group["betas"] = (o.adam_beta1, o.adam_beta2)


def setup(cfg: Config) -> Setup:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from transformers import AutoTokenizer

    from megatron_rlsd.checkpoint.hf_load import load_hf_into_stage
    from megatron_rlsd.models.registry import build_pipeline_stage
    from megatron_rlsd.parallel import init_distributed, seed_model_parallel_rng
    from megatron_rlsd.rollout.vllm_engine import VLLMEngine
    from megatron_rlsd.trainer import seed_everything

    platform = init_distributed(cfg.parallel)
    seed_everything(cfg.trainer.seed)
    seed_model_parallel_rng(cfg.trainer.seed)
    _prepare_files(cfg)

    # data first: an unusable dataset is a config error before the model and engines are built
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    templates = PromptTemplates.from_files(cfg.data.student_template or None, cfg.data.teacher_template or None)
    hf_config = json.loads((Path(cfg.model.hf_dir) / "config.json").read_text())
    encoder = PromptEncoder(cfg.model.hf_dir, tokenizer, multimodal="vision_config" in hf_config)
    rows = load_training_rows(cfg, tokenizer, templates, encoder)

    dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
    model, shape = build_pipeline_stage(hf_config, platform, params_dtype=dtype, init_weights=False)
    if cfg.model.init_checkpoint:
        ckpt.load_model_weights(model, cfg.model.init_checkpoint)
    else:
        load_hf_into_stage(model, cfg.model.hf_dir, shape)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=not platform.is_cpu
    )  # the distributed optimizer's state does not restore exactly on CPU (PLATFORM.md)
    model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    optimizer = build_optimizer(cfg, model, cfg.optim.lr)

    engine = VLLMEngine(cfg.model.hf_dir, cfg.rollout, platform,
                        max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, seed=cfg.trainer.seed)  # fmt: skip
    seed_everything(cfg.trainer.seed)  # vLLM's CPU worker reseeds the global generators
    return Setup(platform, model, shape, optimizer, tokenizer, engine, rows, templates, encoder)


# --------------------------------------------------------------------------------- data
PROMPT_TOO_LONG = "prompt_too_long"
_REPORT_IDS = 5  # row ids named per skip reason


def load_training_rows(cfg: Config, tokenizer, templates: PromptTemplates, encoder: PromptEncoder | None = None) -> list:
    """The usable rows of `data.train_file`, and a start-up report of the others (rank 0).

    Skipped, counted and reported one line per reason with the first row ids: the rows the loader
    rejects (data/dataset.py: bad_json, missing_problem, bad_answer, ...) and `prompt_too_long`,
    rows whose student prompt after the chat template has more than `data.max_prompt_tokens`
    tokens (the rollout engine would refuse them mid-run; each rank measures a share). A dataset
    without a usable row is a ConfigError. Works without torch.distributed too (one process)."""
    path = cfg.data.train_file
    with _skipped_row_ids() as ids:
        try:
            rows, skipped = load_prompt_rows(path, check_images=cfg.data.check_images)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.train_file {e}") from None
    total = len(rows) + sum(skipped.values())
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    limit = cfg.data.max_prompt_tokens
    encoder = encoder or PromptEncoder(cfg.model.hf_dir, tokenizer, multimodal=False)
    too_long = [i for i in range(rank, len(rows), world)  # image tokens count: the processor expands them
                if len(encoder.encode(templates.student_messages(rows[i]), rows[i].images)[0]) > limit]  # fmt: skip
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, too_long)
        too_long = sorted(i for share in shares for i in share)
    if too_long:
        skipped[PROMPT_TOO_LONG] = len(too_long)
        ids[PROMPT_TOO_LONG] = [rows[i].id for i in too_long[:_REPORT_IDS]]
        drop = set(too_long)
        rows = [r for i, r in enumerate(rows) if i not in drop]
    if rank == 0:
        print(f"data: {path}: {total} rows, {len(rows)} usable, {sum(skipped.values())} skipped", flush=True)
        for reason, n in sorted(skipped.items()):
            what = f" (> data.max_prompt_tokens={limit} tokens after the chat template)" if reason == PROMPT_TOO_LONG else ""
            print(f"data: skipped {n} row(s) {reason}{what}: first ids {', '.join(ids.get(reason, [])) or '?'}", flush=True)
    if not rows:
        raise ConfigError(
            f"data.train_file {path}: no usable rows ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))}); "
            f"fix the data, or raise data.max_prompt_tokens if the prompts are too long"
        )
    return rows


@contextmanager
def _skipped_row_ids():
    """Collect, per skip reason, the row ids the loader names in its warnings (it logs the first
    few per reason and returns only counts). Also keeps those warnings off every rank's stderr:
    load_training_rows reports them once."""

    ids: dict[str, list[str]] = collections.defaultdict(list)

    class Collect(logging.Handler):
        def emit(self, record):
            args = record.args if isinstance(record.args, tuple) else ()
            if "skipping" in str(record.msg) and len(args) == 4:  # (path, where, label, reason)
                ids[str(args[3])].append(str(args[2]))

    logger = logging.getLogger(load_prompt_rows.__module__)
    handler, propagate = Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield ids
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


# --------------------------------------------------------------------------------- warm start
def warm_start_sft(trainer) -> None:
    """A few supervised steps on ideal responses (synthetic tasks) so a tiny random model can
    produce the answer format and read its context at all; RL then has reward variance to work
    with and a teacher that knows more than the student."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs
    from megatron_rlsd.models.forward import model_inputs
    from megatron_rlsd.rollout.samples import Sample, pack, response_logits
    from megatron_rlsd.trainer import log0

    cfg, tok = trainer.cfg, trainer.tokenizer
    from megatron.core import parallel_state as ps

    optimizer = build_optimizer(cfg, trainer.model, cfg.trainer.warmup_sft_lr)
    rng = random.Random(cfg.trainer.seed)
    tp_group = ps.get_tensor_model_parallel_group()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batch = cfg.trainer.micro_batch_size * 2 * dp
    ideal = sft_text_vl if is_visual_task(cfg.data.synthetic_task) else sft_text
    for step in range(cfg.trainer.warmup_sft_steps):
        rows = [trainer.rows[rng.randrange(len(trainer.rows))] for _ in range(batch)][dp_rank::dp]
        samples = []
        for i, row in enumerate(rows):
            # half the examples carry the teacher's privileged context, so the model learns to
            # read it (otherwise a tiny model's teacher is no better informed than its student)
            messages = trainer.templates.teacher_messages(row) if i % 2 else trainer.templates.student_messages(row)
            prompt, vision = trainer.encoder.encode(messages, row.images)
            response = tok(ideal(row), add_special_tokens=False).input_ids + [tok.eos_token_id]
            samples.append(Sample(row=row, group=0, student_prompt=prompt, teacher_prompt=prompt, response=response, vision=vision))
        packed = pack(samples, teacher=False, pad_id=tok.pad_token_id)
        mbs = packed.micro_batches(cfg.trainer.micro_batch_size)
        n_tok = float(packed.mask.sum()) * dp

        def step_fn(data_iterator, model):
            mb = next(data_iterator)
            args, kwargs = model_inputs(mb)
            out = model(*args, **kwargs)

            def loss(logits):
                lp = vocab_parallel_logprobs(response_logits(logits, mb["resp_pos"]), mb["resp_ids"], tp_group=tp_group)
                nll = -(lp * mb["mask"]).sum() / n_tok
                return nll * len(mbs) * dp, {"nll": nll.detach()}

            return out, loss

        trainer.model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iter(mbs), model=[trainer.model], num_microbatches=len(mbs),
            seq_length=packed.tokens.shape[1], micro_batch_size=cfg.trainer.micro_batch_size, forward_only=False,
        )  # fmt: skip
        optimizer.step()
        if reports and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0 and (step % 10 == 0 or step == cfg.trainer.warmup_sft_steps - 1):
            print(f"warm-start sft {step + 1}/{cfg.trainer.warmup_sft_steps} nll/token {sum(r['nll'].item() for r in reports) * dp:.3f}", flush=True)
    log0("warm-start done")
    # the teacher snapshot starts from the warmed-up policy
    if trainer.teacher.snapshot is not None:
        for s, p in zip(trainer.teacher.snapshot, trainer.module.parameters()):
            s.copy_(p.detach())


# --------------------------------------------------------------------------------- checkpoints
TEACHER_PREFIX = "teacher."
PREVIOUS_RUN_ITEMS = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json", "STOPPED", "COMPLETED")


def _checkpoint_root(trainer) -> Path:
    return ckpt.checkpoint_root(trainer.out_dir)


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size()}  # fmt: skip


def prepare_output_dir(trainer) -> None:
    """Rank 0, before anything is loaded. Removes what a run killed mid-save left unpublished.
    A run that will not resume (trainer.resume=never, or no checkpoint) but finds a previous run's
    outputs moves them aside, never deleting them: they would otherwise mix with the new run's
    (metrics, TensorBoard) or be pruned by it (checkpoints). Clears the end markers."""
    from megatron_rlsd.trainer import COMPLETED_MARKER, STOPPED_MARKER

    out = trainer.out_dir
    for path in ckpt.unpublished_dirs(_checkpoint_root(trainer)):
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed unpublished checkpoint {path} (its writer stopped before '{ckpt.LATEST}' named it)", flush=True)
    if resume_step_dir(trainer.cfg) is None:
        moved = move_previous_run(out)
        if moved:
            why = "trainer.resume=never" if trainer.cfg.trainer.resume == "never" else "nothing to resume"
            print(f"{why}: moved the previous run's {', '.join(p.name for p in moved)} to {moved[0].parent}", flush=True)
    for marker in (COMPLETED_MARKER, STOPPED_MARKER):
        (out / marker).unlink(missing_ok=True)


def move_previous_run(out_dir: Path) -> list[Path]:
    """Move a previous run's outputs into OUT/previous-<timestamp>/ if there are any (step
    directories, metrics rows, TensorBoard events); returns their new paths."""
    root, metrics = ckpt.checkpoint_root(out_dir), out_dir / "metrics.jsonl"
    found = (any(root.glob("step_*")) or (metrics.is_file() and metrics.stat().st_size > 0)
             or (out_dir / "tensorboard").exists())  # fmt: skip
    if not found:
        return []
    items = [out_dir / name for name in PREVIOUS_RUN_ITEMS if (out_dir / name).exists()]
    stamp = time.strftime("previous-%Y%m%d-%H%M%S")
    dest, n = out_dir / stamp, 1
    while dest.exists():
        dest, n = out_dir / f"{stamp}-{n}", n + 1
    dest.mkdir()
    for item in items:
        item.rename(dest / item.name)
    return [dest / item.name for item in items]


def save_checkpoint(trainer) -> None:
    """Model, optimizer, teacher snapshot, per-rank RNG states (dist_checkpointing), trainer state
    and the run's config (`train_config.json`, checked when resuming).

    Crash-safe: everything is written into `.incomplete-step_N/`, which is renamed into place
    once complete; `latest` moves last (the commit point); only the newest
    `trainer.keep_checkpoints` are kept."""
    root = _checkpoint_root(trainer)
    final = root / ckpt.step_dir_name(trainer.step)
    tmp = root / f"{ckpt.INCOMPLETE_PREFIX}{final.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        hf = root / ckpt.HF_SUBDIR
        if not hf.exists():
            from megatron_rlsd.checkpoint.convert import copy_side_files

            copy_side_files(Path(trainer.cfg.model.hf_dir), hf)
    dist.barrier()
    model_sd = trainer.module.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(model_sd),
        "trainer": {
            "step": trainer.step,
            "sampler": trainer.sampler.state_dict(),
            "teacher_age": trainer.teacher.age,
            "nonfinite_skipped": trainer.nonfinite_skipped,
            "nonfinite_in_a_row": trainer.nonfinite_in_a_row,
            "layout": _layout(),
        },
        "rng": ckpt.rng_sharded_object(ckpt.rng_states(cuda=not trainer.platform.is_cpu)),
    }
    if trainer.teacher.snapshot is not None:
        with trainer.teacher_weights():  # the snapshot, under its own keys, reshardable like the model
            state["teacher"] = _detach(trainer.module.sharded_state_dict(prefix=TEACHER_PREFIX))
    ckpt.save_sharded(state, tmp)
    if dist.get_rank() == 0:
        (tmp / ckpt.TRAIN_CONFIG).write_text(json.dumps(to_dict(trainer.cfg), indent=1))
    dist.barrier()
    if trainer.step == trainer.cfg.trainer.inject_crash_in_save_at_step:
        os.kill(os.getpid(), signal.SIGKILL)  # test fault: every rank dies with the step unpublished
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        ckpt.publish_latest(root, final)
        ckpt.prune_step_dirs(root, final, trainer.cfg.trainer.keep_checkpoints)
        print(f"saved checkpoint {final}", flush=True)
    dist.barrier()


def _detach(sharded_state_dict: dict) -> dict:
    """Point a sharded state dict at the tensors the parameters hold now. Megatron's entries hold
    the Parameter objects themselves (keep_vars), which would be saved with whatever they hold at
    save time: for the teacher, the policy again once its snapshot is swapped back out."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    def detach(entry):
        if isinstance(getattr(entry, "data", None), torch.nn.Parameter):
            entry.data = entry.data.detach()
        return entry

    return dict_list_map_inplace(detach, sharded_state_dict)


def load_checkpoint(trainer) -> bool:
    """Resume from the output directory's latest checkpoint if there is one (and
    `trainer.resume` allows): everything save_checkpoint wrote. Refuses (ConfigError) a
    checkpoint written with a config that makes a different run (config.RESUME_MUST_MATCH)."""
    step_dir = resume_step_dir(trainer.cfg)
    if step_dir is None:
        return False
    notes = check_resume(trainer.cfg)
    model_sd = trainer.module.sharded_state_dict()
    state = {"model": model_sd, "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=True)}
    loaded = ckpt.load_sharded(state, step_dir)
    trainer.module.load_state_dict(loaded["model"])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    apply_optim_hparams(trainer.optimizer, trainer.cfg, trainer.cfg.optim.lr)  # optim.* may change on resume
    t = loaded["trainer"]  # common (non-sharded) state comes back merged into the result
    trainer.step = t["step"]
    trainer.sampler.load_state_dict(t["sampler"])
    trainer.teacher.age = t["teacher_age"]
    trainer.nonfinite_skipped = t.get("nonfinite_skipped", 0)
    trainer.nonfinite_in_a_row = t.get("nonfinite_in_a_row", 0)
    if trainer.teacher.snapshot is not None:
        with trainer.teacher_weights():
            teacher = ckpt.load_sharded({"teacher": trainer.module.sharded_state_dict(prefix=TEACHER_PREFIX)}, step_dir)
            trainer.module.load_state_dict({k[len(TEACHER_PREFIX):]: v for k, v in teacher["teacher"].items()})
    # RNG states are rank-specific (the tracker's streams follow the TP rank): restored only at
    # the layout they were saved from; otherwise the run keeps its fresh seeding (Megatron-LM too)
    rng_note = "RNG states restored"
    if t.get("layout") == _layout():
        like = ckpt.rng_sharded_object(ckpt.rng_states(cuda=not trainer.platform.is_cpu))
        rng = ckpt.load_sharded({"rng": like}, step_dir)["rng"]
        ckpt.set_rng_states(rng)
    else:
        rng_note = f"RNG states not restored: layout {t.get('layout')} -> {_layout()}"
    if dist.get_rank() == 0:
        print(f"resumed from {step_dir} at step {trainer.step} ({rng_note})", flush=True)
        for note in notes:
            print(note, flush=True)
    return True
