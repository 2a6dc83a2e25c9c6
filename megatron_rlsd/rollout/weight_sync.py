"""Megatron TP/PP shards -> full HF-named tensors, in bounded buckets, on every rank.

Every rank hosts (a share of) a vLLM engine (see rollout/vllm_engine.py), so every rank needs the
full weights: TP shards are all-gathered inside the TP group, then each pipeline stage broadcasts
its layers over the PP group, one layer at a time as the buckets are consumed. Tensors are
converted to HF names/layouts and handed over in buckets that never split a transformer layer
(vLLM's in-place reload processes a layer once all of its tensors have arrived).
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


def _stage_groups(model, layer_offset: int, mapping: ModelMapping) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """This stage's parameters with their canonical names, grouped per layer (non-layer tensors
    alone), in order. Nothing is gathered yet."""
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        canonical = mapping.canonical_name(name, layer_offset)
        if canonical == mapping.output_layer and mapping.tie_word_embeddings:
            continue  # the last stage's copy of the tied embedding
        groups.setdefault(layer_group_key(canonical), []).append((canonical, param))
    return list(groups.values())


def _full_groups(model, mapping: ModelMapping, stage: int, pp_rank: int, tp_group, pp_group, pp_ranks, device):
    """Stage `stage`'s layer groups of full (TP-merged) tensors, one group at a time, on every
    rank: the owning stage all-gathers a group's TP shards, then broadcasts it (one flat buffer)
    over the pipeline group. At most one group is materialised per call of next()."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    owner = stage == pp_rank
    groups = _stage_groups(model, get_transformer_layer_offset(model.config), mapping) if owner else None
    if pp_ranks is None:  # no pipeline: nothing to broadcast
        for group in groups:
            yield [(n, _gather_tp(p, n, mapping, tp_group)) for n, p in group]
        return
    # the owner announces each group's names, shapes and dtype (full tensors), then sends them
    box = [[[(n, _full_shape(p, n, mapping, tp_group), p.dtype) for n, p in g] for g in groups] if owner else None]
    dist.broadcast_object_list(box, src=pp_ranks[stage], group=pp_group)
    for gi, meta in enumerate(box[0]):
        numels = [int(torch.Size(shape).numel()) for _, shape, _ in meta]
        if owner:
            flat = torch.cat([_gather_tp(p, n, mapping, tp_group).reshape(-1) for n, p in groups[gi]])
        else:
            flat = torch.empty(sum(numels), dtype=meta[0][2], device=device)
        dist.broadcast(flat, src=pp_ranks[stage], group=pp_group)
        yield [(n, piece.view(shape)) for (n, shape, _), piece in zip(meta, flat.split(numels))]


def _full_shape(param: torch.Tensor, canonical: str, mapping: ModelMapping, tp_group) -> tuple[int, ...]:
    shape, dim = list(param.shape), mapping.tp_dim(canonical)
    if dim is not None:
        shape[dim] *= dist.get_world_size(tp_group)
    return tuple(shape)


def iter_hf_buckets(model, shape, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (hf_name, full tensor) of at most ~bucket_bytes, on every rank.

    Streaming: layers are gathered one at a time as the buckets are consumed, so a sync holds at
    most one bucket plus one layer beyond the model's own shards (a bucket never splits a layer;
    a layer larger than the bucket is a bucket of its own). Collective over the whole world:
    every rank must iterate to the end."""
    from megatron.core import parallel_state as ps

    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    pp_size, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    mapping = hf_mapping(shape)
    device = next(model.parameters()).device
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else None

    bucket, size = [], 0
    for stage in range(pp_size):
        for group in _full_groups(model, mapping, stage, pp_rank, tp_group, pp_group, pp_ranks, device):
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
