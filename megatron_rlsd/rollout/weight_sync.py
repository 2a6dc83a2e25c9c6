"""Megatron TP/PP shards -> full HF-named tensors, in bounded buckets, on every rank.

Every rank hosts (a share of) a vLLM engine (see rollout/vllm_engine.py), so every rank needs the
full weights. Per layer: the owning stage's TP ranks broadcast their shards straight into the
layer's full HF tensors, and the stage broadcasts those over the PP group. Layers are produced one
at a time as the buckets are consumed, and a bucket never splits a transformer layer (vLLM's
in-place reload processes a layer once all of its tensors have arrived).
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rlsd.checkpoint.hf_mapping import ModelMapping, layer_group_key
from megatron_rlsd.models.registry import hf_mapping


def _empty(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer a sync allocates comes from here (one place to count them)."""
    return torch.empty(numel, dtype=dtype, device=device)


class _ShardReceiver:
    """Assembles full HF tensors from a parameter's TP shards, written straight into their places
    (`ModelMapping.write_shard`).

    Each TP rank broadcasts its shard in turn; a shard whose place is one contiguous region (a
    plain tensor split along dim 0, e.g. the embedding) is received straight into it, any other
    into one scratch buffer reused for the whole sync, then copied into its pieces. Per-rank
    broadcasts rather than an all-gather: the result lands in place without a list of shards and
    their concatenation, and gloo's broadcast is several times faster than its all-gather on one
    host (NCCL moves the same bytes either way)."""

    def __init__(self, mapping: ModelMapping, tp_group):
        self.mapping, self.group = mapping, tp_group
        self.ranks = dist.get_process_group_ranks(tp_group)
        self.me = dist.get_rank()
        self._scratch: torch.Tensor | None = None

    def full(self, canonical: str, param: torch.Tensor, hf: list[torch.Tensor]) -> None:
        """Write the full tensor of `param` (this rank's shard) into the HF tensors `hf`."""
        shard, world = param.detach(), len(self.ranks)
        if world == 1 or self.mapping.tp_dim(canonical) is None:
            self.mapping.write_shard(canonical, shard, 0, 1, hf)
            return
        for r, src in enumerate(self.ranks):
            place = self.mapping.shard_place(canonical, r, world, hf)
            buf = shard if src == self.me else place if place is not None else self._scratch_like(shard)
            dist.broadcast(buf, src=src, group=self.group)
            if buf is not place:
                self.mapping.write_shard(canonical, buf, r, world, hf)

    def _scratch_like(self, t: torch.Tensor) -> torch.Tensor:
        s = self._scratch
        if s is None or s.numel() < t.numel() or s.dtype != t.dtype:
            s = self._scratch = _empty(t.numel(), t.dtype, t.device)  # host: fresh pages cost faults
        return s[: t.numel()].view(t.shape)


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


def _layout(group, mapping: ModelMapping, tp_size: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The full HF tensors a group becomes, in order: (name, shape, dtype). Each keeps its
    parameter's dtype (a bf16 model's norms may be fp32)."""
    layout = []
    for canonical, param in group:
        shape, dim = list(param.shape), mapping.tp_dim(canonical)
        if dim is not None:
            shape[dim] *= tp_size
        layout += [(name, hf_shape, param.dtype) for name, hf_shape in mapping.hf_shapes(canonical, tuple(shape))]
    return layout


def _stage_groups_planned(model, mapping: ModelMapping, stage: int, pp_rank: int, tp_group, pp_group, pp_ranks, device):
    """Stage `stage`'s layer groups, as (bytes, produce) in order, on every rank; `produce()`
    runs the group's collectives and returns its full HF tensors. Sizes come first, so that a
    bucket can be handed over before the next group is materialised; every rank must produce the
    groups in this order.

    The owning stage's TP ranks write their shards straight into the group's full HF tensors,
    which are then broadcast as they are over the pipeline group: a group costs its own bytes once
    (plus one shard of scratch), not the shards, their concatenation and a flattened copy. Each
    HF tensor is its own allocation, so vLLM can free each as it is loaded."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    owner = stage == pp_rank
    tp_size = dist.get_world_size(tp_group)
    groups = _stage_groups(model, get_transformer_layer_offset(model.config), mapping) if owner else None
    receiver = _ShardReceiver(mapping, tp_group) if owner else None
    # the owner announces each group's HF names, shapes and dtypes; the others allocate to match
    box = [[_layout(g, mapping, tp_size) for g in groups] if owner else None]
    if pp_ranks is not None:
        dist.broadcast_object_list(box, src=pp_ranks[stage], group=pp_group)

    def produce(gi: int, pieces) -> list[tuple[str, torch.Tensor]]:
        hf = [_empty(torch.Size(shape).numel(), dtype, device).view(shape) for _, shape, dtype in pieces]
        if owner:
            at = 0
            for canonical, param in groups[gi]:
                n = len(mapping.hf_sources(canonical))
                receiver.full(canonical, param, hf[at : at + n])
                at += n
        if pp_ranks is not None:
            for t in hf:
                dist.broadcast(t, src=pp_ranks[stage], group=pp_group)
        # largest first: a consumer's loop variable keeps the last tensor it read alive while the
        # next group is gathered, so let that be a norm weight rather than a projection
        order = sorted(range(len(hf)), key=lambda i: -hf[i].numel())
        return [(pieces[i][0], hf[i]) for i in order]

    for gi, pieces in enumerate(box[0]):
        nbytes = sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in pieces)
        yield nbytes, functools.partial(produce, gi, pieces)


def iter_hf_buckets(model, shape, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (hf_name, full tensor) of at most ~bucket_bytes, on every rank.

    Streaming: a bucket is handed over before the next layer is gathered, so a sync holds one
    bucket (plus one TP shard of scratch) beyond the model's own shards; the consumer's own
    working memory (vLLM's per-module reload) comes on top. A bucket never splits a layer; a
    layer larger than the bucket is a bucket of its own. Collective over the whole world: every
    rank must iterate to the end."""
    from megatron.core import parallel_state as ps

    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    pp_size, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    mapping = hf_mapping(shape)
    device = next(model.parameters()).device
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else None
    tied = mapping.hf_sources(mapping.embedding)[0] if mapping.tie_word_embeddings else None

    bucket, size = [], 0
    for stage in range(pp_size):
        for nbytes, produce in _stage_groups_planned(model, mapping, stage, pp_rank, tp_group, pp_group, pp_ranks, device):
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            group = produce()
            bucket += [(mapping.lm_head, t) for n, t in group if n == tied] + group  # vLLM keeps its own lm_head
            size += nbytes
    if bucket:
        yield bucket
