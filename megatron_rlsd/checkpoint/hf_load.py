"""Load HF safetensors straight into this rank's Megatron stage (TP slice, stage layers).

Used to start training from an HF folder without a conversion step: every rank memory-maps the
files and copies only its own slices.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_rlsd.checkpoint.safetensors_io import HFWeights
from megatron_rlsd.models.registry import hf_mapping


@torch.no_grad()
def load_hf_into_stage(model: torch.nn.Module, hf_dir: str | Path, shape) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    weights = HFWeights(hf_dir)
    mapping = hf_mapping(shape)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    offset = get_transformer_layer_offset(model.config)  # this stage's first decoder layer
    for name, param in model.named_parameters():
        canonical = mapping.canonical_name(name, offset)
        if canonical == mapping.output_layer and shape.tie_word_embeddings:
            canonical = mapping.embedding  # the last stage's copy of the tied embedding
        full = mapping.to_megatron(canonical, weights.get)
        part = mapping.tp_shard(full, canonical, tp_rank, tp_size)
        if part.shape != param.shape:
            raise ValueError(f"shape mismatch for {canonical}: {hf_dir} gives {tuple(part.shape)}, model has {tuple(param.shape)}")
        param.copy_(part)
