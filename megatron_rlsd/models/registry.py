"""Which HF architectures the recipe supports, keyed by `config.json`'s `architectures[0]`."""

from __future__ import annotations

from types import ModuleType

from megatron_rlsd.models import qwen3, qwen3_vl

# Each module provides: ARCHITECTURE, Shape (from_hf_config, check_parallel), transformer_config,
# build_model, hf_mapping.
ARCHITECTURES: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (qwen3, qwen3_vl)}


def architecture_of(hf_config: dict, source: str = "config.json") -> str:
    archs = hf_config.get("architectures") or []
    if not archs:
        raise ValueError(f"{source} has no 'architectures' entry; cannot tell which model this is")
    if archs[0] not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {archs[0]!r} in {source}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return archs[0]


def model_module(hf_config: dict, source: str = "config.json") -> ModuleType:
    return ARCHITECTURES[architecture_of(hf_config, source)]


def hf_mapping(shape):
    """The HF <-> Megatron name mapping for a model shape."""
    module = qwen3_vl if isinstance(shape, qwen3_vl.Qwen3VLShape) else qwen3
    return module.hf_mapping(shape)


def build_pipeline_stage(hf_config: dict, platform, *, params_dtype=None, init_weights: bool = True, use_te: bool | None = None):
    """This rank's pipeline stage of the model named by `hf_config`, under the current
    Megatron parallel_state (TP/PP already initialised). Returns (model, shape)."""
    import torch
    from megatron.core import parallel_state as ps

    module = model_module(hf_config)
    shape = module.Shape.from_hf_config(hf_config)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    shape.check_parallel(tp, pp)
    if use_te is None:
        use_te = not platform.is_cpu and qwen3.transformer_engine_available()
    config = module.transformer_config(
        shape, platform, tp=tp, pp=pp, params_dtype=params_dtype or torch.float32, init_weights=init_weights
    )
    model = module.build_model(
        shape, config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(), use_te=use_te
    )
    if not platform.is_cpu:
        model.cuda()
    return model, shape
