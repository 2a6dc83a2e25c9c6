"""Declarative Hugging Face <-> Megatron-Core name and layout mapping (Qwen3, Qwen3-VL).

Names on the Megatron side are *canonical* names: the TP1/PP1 parameter names of the Transformer
Engine layer spec with global layer indices (`decoder.layers.3.self_attention.linear_qkv.weight`).
They equal the keys of Megatron's `sharded_state_dict` of a TP1/PP1 model, and the local
(non-TE) spec's module names map onto them through `LOCAL_TO_CANONICAL`. Tensors on the Megatron
side are full (TP-merged) tensors, which is also what dist_checkpointing stores.

Each model is a `ModelMapping`: blocks of `Rule`s, a block repeated per layer (`{}` in the names)
or not. Three layouts differ from HF:
- `qkv`: HF has separate q/k/v projections; Megatron fuses them as [groups, q_per_group + 2,
  head_dim, ...] so that a TP split along dim 0 keeps whole query groups on one rank.
- `packed_qkv`: HF's ViT already fuses them, but as [3, heads, head_dim, ...]; regrouped the same.
- `gate_up`: Megatron stores [gate; up] stacked along dim 0 (each TP rank holds [gate_r; up_r],
  and the sharded checkpoint format stores the global [gate; up]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

LAYER = "{}"
DIRECT, QKV, PACKED_QKV, GATE_UP = "direct", "qkv", "packed_qkv", "gate_up"

# The local (non-TE) spec names its layer norms as modules; TE folds them into the linears.
LOCAL_TO_CANONICAL = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".input_layernorm.bias": ".self_attention.linear_qkv.layer_norm_bias",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
    ".pre_mlp_layernorm.bias": ".mlp.linear_fc1.layer_norm_bias",
}
_INDEXED = re.compile(r"^(.*?(?:layers|blocks|deepstack_mergers|deepstack_merger_list)\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class AttentionLayout:
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @property
    def q_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class Rule:
    megatron: str  # canonical name template
    hf: tuple[str, ...]  # HF name templates, in the order the layout combines them
    kind: str = DIRECT
    tp_dim: int | None = None  # dimension Megatron splits over TP ranks (None: replicated)
    layout: AttentionLayout | None = None  # for qkv / packed_qkv


@dataclass(frozen=True)
class Block:
    rules: tuple[Rule, ...]
    count: int | None = None  # repeated for indices 0..count-1, or once


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: AttentionLayout, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF q [heads*d, ...], k/v [groups*d, ...] -> Megatron fused [groups*(qpg+2)*d, ...] (weights
    and biases alike). Written into `out` when given (e.g. a memory-mapped buffer), no temporary."""
    g, d, rest = lay.num_key_value_heads, lay.head_dim, tuple(q.shape[1:])
    _check_shape("q_proj", q, (lay.num_attention_heads * d, *rest))
    _check_shape("k_proj", k, (g * d, *rest))
    _check_shape("v_proj", v, (g * d, *rest))
    qd = lay.q_per_group * d
    if out is None:
        out = torch.empty(g * (qd + 2 * d), *rest, dtype=q.dtype)
    grouped = out.view(g, qd + 2 * d, *rest)
    grouped[:, :qd] = q.reshape(g, qd, *rest)
    grouped[:, qd : qd + d] = k.reshape(g, d, *rest)
    grouped[:, qd + d :] = v.reshape(g, d, *rest)
    return out


def split_qkv(qkv: torch.Tensor, lay: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv` (works on a TP shard too: groups are whole on each rank)."""
    d, rest = lay.head_dim, tuple(qkv.shape[1:])
    per_group = (lay.q_per_group + 2) * d
    if qkv.shape[0] % per_group:
        raise ValueError(f"linear_qkv rows {qkv.shape[0]} are not a multiple of (q_per_group+2)*head_dim={per_group}")
    grouped = qkv.reshape(-1, per_group, *rest)
    q, k, v = torch.split(grouped, [lay.q_per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"shape mismatch for {name}: checkpoint has {tuple(t.shape)}, config implies {expected}")


def split_layer(name: str) -> tuple[str, int | None]:
    """'decoder.layers.3.mlp.x' -> ('decoder.layers.{}.mlp.x', 3); other names -> (name, None)."""
    m = _INDEXED.match(name)
    if not m:
        return name, None
    return m.group(1) + LAYER + m.group(3), int(m.group(2))


def layer_group_key(name: str) -> str:
    """Names sharing this key belong to one layer (or are one top-level tensor)."""
    template, layer = split_layer(name)
    return f"{template.split(LAYER)[0]}{layer}" if layer is not None else name


class ModelMapping:
    """The mapping of one model: lookup by canonical name, conversion in both directions."""

    def __init__(self, blocks: list[Block], *, tie_word_embeddings: bool, pipelined_prefix: str,
                 embedding: str, output_layer: str, lm_head: str):  # fmt: skip
        self.blocks = blocks
        self.tie_word_embeddings = tie_word_embeddings
        self.pipelined_prefix = pipelined_prefix  # the decoder layers split over pipeline stages
        self.embedding, self.output_layer, self.lm_head = embedding, output_layer, lm_head
        self._rules = {r.megatron: r for b in blocks for r in b.rules}

    def rule(self, canonical: str) -> Rule:
        template, _ = split_layer(canonical)
        if template not in self._rules:
            raise KeyError(f"no HF mapping for Megatron tensor {canonical!r}")
        return self._rules[template]

    def canonical_name(self, megatron_name: str, layer_offset: int = 0) -> str:
        """A model parameter name (local or TE spec, stage-local layer index) -> canonical name."""
        for local, canonical in LOCAL_TO_CANONICAL.items():
            if megatron_name.endswith(local):
                megatron_name = megatron_name[: -len(local)] + canonical
        if layer_offset and megatron_name.startswith(self.pipelined_prefix):
            rest = megatron_name[len(self.pipelined_prefix) :]
            index, tail = rest.split(".", 1)
            megatron_name = f"{self.pipelined_prefix}{int(index) + layer_offset}.{tail}"
        return megatron_name

    def hf_sources(self, canonical: str) -> tuple[str, ...]:
        """The HF tensor names that make up one canonical Megatron tensor."""
        _, layer = split_layer(canonical)
        return tuple(n.format(layer) if layer is not None else n for n in self.rule(canonical).hf)

    def tp_dim(self, canonical: str) -> int | None:
        return self.rule(canonical).tp_dim

    def is_gate_up(self, canonical: str) -> bool:
        return self.rule(canonical).kind == GATE_UP

    def canonical_names(self) -> list[str]:
        """Every canonical Megatron tensor of the model, in checkpoint order."""
        names = []
        for block in self.blocks:
            for index in range(block.count) if block.count is not None else [None]:
                for rule in block.rules:
                    if rule.megatron == self.output_layer and self.tie_word_embeddings:
                        continue
                    names.append(rule.megatron.format(index) if index is not None else rule.megatron)
        return names

    def hf_names(self) -> set[str]:
        return {n for c in self.canonical_names() for n in self.hf_sources(c)}

    def to_megatron(
        self,
        canonical: str,
        hf: Callable[[str], torch.Tensor],
        alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = lambda shape, dtype: torch.empty(shape, dtype=dtype),
    ) -> torch.Tensor:
        """Build one canonical Megatron tensor from HF tensors fetched by name through `hf`.

        Direct tensors are returned as fetched; fused ones are written into `alloc(shape, dtype)`."""
        rule = self.rule(canonical)
        sources = [hf(n) for n in self.hf_sources(canonical)]
        if rule.kind == QKV:
            q, k, v = sources
            out = alloc((q.shape[0] + k.shape[0] + v.shape[0], *q.shape[1:]), q.dtype)
            return merge_qkv(q, k, v, rule.layout, out=out)
        if rule.kind == PACKED_QKV:
            (packed,) = sources
            if packed.shape[0] % 3:
                raise ValueError(f"shape mismatch for {self.hf_sources(canonical)[0]}: {tuple(packed.shape)} is not 3 x ...")
            q, k, v = packed.chunk(3, dim=0)
            return merge_qkv(q, k, v, rule.layout, out=alloc(tuple(packed.shape), packed.dtype))
        if rule.kind == GATE_UP:
            gate, up = sources
            if gate.shape != up.shape:
                raise ValueError(f"shape mismatch: gate_proj {tuple(gate.shape)} vs up_proj {tuple(up.shape)}")
            out = alloc((2 * gate.shape[0], *gate.shape[1:]), gate.dtype)
            out[: gate.shape[0]] = gate
            out[gate.shape[0] :] = up
            return out
        return sources[0]

    def to_hf(self, canonical: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """One canonical Megatron tensor -> [(hf_name, tensor), ...]."""
        rule, names = self.rule(canonical), self.hf_sources(canonical)
        if rule.kind == QKV:
            return list(zip(names, split_qkv(tensor, rule.layout)))
        if rule.kind == PACKED_QKV:
            return [(names[0], torch.cat(split_qkv(tensor, rule.layout), dim=0))]
        if rule.kind == GATE_UP:
            return list(zip(names, torch.chunk(tensor, 2, dim=0)))
        return [(names[0], tensor)]

    def hf_shapes(self, canonical: str, full_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """The HF tensors one full canonical tensor of `full_shape` becomes, as (name, shape), in
        `to_hf`'s order: what a buffer must hold to receive them."""
        rule, names = self.rule(canonical), self.hf_sources(canonical)
        rows, rest = full_shape[0], tuple(full_shape[1:])
        if rule.kind == QKV:
            d, per_group = rule.layout.head_dim, (rule.layout.q_per_group + 2) * rule.layout.head_dim
            groups = rows // per_group
            return list(zip(names, [(groups * rule.layout.q_per_group * d, *rest), (groups * d, *rest), (groups * d, *rest)]))
        if rule.kind == GATE_UP:
            return [(n, (rows // 2, *rest)) for n in names]
        return [(names[0], tuple(full_shape))]

    def write_shard(self, canonical: str, shard: torch.Tensor, tp_rank: int, tp_size: int, hf: list[torch.Tensor]) -> None:
        """Copy TP rank `tp_rank`'s shard of a canonical tensor into its places in the full HF
        tensors `hf` (`hf_shapes`' order; e.g. views of one flat buffer). Together, the shards of
        all ranks write `to_hf(full)`; with tp_size 1 the shard is the full tensor. No temporaries:
        each piece is copied from a view of the shard into a view of its destination."""
        rule = self.rule(canonical)
        if tp_size == 1 or rule.tp_dim is None:
            tp_rank, tp_size = 0, 1

        def mine(t: torch.Tensor, dim: int = 0) -> torch.Tensor:  # this rank's slice of a full tensor
            return t.chunk(tp_size, dim=dim)[tp_rank] if tp_size > 1 else t

        if rule.kind in (QKV, PACKED_QKV):
            lay, rest = rule.layout, tuple(shard.shape[1:])
            d, qd = lay.head_dim, lay.q_per_group * lay.head_dim
            grouped = shard.view(-1, qd + 2 * d, *rest)  # whole query groups on each rank
            q, k, v = hf if rule.kind == QKV else hf[0].chunk(3, dim=0)
            for dst, src in ((q, grouped[:, :qd]), (k, grouped[:, qd : qd + d]), (v, grouped[:, qd + d :])):
                mine(dst.view(-1, src.shape[1], *rest)).copy_(src)
        elif rule.kind == GATE_UP:
            for dst, src in zip(hf, shard.chunk(2, dim=0)):  # [gate_r; up_r]
                mine(dst).copy_(src)
        else:
            mine(hf[0], rule.tp_dim or 0).copy_(shard)

    def shard_place(self, canonical: str, tp_rank: int, tp_size: int, hf: list[torch.Tensor]) -> torch.Tensor | None:
        """Where `write_shard` would put rank `tp_rank`'s shard when that is one contiguous region
        of `hf` (a plain tensor split along dim 0): a shard can be received straight into it. None
        when the shard lands in pieces."""
        rule = self.rule(canonical)
        if rule.kind != DIRECT or rule.tp_dim != 0:
            return None
        return hf[0].chunk(tp_size, dim=0)[tp_rank] if tp_size > 1 else hf[0]

    def tp_shard(self, full: torch.Tensor, canonical: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This TP rank's slice of a full canonical tensor (inverse of gathering the shards)."""
        dim = self.tp_dim(canonical)
        if tp_size == 1 or dim is None:
            return full
        if self.is_gate_up(canonical):  # [gate; up] -> [gate_r; up_r]
            gate, up = full.chunk(2, dim=0)
            return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
        return full.chunk(tp_size, dim=dim)[tp_rank]


def _decoder_layer_rules(meg: str, hf: str, lay: AttentionLayout) -> tuple[Rule, ...]:
    """A Qwen3 decoder layer: `meg`/`hf` are the layer-name prefixes ending in '{}.'."""
    return (
        Rule(f"{meg}self_attention.linear_qkv.layer_norm_weight", (f"{hf}input_layernorm.weight",)),
        Rule(f"{meg}self_attention.q_layernorm.weight", (f"{hf}self_attn.q_norm.weight",)),
        Rule(f"{meg}self_attention.k_layernorm.weight", (f"{hf}self_attn.k_norm.weight",)),
        Rule(f"{meg}self_attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",), tp_dim=1),
        Rule(f"{meg}mlp.linear_fc1.layer_norm_weight", (f"{hf}post_attention_layernorm.weight",)),
        Rule(f"{meg}mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",), tp_dim=1),
        Rule(f"{meg}self_attention.linear_qkv.weight",
             (f"{hf}self_attn.q_proj.weight", f"{hf}self_attn.k_proj.weight", f"{hf}self_attn.v_proj.weight"),
             QKV, tp_dim=0, layout=lay),  # fmt: skip
        Rule(f"{meg}mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), GATE_UP, tp_dim=0),
    )


def _language_model_blocks(shape, meg: str, hf_model: str) -> list[Block]:
    lay = AttentionLayout(shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim)
    return [
        Block((Rule(f"{meg}embedding.word_embeddings.weight", (f"{hf_model}embed_tokens.weight",), tp_dim=0),)),
        Block(_decoder_layer_rules(f"{meg}decoder.layers.{{}}.", f"{hf_model}layers.{{}}.", lay), shape.num_layers),
        Block((
            Rule(f"{meg}decoder.final_layernorm.weight", (f"{hf_model}norm.weight",)),
            Rule(f"{meg}output_layer.weight", ("lm_head.weight",), tp_dim=0),
        )),  # fmt: skip
    ]


def qwen3_mapping(shape) -> ModelMapping:
    return ModelMapping(
        _language_model_blocks(shape, "", "model."),
        tie_word_embeddings=shape.tie_word_embeddings,
        pipelined_prefix="decoder.layers.",
        embedding="embedding.word_embeddings.weight",
        output_layer="output_layer.weight",
        lm_head="lm_head.weight",
    )


def _linear(meg: str, hf: str, tp_dim: int | None) -> tuple[Rule, Rule]:
    """weight + bias of a biased linear; a row-parallel linear (tp_dim 1) keeps its bias whole."""
    return (Rule(f"{meg}.weight", (f"{hf}.weight",), tp_dim=tp_dim),
            Rule(f"{meg}.bias", (f"{hf}.bias",), tp_dim=0 if tp_dim == 0 else None))  # fmt: skip


def _norm(meg_weight: str, meg_bias: str, hf: str) -> tuple[Rule, Rule]:
    return Rule(meg_weight, (f"{hf}.weight",)), Rule(meg_bias, (f"{hf}.bias",))


def _merger_rules(meg: str, hf: str) -> tuple[Rule, ...]:
    return (*_norm(f"{meg}norm.weight", f"{meg}norm.bias", f"{hf}norm"),
            *_linear(f"{meg}linear_fc1", f"{hf}linear_fc1", 0), *_linear(f"{meg}linear_fc2", f"{hf}linear_fc2", 1))  # fmt: skip


def qwen3_vl_mapping(shape) -> ModelMapping:
    v = shape.vision
    lay = AttentionLayout(v.num_heads, v.num_heads, v.head_dim)
    meg, hf = "vision_model.decoder.layers.{}.", "model.visual.blocks.{}."
    vision_layer = (
        *_norm(f"{meg}self_attention.linear_qkv.layer_norm_weight", f"{meg}self_attention.linear_qkv.layer_norm_bias",
               f"{hf}norm1"),  # fmt: skip
        Rule(f"{meg}self_attention.linear_qkv.weight", (f"{hf}attn.qkv.weight",), PACKED_QKV, tp_dim=0, layout=lay),
        Rule(f"{meg}self_attention.linear_qkv.bias", (f"{hf}attn.qkv.bias",), PACKED_QKV, tp_dim=0, layout=lay),
        *_linear(f"{meg}self_attention.linear_proj", f"{hf}attn.proj", 1),
        *_norm(f"{meg}mlp.linear_fc1.layer_norm_weight", f"{meg}mlp.linear_fc1.layer_norm_bias", f"{hf}norm2"),
        *_linear(f"{meg}mlp.linear_fc1", f"{hf}mlp.linear_fc1", 0),
        *_linear(f"{meg}mlp.linear_fc2", f"{hf}mlp.linear_fc2", 1),
    )
    vision = [
        Block((*_linear("vision_model.patch_embed.proj", "model.visual.patch_embed.proj", None),
               Rule("vision_model.pos_embed.weight", ("model.visual.pos_embed.weight",)))),  # fmt: skip
        Block(vision_layer, v.depth),
        Block(_merger_rules("vision_model.merger.", "model.visual.merger.")),
        Block(_merger_rules("vision_model.deepstack_mergers.{}.", "model.visual.deepstack_merger_list.{}."),
              len(v.deepstack_visual_indexes)),  # fmt: skip
    ]
    return ModelMapping(
        vision + _language_model_blocks(shape, "language_model.", "model.language_model."),
        tie_word_embeddings=shape.tie_word_embeddings,
        pipelined_prefix="language_model.decoder.layers.",
        embedding="language_model.embedding.word_embeddings.weight",
        output_layer="language_model.output_layer.weight",
        lm_head="lm_head.weight",
    )
