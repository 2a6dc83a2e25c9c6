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


TRANSFORMER_IMPLS = ("auto", "te", "local")


def use_transformer_engine(impl: str, platform) -> bool:
    """Whether to build with the Transformer Engine layer spec (`model.transformer_impl`).

    auto: Transformer Engine on GPU, where it must import (a silent fall-back would train with
    slower kernels and a different fused layout), the local spec on CPU; te: Transformer Engine,
    GPU only; local: Megatron-Core's local spec everywhere. Raises ValueError naming the fix."""
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"model.transformer_impl must be one of {', '.join(TRANSFORMER_IMPLS)}, got {impl!r}")
    if impl == "local" or (impl == "auto" and platform.is_cpu):
        return False
    if platform.is_cpu:
        raise ValueError("model.transformer_impl=te needs CUDA (Transformer Engine has no CPU kernels); use auto or local")
    error = qwen3.transformer_engine_import_error()
    if error:
        raise ValueError(f"Transformer Engine does not import ({error}); install it with `bash tools/setup_env.sh gpu` "
                         f"(or use docker/Dockerfile), or set model.transformer_impl=local to run without it")  # fmt: skip
    return True


def build_pipeline_stage(hf_config: dict, platform, *, params_dtype=None, init_weights: bool = True, use_te: bool = False,
                         **memory):  # fmt: skip
    """This rank's pipeline stage of the model named by `hf_config`, under the current
    Megatron parallel_state (TP/PP already initialised), with the Transformer Engine layer spec
    or the local one (`use_transformer_engine`). `memory`: sequence_parallel, recompute,
    recompute_method, recompute_num_layers (qwen3.transformer_config; ValueError naming the fix
    when they do not fit the model). Returns (model, shape)."""
    import torch
    from megatron.core import parallel_state as ps

    module = model_module(hf_config)
    shape = module.Shape.from_hf_config(hf_config)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    shape.check_parallel(tp, pp)
    config = module.transformer_config(
        shape, platform, tp=tp, pp=pp, params_dtype=params_dtype or torch.float32, init_weights=init_weights, use_te=use_te,
        **memory,
    )
    model = module.build_model(
        shape, config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(), use_te=use_te
    )
    if not platform.is_cpu:
        model.cuda()
    return model, shape
