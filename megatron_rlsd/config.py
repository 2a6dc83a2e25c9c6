"""Typed run configuration: YAML files with dotted command-line overrides (`trainer.steps=20`).

Every section is a dataclass whose fields are documented where they are declared; unknown keys,
wrong types and invalid combinations fail in `load_config` with one line naming the field and the
fix, before any heavy initialisation. Whether a checkpoint may be resumed with this config is the
checkpointer's question (megatron_rlsd/checkpointer.py).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_rlsd.algorithms.loss_modes import LOSS_MODES
from megatron_rlsd.leakage import DEFAULT_LEAKAGE_PATTERNS, LeakageDetector
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
    transformer_impl: str = "auto"
    """Layer implementation: auto (Transformer Engine on GPU, where it must import; the local
    Megatron-Core spec on CPU) | te | local. Checkpoints load under either."""
    recompute: str = "none"
    """Activation recomputation in the training forward: none | selective (attention's core,
    cheap to redo) | full (whole layers; see recompute_method / recompute_num_layers)."""
    recompute_method: str = "uniform"
    """full recompute: uniform (checkpoint groups of recompute_num_layers layers) | block (the
    first recompute_num_layers layers of each pipeline stage)."""
    recompute_num_layers: int = 1


@dataclass
class DataConfig:
    train_file: str = ""
    """JSONL or parquet rows {id, problem, answer[, images]}."""
    student_template: str = ""
    """Path to a student prompt template with {problem}; empty: the built-in default."""
    teacher_template: str = ""
    """Path to a teacher template with {problem} and {answer}; empty: the built-in default."""
    max_prompt_tokens: int = 4096
    """Rows whose student prompt (chat template and image tokens included) is longer are skipped
    at start-up and counted (prompt_too_long)."""
    check_images: bool = False
    """Open every referenced image at start-up; rows with a missing or undecodable one are
    skipped and counted (missing_image / undecodable_image) instead of failing mid-run."""
    seed: int = 1234
    """Seed of the per-epoch shuffle."""
    eval_file: str = ""
    """Validation set (JSONL or parquet; see docs/evaluation.md), scored every
    trainer.eval_interval steps with the code of tools/evaluate.py; "": no validation."""
    eval_preset: str = "default"
    """Column layout of eval_file: default ({id, problem, answer[, options][, images]}) | mmmu |
    mathvista | mathvision | zerobench | wemath."""


@dataclass
class RolloutConfig:
    group_size: int = 8
    """Responses sampled per prompt (G)."""
    temperature: float = 1.0
    """Sampling temperature. Every log-probability the trainer computes (old and new policy,
    teacher, entropy, divergences) is of the same tempered distribution."""
    top_p: float = 1.0
    max_new_tokens: int = 4096
    vllm_tensor_parallel_size: int = 1
    """Ranks per vLLM engine (its tensor parallelism): engines span this many consecutive ranks,
    which send them identical requests. Must divide the world size."""
    kv_cache_mb: int = 256
    """CPU only: KV cache size per engine."""
    gpu_memory_utilization: float = 0.5
    """GPU only: share of GPU memory vLLM may take (weights + KV cache) while it is awake."""
    weight_bucket_mb: int = 512
    """Upper bound of one weight-sync bucket (a bucket never splits a layer)."""
    truncated_is_cap: float = 0.0
    """> 0: multiply the policy loss by min(pi_old / pi_rollout, cap) per token (TIS)."""
    vllm_log_level: str = "WARNING"
    """Level of vLLM's own log, written to OUTPUT/vllm.log (never the console)."""
    eval_samples: int = 1
    """Validation: responses per question (avg@k / pass@k; > 1 needs eval_temperature > 0)."""
    eval_temperature: float = 0.0
    """Validation sampling temperature (0: greedy)."""
    eval_max_new_tokens: int = 0
    """Validation response budget (0: rollout.max_new_tokens, which bounds it)."""


@dataclass
class AlgorithmConfig:
    loss_mode: str = "rlsd"
    """One of megatron_rlsd.algorithms.LOSS_MODES: rlsd | grpo | opsd | grpo_opsd | sdpo | rlrt |
    antisd | egrsd (docs/algorithm.md)."""
    eps_w: float = 0.2
    """RLSD / RLRT / EGRSD: the evidence weight exp(sign(A) * Delta) is clipped to
    [1 - eps_w, 1 + eps_w] (RLRT: its reversed weight; eps_w = 1 allowed there)."""
    negative_only: bool = False
    """RLSD: reweight only rejected rollouts (A < 0); accepted ones keep A on every token."""
    antisd_lambda_max: float = 0.5
    """AntiSD: the weight of its term while the entropy gate is open."""
    antisd_warmup_steps: int = 5
    """AntiSD: steps at lambda = 0 whose median teacher entropy calibrates the gate."""
    antisd_ratio_down: float = 0.93
    """AntiSD: the gate closes when the median teacher entropy falls below this share of the
    warm-up's, and reopens at the warm-up's."""
    egrsd_floor: float = 0.1
    """EGRSD: lower bound of the teacher-entropy confidence gate on every token's reweighting."""
    lambda_init: float = 0.5
    """RLSD: mixing coefficient between uniform and reweighted credit at the start."""
    lambda_decay_steps: int = 50
    """RLSD: lambda decays linearly to 0 over this many optimizer steps (paper: 50; the
    authors' script: 60); 0 keeps it constant."""
    lambda_warmup_steps: int = 0
    """RLSD: lambda ramps linearly from 0 to lambda_init over this many steps first (as the
    authors' code); the decay starts after it."""
    teacher_refresh_interval: int = 10
    """K: the teacher is a snapshot of the policy refreshed every K optimizer steps (paper 10,
    authors' code 20); 1 = the live policy. Ignored when teacher_ema_rate > 0."""
    teacher_ema_rate: float = 0.0
    """> 0: the teacher is an exponential moving average of the policy, updated after every
    optimizer step as teacher <- (1 - rate) * teacher + rate * policy (SDPO uses 0.05)."""
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 3.0
    """Dual-clip bound c for negative advantages (loss <= -c * A); 0 disables it."""
    loss_agg: str = "token_mean"
    """token_mean (global over the batch) | seq_mean_token_mean"""
    adv_eps: float = 1e-6
    opsd_divergence: str = "jsd"
    """jsd | forward_kl | reverse_kl"""
    opsd_beta: float = 0.5
    grpo_opsd_alpha: float = 0.1
    distill_topk: int = 100
    """opsd / grpo_opsd / sdpo: the teacher's distribution is kept as its top-k tokens plus a tail
    bucket (SDPO's top-k + tail; k log-probs per token instead of the vocabulary); 0 keeps the
    full distribution (exact; memory B x R x V per rank)."""
    opsd_context: str = "solution"
    """opsd / grpo_opsd: the teacher's privileged context. solution: the row's reference solution
    (a reasoning trace, as the RLSD paper ran OPSD; rows without one fall back to the answer,
    counted as `opsd_context_fallback`) | answer: the bare reference answer (RLSD's context)."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    """Clip the global gradient norm (all TP/PP/DP shards) to this; 0 disables clipping."""
    distributed: bool | None = None
    """Shard the optimizer's state over data-parallel ranks (Megatron's distributed optimizer):
    true | false | null (auto: on GPU with Transformer Engine's or Apex's Adam; the plain
    optimizer otherwise)."""


@dataclass
class TrainerConfig:
    steps: int = 200
    prompts_per_step: int = 256
    micro_batch_size: int = 8
    """Sequences per micro-batch in the scoring passes and the update (at most; see
    max_tokens_per_microbatch)."""
    max_tokens_per_microbatch: int = 0
    """> 0: micro-batches are formed by a token budget instead: samples grouped by length, each
    micro-batch padded only to its own longest row and holding at most this many (padded) tokens.
    The loss normalisation is global either way."""
    mini_batches_per_step: int = 1
    """Optimizer steps per rollout batch (PPO-style). 1 (the paper): the old log-probs are the
    current ones, taken from the update's own forward (no separate student pass)."""
    seed: int = 1234
    output_dir: str = "outputs/run"
    save_interval: int = 10
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    warmup_sft_steps: int = 0
    """Supervised steps on the rows' reference solutions before RL (tiny models must learn the
    answer format first). Uses the RL optimizer at `warmup_sft_lr`; its moments are reset after."""
    warmup_sft_lr: float = 1e-3
    tensorboard: bool = True
    eval_interval: int = 0
    """Score data.eval_file every this many steps (0: never); metrics `eval/...`."""
    dump_credit_interval: int = 0
    """Every this many steps, write a few samples' per-token credit and Delta to
    OUTPUT/credit/step_N.jsonl (tools/credit_heatmap.py draws them); 0: never."""
    dump_credit_samples: int = 4
    """Correct and incorrect samples dumped each (per data-parallel rank)."""
    leakage_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_LEAKAGE_PATTERNS))
    """Case-insensitive regular expressions; a response matching one refers to a reference it
    never saw (metric `leakage`: the step's share of such responses). [] turns it off."""
    max_consecutive_nonfinite: int = 3
    """Steps whose loss or gradient norm is not finite are skipped (and counted); after this many
    in a row the run stops, leaving the last good checkpoint as it was."""
    resume: str = "auto"
    """auto: continue from OUTPUT/checkpoints/latest when there is one, else start fresh.
    require: the same, but a missing checkpoint is a config error (a resubmitted job must resume).
    never: start fresh from the model's initial weights.
    A run that starts fresh where a previous run left outputs (checkpoints/, metrics.jsonl,
    tensorboard/, config.json, markers) moves them, never deleting them, into
    OUTPUT/previous-<timestamp>/. A requeued job (Slurm) reruns its config, so do not leave
    `never` in a job that may be requeued: every restart would start over.
    Resuming checks the checkpoint's config (checkpointer.RESUME_MUST_MATCH)."""


@dataclass
class OffloadConfig:
    """What leaves the GPU for pinned host memory while vLLM generates (GPU runs; no effect on
    CPU). Each costs a host round trip of its bytes per step."""

    grads: bool = False
    """Megatron's gradient buffers (fp32, 4 bytes per parameter)."""
    optimizer: bool = False
    """The optimizer's state (fp32 main weights and Adam moments)."""
    teacher: bool = False
    """The teacher snapshot lives in pinned host memory and is copied in for the teacher pass."""


@dataclass
class DemoConfig:
    """The embedded default's own files, made before the run starts (megatron_rlsd/demo.py).
    Production configs leave this section empty."""

    tiny_model: str = ""
    """text | vl: build a tiny random Qwen3 (or Qwen3-VL with its processor) and a locally
    trained tokenizer into model.hf_dir when it holds no config.json; "": off."""
    tiny_layers: int = 4
    tiny_hidden: int = 128
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    synthetic_task: str = ""
    """Write `synthetic_rows` rows of this task into data.train_file when it does not exist:
    add | max | copy (text), or shapes (images of coloured shapes: count_color | count_shape |
    largest_color in turn; each also works alone), images beside the file in images/."""
    synthetic_rows: int = 2000
    synthetic_max_operand: int = 9

    @property
    def enabled(self) -> bool:
        return bool(self.tiny_model or self.synthetic_task)


@dataclass
class FaultInjectionConfig:
    """Fault injection for the test suite only: never set these in a real run."""

    nan_loss_at_steps: str = ""
    """Comma-separated step numbers whose loss is made NaN."""
    crash_in_save_at_step: int = 0
    """While saving the checkpoint of this step every rank SIGKILLs itself (a job losing its
    nodes mid-save); where is `crash_in_save_phase`. 0: off."""
    crash_in_save_phase: str = "published"
    """writing: after this rank's shards are written, before the checkpoint's metadata exists;
    published: after everything is written, before the checkpoint is renamed into place."""


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
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    test_faults: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)


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
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
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
    a, r, t, d = cfg.algorithm, cfg.rollout, cfg.trainer, cfg.demo
    if a.loss_mode not in LOSS_MODES:
        raise ConfigError(f"unknown loss mode {a.loss_mode!r}; choose one of {', '.join(LOSS_MODES)}")
    if r.group_size < 2:
        raise ConfigError(f"rollout.group_size must be >= 2 (group advantages need siblings), got {r.group_size}")
    if not r.temperature > 0:
        raise ConfigError(f"rollout.temperature must be > 0, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if r.vllm_tensor_parallel_size < 1:
        raise ConfigError(f"rollout.vllm_tensor_parallel_size must be >= 1, got {r.vllm_tensor_parallel_size}")
    if not (0 < a.eps_w <= 1 if a.loss_mode == "rlrt" else 0 < a.eps_w < 1):
        raise ConfigError(f"algorithm.eps_w must be in (0, 1) (rlrt: (0, 1]), got {a.eps_w}")
    if a.antisd_lambda_max < 0 or a.antisd_warmup_steps < 1 or not 0 < a.antisd_ratio_down < 1:
        raise ConfigError("algorithm.antisd_lambda_max must be >= 0, antisd_warmup_steps >= 1 and antisd_ratio_down in (0, 1)")
    if not 0 < a.egrsd_floor <= 1:
        raise ConfigError(f"algorithm.egrsd_floor must be in (0, 1], got {a.egrsd_floor}")
    if not 0 <= a.lambda_init <= 1:
        raise ConfigError(f"algorithm.lambda_init must be in [0, 1], got {a.lambda_init}")
    if a.lambda_decay_steps < 0 or a.lambda_warmup_steps < 0:
        raise ConfigError("algorithm.lambda_decay_steps and lambda_warmup_steps must be >= 0")
    if a.teacher_refresh_interval < 1:
        raise ConfigError("algorithm.teacher_refresh_interval must be >= 1 (1 = live policy)")
    if not 0 <= a.teacher_ema_rate < 1:
        raise ConfigError(f"algorithm.teacher_ema_rate must be in [0, 1) (0: off), got {a.teacher_ema_rate}")
    if a.loss_agg not in ("token_mean", "seq_mean_token_mean"):
        raise ConfigError(f"algorithm.loss_agg must be token_mean or seq_mean_token_mean, got {a.loss_agg!r}")
    if a.opsd_divergence not in ("jsd", "forward_kl", "reverse_kl"):
        raise ConfigError(f"algorithm.opsd_divergence must be jsd, forward_kl or reverse_kl, got {a.opsd_divergence!r}")
    if a.opsd_context not in ("solution", "answer"):
        raise ConfigError(f"algorithm.opsd_context must be solution or answer, got {a.opsd_context!r}")
    try:
        LeakageDetector(t.leakage_patterns)
    except ValueError as e:
        raise ConfigError(f"trainer.leakage_patterns: {e}") from None
    if a.distill_topk < 0:
        raise ConfigError(f"algorithm.distill_topk must be >= 0 (0: the full distribution), got {a.distill_topk}")
    if a.dual_clip and a.dual_clip <= 1:
        raise ConfigError(f"algorithm.dual_clip must be > 1 (or 0 to disable), got {a.dual_clip}")
    if t.resume not in RESUME_MODES:
        raise ConfigError(f"trainer.resume must be one of {', '.join(RESUME_MODES)}, got {t.resume!r}")
    if t.steps < 1 or t.prompts_per_step < 1 or t.micro_batch_size < 1 or t.keep_checkpoints < 1:
        raise ConfigError("trainer.steps, prompts_per_step, micro_batch_size and keep_checkpoints must be >= 1")
    if cfg.model.recompute not in ("none", "selective", "full") or cfg.model.recompute_method not in ("uniform", "block"):
        raise ConfigError("model.recompute must be none, selective or full and model.recompute_method uniform or block")
    if cfg.model.recompute_num_layers < 1:
        raise ConfigError("model.recompute_num_layers must be >= 1")
    if t.max_tokens_per_microbatch < 0 or t.mini_batches_per_step < 1:
        raise ConfigError("trainer.max_tokens_per_microbatch must be >= 0 (0: off) and trainer.mini_batches_per_step >= 1")
    if t.eval_interval < 0 or t.dump_credit_interval < 0 or t.dump_credit_samples < 1:
        raise ConfigError("trainer.eval_interval and dump_credit_interval must be >= 0 and dump_credit_samples >= 1")
    if t.eval_interval and not cfg.data.eval_file:
        raise ConfigError("trainer.eval_interval is set but data.eval_file is empty; name a validation file")
    if cfg.data.eval_file and not Path(cfg.data.eval_file).is_file():
        raise ConfigError(f"data.eval_file {cfg.data.eval_file} not found")
    if r.eval_max_new_tokens > r.max_new_tokens:
        raise ConfigError(f"rollout.eval_max_new_tokens={r.eval_max_new_tokens} exceeds rollout.max_new_tokens="
                          f"{r.max_new_tokens} (the engine's length budget); lower it or raise max_new_tokens")  # fmt: skip
    if cfg.model.transformer_impl not in ("auto", "te", "local"):
        raise ConfigError(f"model.transformer_impl must be auto, te or local, got {cfg.model.transformer_impl!r}")
    if cfg.model.params_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.params_dtype must be float32 or bfloat16, got {cfg.model.params_dtype!r}")
    if not cfg.model.hf_dir:
        raise ConfigError("model.hf_dir is required (HF folder with config.json and tokenizer)")
    if d.tiny_model not in ("", "text", "vl"):
        raise ConfigError(f"demo.tiny_model must be text, vl or empty, got {d.tiny_model!r}")
    if not d.tiny_model and not (Path(cfg.model.hf_dir) / "config.json").is_file():
        raise ConfigError(f"model.hf_dir {cfg.model.hf_dir}: config.json not found")
    if cfg.model.init_checkpoint and not Path(cfg.model.init_checkpoint).exists():
        raise ConfigError(f"model.init_checkpoint {cfg.model.init_checkpoint} does not exist")
    if not cfg.data.train_file:
        raise ConfigError("data.train_file is required")
    if not d.synthetic_task and not Path(cfg.data.train_file).is_file():
        raise ConfigError(f"data.train_file {cfg.data.train_file} not found")
    for name in ("student_template", "teacher_template"):
        path = getattr(cfg.data, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"data.{name} {path} not found")
    f = cfg.test_faults
    if f.crash_in_save_at_step < 0 or f.crash_in_save_phase not in ("writing", "published"):
        raise ConfigError("test_faults.crash_in_save_at_step must be >= 0 and crash_in_save_phase writing or published")


RESUME_MODES = ("auto", "require", "never")


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
    if world_size % cfg.rollout.vllm_tensor_parallel_size:
        raise ConfigError(f"rollout.vllm_tensor_parallel_size={cfg.rollout.vllm_tensor_parallel_size} does not divide the "
                          f"world size {world_size}: engines span that many consecutive ranks")  # fmt: skip
    if cfg.trainer.prompts_per_step * cfg.rollout.group_size % par.data_parallel_size(world_size):
        raise ConfigError(
            f"trainer.prompts_per_step * rollout.group_size = {cfg.trainer.prompts_per_step * cfg.rollout.group_size} "
            f"sequences do not split over {par.data_parallel_size(world_size)} data-parallel ranks"
        )


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
