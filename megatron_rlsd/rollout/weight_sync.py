"""Megatron TP/PP shards -> full HF-named tensors, in bounded buckets, on every rank.

Every rank hosts a vLLM engine (see rollout/vllm_engine.py), so every rank needs the full
weights: TP shards are all-gathered inside the TP group, then each pipeline stage broadcasts its
layers over the PP group. Tensors are converted to HF names/layouts and handed over in buckets
that never split a transformer layer (vLLM's in-place reload processes a layer once all of its
tensors have arrived within one call).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rlsd.checkpoint.hf_mapping import ModelMapping, layer_group_key
from megatron_rlsd.models.registry import hf_mapping


def _gather_tp(param: torch.Tensor, canonical: str, mapping: ModelMapping, tp_group) -> torch.Tensor:
    """The full (TP1) tensor of one parameter, on every rank of the TP group."""
    world = dist.get_world_size(tp_group)
    dim = mapping.tp_dim(canonical)
    if world == 1 or dim is None:
        return param.detach()
    shards = [torch.empty_like(param) for _ in range(world)]
    dist.all_gather(shards, param.detach().contiguous(), group=tp_group)
    if mapping.is_gate_up(canonical):
        # each rank holds [gate_r; up_r]: regroup as [gate_0..gate_n; up_0..up_n]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def _stage_layers(model, layer_offset: int, mapping: ModelMapping, tp_group) -> list[list[tuple[str, torch.Tensor]]]:
    """This stage's canonical tensors, TP-merged, grouped per layer (non-layer tensors alone)."""
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        canonical = mapping.canonical_name(name, layer_offset)
        if canonical == mapping.output_layer and mapping.tie_word_embeddings:
            continue  # the last stage's copy of the tied embedding
        groups.setdefault(layer_group_key(canonical), []).append((canonical, _gather_tp(param, canonical, mapping, tp_group)))
    return list(groups.values())


def _broadcast_groups(groups, src_global: int, pp_group, device) -> list[list[tuple[str, torch.Tensor]]]:
    """Broadcast one stage's tensor groups from `src_global` to the PP group (flat buffers)."""
    is_src = dist.get_rank() == src_global
    meta = [[(n, tuple(t.shape), t.dtype) for n, t in g] for g in groups] if is_src else None
    box = [meta]
    dist.broadcast_object_list(box, src=src_global, group=pp_group)
    out = []
    for gi, group_meta in enumerate(box[0]):
        dtype = group_meta[0][2]
        numels = [int(torch.Size(s).numel()) for _, s, _ in group_meta]
        if is_src:
            flat = torch.cat([t.reshape(-1).to(dtype) for _, t in groups[gi]])
        else:
            flat = torch.empty(sum(numels), dtype=dtype, device=device)
        dist.broadcast(flat, src=src_global, group=pp_group)
        pieces = flat.split(numels)
        out.append([(n, p.view(s)) for (n, s, _), p in zip(group_meta, pieces)])
    return out


def iter_hf_buckets(model, shape, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (hf_name, full tensor) of at most ~bucket_bytes, on every rank.

    Collective over the whole world (every rank must iterate to the end)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    pp_size, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    mapping = hf_mapping(shape)
    device = next(model.parameters()).device
    pp_ranks = dist.get_process_group_ranks(pp_group)

    bucket, size = [], 0
    for stage in range(pp_size):
        mine = _stage_layers(model, get_transformer_layer_offset(model.config), mapping, tp_group) if stage == pp_rank else None
        groups = mine if pp_size == 1 else _broadcast_groups(mine, pp_ranks[stage], pp_group, device)
        for group in groups:
            hf_group = []
            for canonical, tensor in group:
                hf_group += mapping.to_hf(canonical, tensor)
                if canonical == mapping.embedding and mapping.tie_word_embeddings:
                    hf_group.append((mapping.lm_head, tensor))  # vLLM keeps its own lm_head
            nbytes = sum(t.numel() * t.element_size() for _, t in hf_group)
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket += hf_group
            size += nbytes
    if bucket:
        yield bucket
