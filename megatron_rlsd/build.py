"""Building what a run trains with: data, model (Megatron DDP), optimizer, rollout engine.

Order matters for failing early: data first (an unusable dataset is a config error before any
model or engine exists), then the model and its optimizer, then vLLM.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_rlsd.config import Config, ConfigError
from megatron_rlsd.platform import Platform


@dataclass
class Components:
    platform: Platform
    model: torch.nn.Module  # this rank's pipeline stage, wrapped in Megatron's DDP
    shape: object  # the architecture (models/qwen3.py Qwen3Shape or a subclass)
    optimizer: object  # Megatron optimizer over `model`
    tokenizer: object
    encoder: object  # chat messages (+ images) -> prompt ids (+ pixels); data/vision.py
    templates: object  # student / teacher prompt templates
    rows: list  # usable prompt rows
    engine: object  # the colocated vLLM engine (None when built without one)
    eval_rows: list = field(default_factory=list)  # validation questions (evaluation.EvalRow)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Partition dimension of the weight of each Megatron tensor-parallel layer kind (by class name, so
# the Transformer Engine variants match too).
_TP_WEIGHT_DIM = {"ColumnParallelLinear": 0, "RowParallelLinear": 1, "VocabParallelEmbedding": 0}


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Flag every TP-split weight as tensor-parallel. Megatron-Core 0.16 sets the flag only while
    it initialises a weight itself (perform_initialization); our weights are loaded instead, and
    without the flag the gradient norm (hence clipping) counts only TP rank 0's shard of them."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for module in model.modules():
        dim = next((d for kind, d in _TP_WEIGHT_DIM.items() if type(module).__name__.endswith(kind)), None)
        weight = getattr(module, "weight", None)
        if dim is not None and isinstance(weight, torch.nn.Parameter) and not getattr(weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def use_distributed_optimizer(choice: bool | None, platform: Platform) -> bool:
    """optim.distributed: Megatron's distributed optimizer (state sharded over DP ranks) with
    Transformer Engine's or Apex's Adam; Megatron-Core 0.16 cannot reload its checkpoints with
    torch's Adam (the per-parameter `step` torch keeps is missing from the saved state), so
    there the plain optimizer is used (auto) or the choice refused. auto: on GPU only."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if choice is None:
        return HAVE_APEX_OR_TE and not platform.is_cpu
    if choice and not HAVE_APEX_OR_TE:
        raise ConfigError("optim.distributed=true needs Transformer Engine's or Apex's Adam (with torch's Adam, "
                          "Megatron-Core 0.16 cannot reload the distributed optimizer's checkpoints); set it to false")  # fmt: skip
    return choice


def build_model(cfg: Config, platform: Platform, hf_config: dict):
    """This rank's pipeline stage with the initial weights (HF folder or model.init_checkpoint),
    wrapped in Megatron's DDP. Returns (model, shape)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_rlsd.checkpoint import dist as ckpt
    from megatron_rlsd.checkpoint.hf_load import load_hf_into_stage
    from megatron_rlsd.models.registry import build_pipeline_stage, use_transformer_engine

    m = cfg.model
    dtype = torch.bfloat16 if m.params_dtype == "bfloat16" else torch.float32
    try:  # a layer implementation or memory options the model cannot take are config errors
        use_te = use_transformer_engine(m.transformer_impl, platform)
        model, shape = build_pipeline_stage(
            hf_config, platform, params_dtype=dtype, init_weights=False, use_te=use_te,
            sequence_parallel=cfg.parallel.sequence_parallel, recompute=m.recompute,
            recompute_method=m.recompute_method, recompute_num_layers=m.recompute_num_layers,
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mark_tensor_parallel_weights(model)
    if cfg.model.init_checkpoint:
        ckpt.load_model_weights(model, cfg.model.init_checkpoint)
    else:
        load_hf_into_stage(model, cfg.model.hf_dir, shape)
    distributed = use_distributed_optimizer(cfg.optim.distributed, platform)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed)  # fmt: skip
    model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    return model, shape


def build_engine(cfg: Config, platform: Platform):
    from megatron_rlsd.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(cfg.model.hf_dir, cfg.rollout, platform, max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                      seed=cfg.trainer.seed, log_file=Path(cfg.trainer.output_dir) / "vllm.log")  # fmt: skip


def build(cfg: Config, platform: Platform, with_engine: bool = True) -> Components:
    """Everything a run needs, on every rank (collective: torch.distributed must be up).
    `with_engine=False` leaves out vLLM (scoring and updates only)."""
    from transformers import AutoTokenizer

    from megatron_rlsd.data import PromptTemplates
    from megatron_rlsd.data.training_set import load_training_rows
    from megatron_rlsd.data.vision import PromptEncoder
    from megatron_rlsd.optimizer import build_optimizer
    from megatron_rlsd.parallel import seed_model_parallel_rng

    seed_everything(cfg.trainer.seed)
    seed_model_parallel_rng(cfg.trainer.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    templates = PromptTemplates.from_files(cfg.data.student_template or None, cfg.data.teacher_template or None)
    hf_config = json.loads((Path(cfg.model.hf_dir) / "config.json").read_text())
    encoder = PromptEncoder(cfg.model.hf_dir, tokenizer, multimodal="vision_config" in hf_config)
    rows = load_training_rows(cfg.data, encoder, templates)
    eval_rows = load_eval_rows(cfg.data) if cfg.data.eval_file else []

    model, shape = build_model(cfg, platform, hf_config)
    optimizer = build_optimizer(cfg.optim, model, bf16=cfg.model.params_dtype == "bfloat16")
    engine = build_engine(cfg, platform) if with_engine else None
    seed_everything(cfg.trainer.seed)  # vLLM's CPU worker reseeds the global generators
    return Components(platform, model, shape, optimizer, tokenizer, encoder, templates, rows, engine, eval_rows)


def load_eval_rows(data_cfg) -> list:
    """The validation questions of data.eval_file (unusable rows are counted and reported)."""
    import torch.distributed as dist

    from megatron_rlsd.evaluation import PRESETS, EvalDataError, load_benchmark

    if data_cfg.eval_preset not in PRESETS:
        raise ConfigError(f"data.eval_preset must be one of {', '.join(PRESETS)}, got {data_cfg.eval_preset!r}")
    try:
        rows, skipped = load_benchmark(data_cfg.eval_file, PRESETS[data_cfg.eval_preset])  # named after the file
    except EvalDataError as e:
        raise ConfigError(f"data.eval_file {e}") from None
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"eval: {data_cfg.eval_file}: {len(rows)} questions, {len(skipped)} skipped", flush=True)
    return rows
