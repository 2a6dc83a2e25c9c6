"""Typed run configuration: YAML files with dotted command-line overrides (`trainer.steps=20`).

Every section is a dataclass; unknown keys, wrong types and invalid combinations fail in
`load_config` with one line naming the field and the fix, before any heavy initialisation.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_rlsd.algorithms.losses import LOSS_MODES
from megatron_rlsd.parallel import ParallelConfig
from megatron_rlsd.rewards import RewardConfig


class ConfigError(ValueError):
    """A configuration problem, reported as one line."""


@dataclass
class ModelConfig:
    hf_dir: str = ""
    """HF folder (config.json + tokenizer) of the initial policy; its weights are used unless
    `init_checkpoint` is set."""
    init_checkpoint: str = ""
    """Optional Megatron checkpoint root (tools/convert_hf_to_megatron.py) to start from."""
    params_dtype: str = "float32"
    """float32 (CPU, tests) or bfloat16 (GPU)."""
    build_tiny: bool = False
    """Build a tiny random Qwen3 + locally trained tokenizer into `hf_dir` if it does not exist
    (the embedded CPU default)."""
    tiny_layers: int = 4
    tiny_hidden: int = 128
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_vision: bool = False
    """With build_tiny: a tiny Qwen3-VL (vision tower, processor) instead of a text Qwen3."""


@dataclass
class DataConfig:
    train_file: str = ""
    """JSONL or parquet rows {id, problem, answer[, images]}."""
    synthetic_task: str = ""
    """If set, generate `synthetic_rows` rows of this task into `train_file`: add | max | copy
    (text), or shapes (images of coloured shapes: count_color | count_shape | largest_color in
    turn; each also works alone), written beside `train_file` in images/."""
    synthetic_rows: int = 2000
    synthetic_max_operand: int = 9
    student_template: str = ""
    """Path to a student prompt template with {problem}; empty: the built-in default."""
    teacher_template: str = ""
    """Path to a teacher template with {problem} and {answer}; empty: the built-in default."""
    max_prompt_tokens: int = 4096
    check_images: bool = False
    """Open every referenced image at start-up; rows with a missing or undecodable one are
    skipped and counted (missing_image / undecodable_image) instead of failing mid-run."""
    seed: int = 1234


@dataclass
class RolloutConfig:
    group_size: int = 8
    """Responses sampled per prompt (G)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    vllm_tensor_parallel_size: int = 1
    """vLLM engines are colocated: one per group of this many consecutive ranks."""
    kv_cache_mb: int = 256
    """CPU only: KV cache size per engine."""
    gpu_memory_utilization: float = 0.5
    weight_bucket_mb: int = 512
    """Upper bound of one weight-sync bucket (a bucket never splits a layer)."""
    truncated_is_cap: float = 0.0
    """> 0: multiply the loss by min(pi_old / pi_rollout, cap) per token (TIS)."""


@dataclass
class AlgorithmConfig:
    loss_mode: str = "rlsd"
    """rlsd | grpo | opsd | grpo_opsd | sdpo"""
    eps_w: float = 0.2
    lambda_init: float = 0.5
    lambda_decay_steps: int = 50
    """Paper: 50; the authors' script: 60."""
    lambda_warmup_steps: int = 0
    teacher_refresh_interval: int = 10
    """K: teacher = policy snapshot refreshed every K steps (paper 10, authors' code 20); 1 = live."""
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 3.0
    """0 disables dual-clip."""
    loss_agg: str = "token_mean"
    """token_mean (global over the batch) | seq_mean_token_mean"""
    adv_eps: float = 1e-6
    opsd_divergence: str = "jsd"
    """jsd | forward_kl | reverse_kl"""
    opsd_beta: float = 0.5
    grpo_opsd_alpha: float = 0.1
    sdpo_topk: int = 100


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    steps: int = 200
    prompts_per_step: int = 256
    micro_batch_size: int = 8
    """Sequences per micro-batch in the training forward/backward."""
    seed: int = 1234
    output_dir: str = "outputs/run"
    save_interval: int = 10
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    warmup_sft_steps: int = 0
    """Supervised steps on reference responses before RL (tiny models must learn the format)."""
    warmup_sft_lr: float = 1e-3
    tensorboard: bool = True
    max_consecutive_nonfinite: int = 3
    """Steps whose loss or gradient norm is not finite are skipped (and counted); after this many
    in a row the run stops, leaving the last good checkpoint as it was."""
    inject_nan_at_steps: str = ""
    """Fault injection for tests: comma-separated step numbers whose loss is made NaN."""
    inject_crash_in_save_at_step: int = 0
    """Fault injection for tests: while saving the checkpoint of this step, every rank SIGKILLs
    itself after the shards are written and before the checkpoint is published (a job losing its
    nodes mid-save). 0: off."""
    resume: str = "auto"
    """auto: continue from OUTPUT/checkpoints/latest when there is one, else start fresh.
    require: the same, but a missing checkpoint is a config error (a resubmitted job must resume).
    never: start fresh from the model's initial weights.
    A run that starts fresh where a previous run left outputs (checkpoints/, metrics.jsonl,
    tensorboard/, config.json, markers) moves them, never deleting them, into
    OUTPUT/previous-<timestamp>/. A requeued job (Slurm) reruns its config, so do not leave
    `never` in a job that may be requeued: every restart would start over.
    Resuming checks the checkpoint's config: see RESUME_MUST_MATCH."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _coerce(value, typ, where: str):
    origin = typing.get_origin(typ)
    if typ is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {where + '.' if where else ''}{unknown[0]}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value or {}, key)
        else:
            kwargs[name] = _coerce(value, typ, key)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own __post_init__ validation
        raise ConfigError(str(e)) from None


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read YAML `path` (or defaults), apply `key.sub=value` overrides, validate."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        tree = yaml.safe_load(p.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cheap consistency checks (no model, no files opened except existence checks)."""
    a, r, t = cfg.algorithm, cfg.rollout, cfg.trainer
    if a.loss_mode not in LOSS_MODES:
        raise ConfigError(f"unknown loss mode {a.loss_mode!r}; choose one of {', '.join(LOSS_MODES)}")
    if r.group_size < 2:
        raise ConfigError(f"rollout.group_size must be >= 2 (group advantages need siblings), got {r.group_size}")
    if not 0 < a.eps_w < 1:
        raise ConfigError(f"algorithm.eps_w must be in (0, 1), got {a.eps_w}")
    if not 0 <= a.lambda_init <= 1:
        raise ConfigError(f"algorithm.lambda_init must be in [0, 1], got {a.lambda_init}")
    if a.teacher_refresh_interval < 1:
        raise ConfigError("algorithm.teacher_refresh_interval must be >= 1 (1 = live policy)")
    if a.loss_agg not in ("token_mean", "seq_mean_token_mean"):
        raise ConfigError(f"algorithm.loss_agg must be token_mean or seq_mean_token_mean, got {a.loss_agg!r}")
    if a.opsd_divergence not in ("jsd", "forward_kl", "reverse_kl"):
        raise ConfigError(f"algorithm.opsd_divergence must be jsd, forward_kl or reverse_kl, got {a.opsd_divergence!r}")
    if a.dual_clip and a.dual_clip <= 1:
        raise ConfigError(f"algorithm.dual_clip must be > 1 (or 0 to disable), got {a.dual_clip}")
    if t.resume not in RESUME_MODES:
        raise ConfigError(f"trainer.resume must be one of {', '.join(RESUME_MODES)}, got {t.resume!r}")
    if t.inject_crash_in_save_at_step < 0:
        raise ConfigError("trainer.inject_crash_in_save_at_step must be >= 0 (0: off)")
    if t.steps < 1 or t.prompts_per_step < 1 or t.micro_batch_size < 1 or t.keep_checkpoints < 1:
        raise ConfigError("trainer.steps, prompts_per_step, micro_batch_size and keep_checkpoints must be >= 1")
    if cfg.model.params_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.params_dtype must be float32 or bfloat16, got {cfg.model.params_dtype!r}")
    if not cfg.model.hf_dir:
        raise ConfigError("model.hf_dir is required (HF folder with config.json and tokenizer)")
    if not cfg.model.build_tiny and not (Path(cfg.model.hf_dir) / "config.json").is_file():
        raise ConfigError(f"model.hf_dir {cfg.model.hf_dir}: config.json not found")
    if cfg.model.init_checkpoint and not Path(cfg.model.init_checkpoint).exists():
        raise ConfigError(f"model.init_checkpoint {cfg.model.init_checkpoint} does not exist")
    if not cfg.data.train_file:
        raise ConfigError("data.train_file is required")
    if not cfg.data.synthetic_task and not Path(cfg.data.train_file).is_file():
        raise ConfigError(f"data.train_file {cfg.data.train_file} not found")
    for name in ("student_template", "teacher_template"):
        path = getattr(cfg.data, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"data.{name} {path} not found")


def check_model_fits(cfg: Config, world_size: int) -> None:
    """Layout checks that need the HF config (TP vs heads, PP vs layers, world size)."""
    import json

    from megatron_rlsd.models.registry import model_module

    par = cfg.parallel
    try:
        par.data_parallel_size(world_size)
        hf_cfg_path = Path(cfg.model.hf_dir) / "config.json"
        if hf_cfg_path.is_file():
            hf_cfg = json.loads(hf_cfg_path.read_text())
            shape = model_module(hf_cfg).Shape.from_hf_config(hf_cfg)
            shape.check_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.trainer.prompts_per_step * cfg.rollout.group_size % par.data_parallel_size(world_size):
        raise ConfigError(
            f"trainer.prompts_per_step * rollout.group_size = {cfg.trainer.prompts_per_step * cfg.rollout.group_size} "
            f"sequences do not split over {par.data_parallel_size(world_size)} data-parallel ranks"
        )


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------- resuming
RESUME_MODES = ("auto", "require", "never")

RESUME_MUST_MATCH: tuple[str, ...] = (
    # what is trained: the architecture (the HF config.json of model.hf_dir, compared key by key
    # with the checkpoint's hf/config.json, wherever the folder now lives) and its precision
    "model.params_dtype",
    # on what: the dataset, its order and the prompts built from it (max_prompt_tokens decides
    # which rows are usable, so it changes the sampler's dataset). data.synthetic_* only matter
    # while the file is generated; the sampler also refuses a different row count.
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
  (vllm_tensor_parallel_size, kv_cache_mb, gpu_memory_utilization, weight_bucket_mb);
- reward.timeout_s, trainer.micro_batch_size (memory only);
- bookkeeping: trainer.steps, save_interval, keep_checkpoints, output_dir, tensorboard,
  max_consecutive_nonfinite, resume, inject_*;
- what only matters for a fresh start: model.hf_dir's path, model.init_checkpoint,
  model.build_tiny / tiny_*, data.synthetic_*, trainer.warmup_sft_*."""

_PATH_FIELDS = {"data.train_file", "data.student_template", "data.teacher_template"}
# HF config.json keys that do not describe the architecture
_HF_CONFIG_NOISE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"}


def resume_step_dir(cfg: Config) -> Path | None:
    """The checkpoint (step directory) this run will resume from, per `trainer.resume`."""
    from megatron_rlsd.checkpoint import dist as ckpt

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
    import json

    from megatron_rlsd.checkpoint import dist as ckpt

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
