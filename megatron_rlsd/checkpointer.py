"""The run's output directory and its checkpoints: save, load, resume policy.

    OUTPUT/
      checkpoints/            checkpoint root (megatron_rlsd/checkpoint/dist.py has its layout)
      metrics.jsonl, tensorboard/, vllm.log, config.json
      COMPLETED | STOPPED     how the last run ended (launchers read them; Slurm requeues on STOPPED)
      previous-<timestamp>/   outputs of an earlier run that a fresh start moved aside

A checkpoint holds the model, the optimizer, the teacher's weights (stored like the model, under
`teacher.`, so they reshard), per-rank RNG states, the trainer's own state (`Trainer.state_dict`)
and the run's config. It is written into `.incomplete-step_N/`, renamed into place when complete,
and `latest` moves last: that rename is the commit point.

Resuming is refused when the checkpoint was written with a config that makes a different run
(`RESUME_MUST_MATCH`); everything else may change and each change is logged.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rlsd.checkpoint import dist as ckpt
from megatron_rlsd.config import Config, ConfigError, to_dict

COMPLETED_MARKER = "COMPLETED"
STOPPED_MARKER = "STOPPED"
TEACHER_PREFIX = "teacher."
PREVIOUS_RUN_ITEMS = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json", "vllm.log", STOPPED_MARKER, COMPLETED_MARKER)

RESUME_MUST_MATCH: tuple[str, ...] = (
    # what is trained: the architecture (the HF config.json of model.hf_dir, compared key by key
    # with the checkpoint's hf/config.json, wherever the folder now lives) and its precision
    "model.params_dtype",
    # on what: the dataset, its order and the prompts built from it (max_prompt_tokens decides
    # which rows are usable, so it changes the sampler's dataset); the sampler also refuses a
    # different row count
    "data.train_file",
    "data.seed",
    "data.student_template",
    "data.teacher_template",
    "data.max_prompt_tokens",
    # how responses are sampled, scored and turned into a loss
    "rollout.group_size",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.truncated_is_cap",
    "reward.accuracy_weight",
    "reward.format_bonus",
    "algorithm.*",
    "trainer.seed",  # rollout seeds derive from (trainer.seed, step, sample)
    "trainer.prompts_per_step",
    "trainer.mini_batches_per_step",
)
"""Fields that define a run: resuming with any of them changed is refused (one config error line
naming the field, the checkpoint's value and the new one). To change one, start a new run in
another trainer.output_dir (model.init_checkpoint=OUTPUT/checkpoints starts it from these weights).

Everything else may change on resume, and each change is logged (`resume: FIELD OLD -> NEW`):
- parallel.*: checkpoints reshard to any TP/PP/world size (RNG states are then re-seeded
  rather than restored, as in Megatron-LM);
- optim.*: lr / weight decay / betas / grad_clip take effect from the resumed step (e.g. a lower
  lr after a spike); the optimizer's moments and step count are restored;
- rollout.max_new_tokens (a response-length curriculum) and the engine's resources
  (vllm_tensor_parallel_size, kv_cache_mb, gpu_memory_utilization, weight_bucket_mb, vllm_log_level);
- memory and speed only: reward.timeout_s, trainer.micro_batch_size, max_tokens_per_microbatch,
  model.recompute*, model.transformer_impl, parallel.sequence_parallel, offload.*;
- bookkeeping: trainer.steps, save_interval, keep_checkpoints, output_dir, tensorboard,
  max_consecutive_nonfinite, resume, test_faults.*;
- what only matters for a fresh start: model.hf_dir's path, model.init_checkpoint, demo.*,
  trainer.warmup_sft_*."""

_PATH_FIELDS = {"data.train_file", "data.student_template", "data.teacher_template"}
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
# HF config.json keys that do not describe the architecture
_HF_CONFIG_NOISE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"}


def resume_step_dir(cfg: Config) -> Path | None:
    """The checkpoint (step directory) this run will resume from, per `trainer.resume`."""
    if cfg.trainer.resume == "never":
        return None
    root = ckpt.checkpoint_root(cfg.trainer.output_dir)
    try:
        step_dir = ckpt.latest_step_dir(root)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; fix {root / ckpt.LATEST} or set trainer.resume=never to start over") from None
    if step_dir is None and cfg.trainer.resume == "require":
        raise ConfigError(f"trainer.resume=require but {root} holds no checkpoint (no '{ckpt.LATEST}' file)")
    return step_dir


def check_resume(cfg: Config) -> list[str]:
    """Compare this config with the one the checkpoint to resume was written with.

    Raises ConfigError (one line) when a RESUME_MUST_MATCH field or the model architecture
    differs; returns one note per other field that changed. Nothing to resume: no notes."""
    step_dir = resume_step_dir(cfg)
    if step_dir is None:
        return []
    saved_path = step_dir / ckpt.TRAIN_CONFIG
    if not saved_path.is_file():
        return [f"resume: {step_dir} has no {ckpt.TRAIN_CONFIG} (an older checkpoint); config compatibility not checked"]
    saved, now = _flatten(json.loads(saved_path.read_text())), _flatten(to_dict(cfg))
    fix = (f"keep the saved value, or start a new run (another trainer.output_dir or trainer.resume=never; "
           f"model.init_checkpoint={step_dir.parent} starts it from these weights)")  # fmt: skip
    notes = []
    for key in sorted(set(saved) & set(now)):
        old, new = saved[key], now[key]
        if _same(key, old, new):
            continue
        section = key.split(".")[0]
        if key in RESUME_MUST_MATCH or f"{section}.*" in RESUME_MUST_MATCH:
            raise ConfigError(f"cannot resume {step_dir}: {key}={new!r} but the checkpoint was written with {key}={old!r}; {fix}")
        notes.append(f"resume: {key} {old!r} -> {new!r}")
    saved_hf, new_hf = step_dir.parent / ckpt.HF_SUBDIR / "config.json", Path(cfg.model.hf_dir) / "config.json"
    if saved_hf.is_file() and new_hf.is_file():
        a, b = _flatten(json.loads(saved_hf.read_text())), _flatten(json.loads(new_hf.read_text()))
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key) and key.rsplit(".", 1)[-1] not in _HF_CONFIG_NOISE:
                raise ConfigError(
                    f"cannot resume {step_dir}: model.hf_dir {new_hf.parent} has {key}={b.get(key)!r} in config.json "
                    f"but the checkpoint's model has {key}={a.get(key)!r} ({saved_hf}); a checkpoint only resumes the same architecture"
                )  # fmt: skip
    return notes


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flatten(v, key + ".")
        else:
            out[key] = v
    return out


def _same(key: str, old, new) -> bool:
    if old == new:
        return True
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(old) == list(new)
    if key in _PATH_FIELDS and old and new:  # the same file through another path
        return os.path.realpath(old) == os.path.realpath(new)
    return False


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


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size()}  # fmt: skip


def _detach(sharded_state_dict: dict) -> dict:
    """Point a sharded state dict at the tensors the parameters hold now. Megatron's entries hold
    the Parameter objects themselves (keep_vars), which would be saved with whatever they hold at
    save time: for the teacher, the policy again once its weights are swapped back out."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    def detach(entry):
        if isinstance(getattr(entry, "data", None), torch.nn.Parameter):
            entry.data = entry.data.detach()
        return entry

    return dict_list_map_inplace(detach, sharded_state_dict)


def _log0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


class Checkpointer:
    """Saves and restores the model, optimizer and teacher it is given plus the trainer state the
    caller passes; owns the output directory's layout and markers."""

    def __init__(self, cfg: Config, model: torch.nn.Module, optimizer, teacher, faults, cuda_rng: bool):
        self.cfg = cfg
        self.out_dir = Path(cfg.trainer.output_dir)
        self.root = ckpt.checkpoint_root(self.out_dir)
        self.model, self.optimizer, self.teacher, self.faults = model, optimizer, teacher, faults
        self.cuda_rng = cuda_rng

    # ----------------------------------------------------------------------------- output dir
    def prepare_output_dir(self) -> None:
        """Collective. Rank 0 removes what a run killed mid-save left unpublished; a run that
        will not resume but finds a previous run's outputs moves them aside, never deleting them
        (they would mix with the new run's metrics or be pruned with its checkpoints); the end
        markers are cleared."""
        if dist.get_rank() == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for path in ckpt.unpublished_dirs(self.root):
                shutil.rmtree(path, ignore_errors=True)
                print(f"removed unpublished checkpoint {path} (its writer stopped before '{ckpt.LATEST}' named it)", flush=True)
            if resume_step_dir(self.cfg) is None:
                moved = move_previous_run(self.out_dir)
                if moved:
                    why = "trainer.resume=never" if self.cfg.trainer.resume == "never" else "nothing to resume"
                    print(f"{why}: moved the previous run's {', '.join(p.name for p in moved)} to {moved[0].parent}", flush=True)
            for marker in (COMPLETED_MARKER, STOPPED_MARKER):
                (self.out_dir / marker).unlink(missing_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=1))
        dist.barrier()

    def write_marker(self, name: str, text: str) -> None:
        if dist.get_rank() == 0:
            (self.out_dir / name).write_text(text)

    # ----------------------------------------------------------------------------- save
    def _state(self, trainer_state: dict | None, loading: bool) -> dict:
        model_sd = self.model.sharded_state_dict()
        # the distributed optimizer's state in a layout-independent form, so a checkpoint resumes
        # at any TP/PP/DP (its default format is refused by the torch_dist writer)
        optimizer_sd = self.optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=_OPTIMIZER_FORMAT)
        state = {"model": model_sd, "optimizer": optimizer_sd}
        if trainer_state is not None:
            state["trainer"] = trainer_state | {"layout": _layout()}
        return state

    def _teacher_state(self) -> dict:
        with self.teacher.swapped_in():  # the teacher's tensors under their own keys, reshardable like the model
            return _detach(self.model.sharded_state_dict(prefix=TEACHER_PREFIX))

    def save(self, step: int, trainer_state: dict) -> Path:
        """Collective. Write the checkpoint of `step` crash-safely; keep the newest
        `trainer.keep_checkpoints`. `trainer_state`: plain data (Trainer.state_dict())."""
        final = self.root / ckpt.step_dir_name(step)
        tmp = self.root / f"{ckpt.INCOMPLETE_PREFIX}{final.name}"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            hf = self.root / ckpt.HF_SUBDIR
            if not hf.exists():
                from megatron_rlsd.checkpoint.convert import copy_side_files

                copy_side_files(Path(self.cfg.model.hf_dir), hf)
        dist.barrier()
        state = self._state(trainer_state, loading=False)
        state["rng"] = ckpt.rng_sharded_object(ckpt.rng_states(cuda=self.cuda_rng))
        if not self.teacher.is_live:
            state["teacher"] = self._teacher_state()
        ckpt.save_sharded(state, tmp, before_metadata=lambda: self.faults.in_save(step, "writing"))
        if dist.get_rank() == 0:
            (tmp / ckpt.TRAIN_CONFIG).write_text(json.dumps(to_dict(self.cfg), indent=1))
        dist.barrier()
        self.faults.in_save(step, "published")
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            ckpt.publish_latest(self.root, final)
            ckpt.prune_step_dirs(self.root, final, self.cfg.trainer.keep_checkpoints)
            print(f"saved checkpoint {final}", flush=True)
        dist.barrier()
        return final

    # ----------------------------------------------------------------------------- load
    def load(self) -> dict | None:
        """Collective. Resume from the output directory's latest checkpoint if there is one (and
        `trainer.resume` allows): model, optimizer, teacher and, at the same layout, RNG states.
        Returns the trainer state saved with it (None: nothing to resume). Refuses (ConfigError)
        a checkpoint written with a config that makes a different run."""
        from megatron_rlsd.optimizer import apply_hparams

        step_dir = resume_step_dir(self.cfg)
        if step_dir is None:
            return None
        notes = check_resume(self.cfg)
        loaded = ckpt.load_sharded(self._state({}, loading=True), step_dir)
        self.model.load_state_dict(loaded["model"])
        self.optimizer.load_state_dict(loaded["optimizer"])
        apply_hparams(self.optimizer, self.cfg.optim)  # optim.* may change on resume
        trainer_state = loaded["trainer"]  # common (non-sharded) state comes back merged in
        if not self.teacher.is_live:
            with self.teacher.swapped_in(write_back=True):
                teacher = ckpt.load_sharded({"teacher": self.model.sharded_state_dict(prefix=TEACHER_PREFIX)}, step_dir)
                self.model.load_state_dict({k[len(TEACHER_PREFIX):]: v for k, v in teacher["teacher"].items()})
        # RNG states are rank-specific (the tracker's streams follow the TP rank): restored only at
        # the layout they were saved from; otherwise the run keeps its fresh seeding (Megatron-LM too)
        rng_note = "RNG states restored"
        if trainer_state.get("layout") == _layout():
            like = ckpt.rng_sharded_object(ckpt.rng_states(cuda=self.cuda_rng))
            ckpt.set_rng_states(ckpt.load_sharded({"rng": like}, step_dir)["rng"])
        else:
            rng_note = f"RNG states not restored: layout {trainer_state.get('layout')} -> {_layout()}"
        _log0(f"resumed from {step_dir} at step {trainer_state['step']} ({rng_note})")
        for note in notes:
            _log0(note)
        return trainer_state
