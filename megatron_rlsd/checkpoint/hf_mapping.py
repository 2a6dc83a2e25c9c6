"""Declarative Hugging Face <-> Megatron-Core name and layout mapping for Qwen3.

Names on the Megatron side are *canonical* names: the TP1/PP1 parameter names of the Transformer
Engine layer spec with global layer indices (`decoder.layers.3.self_attention.linear_qkv.weight`).
They equal the keys of Megatron's `sharded_state_dict` once the layer index is folded into the
stacked layer axis, and the local (non-TE) spec's module names map onto them through
`LOCAL_TO_CANONICAL`. Tensors on the Megatron side are full (TP-merged) tensors, which is also
what dist_checkpointing stores as the global tensor.

Two layouts differ from HF:
- QKV: HF has separate q/k/v projections; Megatron fuses them as [groups, q_per_group + 2, head_dim,
  hidden] so that a TP split along dim 0 keeps whole query groups on one rank.
- fc1: Megatron stores [gate; up] stacked along dim 0 (each TP rank holds [gate_r; up_r], and the
  sharded checkpoint format stores the global [gate; up]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

LAYER = "{}"

# canonical Megatron name -> HF name (one to one, same layout)
DIRECT: dict[str, str] = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.layers.{}.self_attention.linear_qkv.layer_norm_weight": "model.layers.{}.input_layernorm.weight",
    "decoder.layers.{}.self_attention.q_layernorm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "decoder.layers.{}.self_attention.k_layernorm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "decoder.layers.{}.self_attention.linear_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "decoder.layers.{}.mlp.linear_fc1.layer_norm_weight": "model.layers.{}.post_attention_layernorm.weight",
    "decoder.layers.{}.mlp.linear_fc2.weight": "model.layers.{}.mlp.down_proj.weight",
}

QKV = "decoder.layers.{}.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.{}.mlp.linear_fc1.weight"
QKV_HF = ("model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.self_attn.k_proj.weight",
          "model.layers.{}.self_attn.v_proj.weight")  # fmt: skip
FC1_HF = ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight")

# Dimension along which Megatron splits each tensor over TP ranks (absent: replicated).
TP_SPLIT_DIM: dict[str, int] = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    QKV: 0,
    FC1: 0,
    "decoder.layers.{}.self_attention.linear_proj.weight": 1,
    "decoder.layers.{}.mlp.linear_fc2.weight": 1,
}

# The local (non-TE) spec names its layer norms as modules; TE folds them into the linears.
LOCAL_TO_CANONICAL = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class AttentionLayout:
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @property
    def q_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: AttentionLayout, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF q [heads*d, h], k/v [groups*d, h] -> Megatron fused [groups*(qpg+2)*d, h].

    Written into `out` when given (e.g. a memory-mapped buffer), with no temporary."""
    g, d, hidden = lay.num_key_value_heads, lay.head_dim, q.shape[-1]
    _check_shape("q_proj", q, (lay.num_attention_heads * d, hidden))
    _check_shape("k_proj", k, (g * d, hidden))
    _check_shape("v_proj", v, (g * d, hidden))
    qd = lay.q_per_group * d
    if out is None:
        out = torch.empty(g * (qd + 2 * d), hidden, dtype=q.dtype)
    grouped = out.view(g, qd + 2 * d, hidden)
    grouped[:, :qd] = q.reshape(g, qd, hidden)
    grouped[:, qd : qd + d] = k.reshape(g, d, hidden)
    grouped[:, qd + d :] = v.reshape(g, d, hidden)
    return out


def split_qkv(qkv: torch.Tensor, lay: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv` (works on a TP shard too: groups are whole on each rank)."""
    d, hidden = lay.head_dim, qkv.shape[-1]
    per_group = (lay.q_per_group + 2) * d
    if qkv.shape[0] % per_group:
        raise ValueError(f"linear_qkv rows {qkv.shape[0]} are not a multiple of (q_per_group+2)*head_dim={per_group}")
    grouped = qkv.reshape(-1, per_group, hidden)
    q, k, v = torch.split(grouped, [lay.q_per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"shape mismatch for {name}: checkpoint has {tuple(t.shape)}, config implies {expected}")


def canonical_name(megatron_name: str, layer_offset: int = 0) -> str:
    """A model parameter name (local or TE spec, stage-local layer index) -> canonical name."""
    for local, canonical in LOCAL_TO_CANONICAL.items():
        if megatron_name.endswith(local):
            megatron_name = megatron_name[: -len(local)] + canonical
    if layer_offset:
        megatron_name = re.sub(
            r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", megatron_name
        )
    return megatron_name


def split_layer(name: str) -> tuple[str, int | None]:
    """'decoder.layers.3.mlp.x' -> ('decoder.layers.{}.mlp.x', 3); other names -> (name, None)."""
    m = re.match(r"^(decoder\.layers\.|model\.layers\.)(\d+)(\..*)$", name)
    if not m:
        return name, None
    return m.group(1) + LAYER + m.group(3), int(m.group(2))


def hf_sources(canonical: str) -> tuple[str, ...]:
    """The HF tensor names that make up one canonical Megatron tensor."""
    template, layer = split_layer(canonical)
    if template in DIRECT:
        names = (DIRECT[template],)
    elif template == QKV:
        names = QKV_HF
    elif template == FC1:
        names = FC1_HF
    else:
        raise KeyError(f"no HF mapping for Megatron tensor {canonical!r}")
    return tuple(n.format(layer) if layer is not None else n for n in names)


def is_fused(canonical: str) -> bool:
    """True where one Megatron tensor is assembled from several HF tensors."""
    return split_layer(canonical)[0] in (QKV, FC1)


def to_megatron(
    canonical: str,
    hf: Callable[[str], torch.Tensor],
    lay: AttentionLayout,
    alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = lambda shape, dtype: torch.empty(shape, dtype=dtype),
) -> torch.Tensor:
    """Build one canonical Megatron tensor from HF tensors fetched by name through `hf`.

    Direct tensors are returned as fetched; fused ones are written into `alloc(shape, dtype)`."""
    template, _ = split_layer(canonical)
    sources = [hf(n) for n in hf_sources(canonical)]
    if template == QKV:
        q, k, v = sources
        return merge_qkv(q, k, v, lay, out=alloc((q.shape[0] + k.shape[0] + v.shape[0], q.shape[1]), q.dtype))
    if template == FC1:
        gate, up = sources
        if gate.shape != up.shape:
            raise ValueError(f"shape mismatch: gate_proj {tuple(gate.shape)} vs up_proj {tuple(up.shape)}")
        out = alloc((2 * gate.shape[0], gate.shape[1]), gate.dtype)
        out[: gate.shape[0]] = gate
        out[gate.shape[0] :] = up
        return out
    return sources[0]


def to_hf(canonical: str, tensor: torch.Tensor, lay: AttentionLayout) -> list[tuple[str, torch.Tensor]]:
    """One canonical Megatron tensor -> [(hf_name, tensor), ...]."""
    template, _ = split_layer(canonical)
    names = hf_sources(canonical)
    if template == QKV:
        return list(zip(names, split_qkv(tensor, lay)))
    if template == FC1:
        return list(zip(names, torch.chunk(tensor, 2, dim=0)))
    return [(names[0], tensor)]


def canonical_names(num_layers: int, tie_word_embeddings: bool) -> list[str]:
    """Every canonical Megatron tensor of a Qwen3 model, in checkpoint order."""
    names = ["embedding.word_embeddings.weight"]
    per_layer = [t for t in DIRECT if LAYER in t] + [QKV, FC1]
    for i in range(num_layers):
        names += [t.format(i) for t in per_layer]
    names.append("decoder.final_layernorm.weight")
    if not tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def tp_shard(full: torch.Tensor, canonical: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full canonical tensor (inverse of gathering the shards)."""
    template, _ = split_layer(canonical)
    if tp_size == 1 or template not in TP_SPLIT_DIM:
        return full
    if template == FC1:  # [gate; up] -> [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=TP_SPLIT_DIM[template])[tp_rank]
