"""Qwen3-VL on Megatron-Core, built from a Hugging Face `config.json`.

Qwen3-VL = a ViT (Conv3d patch embedding, learned position table resampled to each image's grid,
2D rotary, LayerNorm/GELU-tanh blocks with fused QKV) whose patches are merged 2x2 into language
tokens, plus a Qwen3 decoder with interleaved multimodal RoPE (text, height and width positions
share the rotary channels round-robin). DeepStack: features taken after some ViT blocks are merged
the same way and added to the hidden states of image tokens after the first decoder layers.

Layout under parallelism:
- TP: every linear of the ViT, the mergers and the decoder is column/row parallel (Megatron-Core
  layers); the patch embedding, position table and norms are replicated.
- PP: the ViT, the mergers and the decoder layers that receive DeepStack features live on the
  first stage. Every stage computes the multimodal position ids from token ids and image grids
  (cheap, integer work), so later stages never touch pixels.

Images are encoded one at a time (attention never crosses images), which needs no attention mask
and works with the local and the Transformer Engine spec alike.

Memory options (see qwen3.transformer_config):
- Activation recomputation applies to the ViT too: for a prompt with images it sees about four
  patches per image token, so its activations are of the order of the decoder's. Selective
  recomputes its attention cores (they come with the config); full recomputes every ViT block
  from its input (model.recompute_method / recompute_num_layers shape the decoder only: DeepStack
  taps sit between blocks). DeepStack features reach the decoder as one tensor (`DeepStackLayer`),
  which Megatron's full-recompute checkpoints take like any input.
- Sequence parallelism applies to the decoder: the merged embeddings and DeepStack features are
  split along the sequence after the image features are placed. The ViT runs whole on every TP
  rank (its sequence is an image's patches, not the token sequence).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_rlsd.models import qwen3
from megatron_rlsd.platform import Platform

ARCHITECTURE = "Qwen3VLForConditionalGeneration"


@dataclass(frozen=True)
class VisionShape:
    """The ViT hyperparameters read from an HF Qwen3-VL `vision_config`."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # fixed in HF's Qwen3-VL vision blocks and mergers

    @classmethod
    def from_hf_config(cls, cfg: dict) -> VisionShape:
        act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config.hidden_act {act!r} is not supported (Qwen3-VL uses gelu_pytorch_tanh)")
        rope = cfg.get("rope_parameters") or {}
        return cls(
            depth=cfg["depth"],
            hidden_size=cfg["hidden_size"],
            num_heads=cfg["num_heads"],
            intermediate_size=cfg["intermediate_size"],
            in_channels=cfg.get("in_channels", 3),
            patch_size=cfg["patch_size"],
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            spatial_merge_size=cfg.get("spatial_merge_size", 2),
            out_hidden_size=cfg["out_hidden_size"],
            num_position_embeddings=cfg["num_position_embeddings"],
            deepstack_visual_indexes=tuple(cfg.get("deepstack_visual_indexes") or ()),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merged_size(self) -> int:
        """Width of a 2x2 (spatial_merge_size^2) group of patch features."""
        return self.hidden_size * self.spatial_merge_size**2

    @property
    def grid_side(self) -> int:
        return int(round(self.num_position_embeddings**0.5))


@dataclass(frozen=True)
class Qwen3VLShape(qwen3.Qwen3Shape):
    """Text decoder fields (inherited, so code written for Qwen3 reads them unchanged) + vision."""

    vision: VisionShape | None = None
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    image_token_id: int = -1

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Qwen3VLShape:
        if "text_config" not in cfg or "vision_config" not in cfg:
            raise ValueError("a Qwen3-VL config.json needs text_config and vision_config")
        text_cfg = dict(cfg["text_config"])
        # Older configs put rope settings in rope_scaling + rope_theta; transformers 5 in rope_parameters.
        rope = dict(text_cfg.get("rope_parameters") or text_cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", text_cfg.get("rope_theta", 5_000_000.0))
        section = tuple(rope.get("mrope_section") or ())
        if not rope.get("mrope_interleaved", True):
            raise ValueError("mrope_interleaved=false is Qwen2-VL's chunked M-RoPE; Qwen3-VL uses the interleaved one")
        text_cfg["rope_parameters"] = {"rope_type": rope.get("rope_type", "default"), "rope_theta": rope["rope_theta"]}
        text_cfg.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
        text = qwen3.Qwen3Shape.from_hf_config(text_cfg)
        if len(section) != 3 or sum(section) != text.head_dim // 2:
            raise ValueError(f"mrope_section {list(section)} must have 3 entries summing to head_dim/2={text.head_dim // 2}")
        vision = VisionShape.from_hf_config(cfg["vision_config"])
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(f"vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}")
        if vision.grid_side**2 != vision.num_position_embeddings:
            raise ValueError(f"vision num_position_embeddings {vision.num_position_embeddings} is not a square")
        return cls(
            **dataclasses.asdict(text),
            vision=vision,
            mrope_section=section,
            image_token_id=cfg["image_token_id"],
        )

    def check_parallel(self, tp: int, pp: int) -> None:
        super().check_parallel(tp, pp)
        v = self.vision
        for what, n in (("vision num_heads", v.num_heads), ("vision intermediate_size", v.intermediate_size),
                        ("vision merged width (hidden_size * spatial_merge_size^2)", v.merged_size)):  # fmt: skip
            if n % tp:
                raise ValueError(f"tensor parallel size {tp} does not divide {what}={n}")
        first_stage_layers = self.num_layers // pp  # super() refused uneven splits: Megatron's even one
        if len(v.deepstack_visual_indexes) > first_stage_layers:
            raise ValueError(
                f"pipeline parallel size {pp} leaves {first_stage_layers} decoder layers on the first stage, but "
                f"DeepStack feeds {len(v.deepstack_visual_indexes)}; they must all sit with the vision encoder"
            )


Shape = Qwen3VLShape


def hf_mapping(shape: Qwen3VLShape):
    from megatron_rlsd.checkpoint.hf_mapping import qwen3_vl_mapping

    return qwen3_vl_mapping(shape)


def transformer_config(shape: Qwen3VLShape, platform: Platform, **kwargs):
    """The decoder's TransformerConfig (Qwen3's, plus the M-RoPE sections)."""
    config = qwen3.transformer_config(shape, platform, **kwargs)
    return dataclasses.replace(config, mrope_section=list(shape.mrope_section))


def vision_transformer_config(shape: Qwen3VLShape, text_config):
    """The ViT's TransformerConfig: same TP, dtype, init and recompute as the decoder, never
    pipelined, never sequence-parallel."""
    v = shape.vision
    return dataclasses.replace(
        text_config,
        **qwen3.stack_fields(v.depth, v.hidden_size, v.num_heads, v.num_heads, v.head_dim, v.intermediate_size,
                             norm="LayerNorm", eps=v.layer_norm_eps, qk_norm=False, gated=False, activation=_gelu_tanh,
                             bias=True),  # fmt: skip
        bias_activation_fusion=False,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        mrope_section=None,
    )


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def vision_layer_spec(use_te: bool):
    """A ViT block: pre-norm LayerNorm, biased fused QKV / proj / fc1 / fc2 (biases and tanh-GELU
    come from the config), full bidirectional attention within one image, 2D rotary (passed to
    forward as `rotary_pos_emb`). Megatron-Core's ViT specs, with two changes to the local one:
    - its attention is causal (`AttnMaskType.causal`), Qwen3-VL's is not: set to `no_mask` (the
      TE spec already has `no_mask`);
    - it has no `sharded_state_dict_keys_map`, so its norms would be checkpointed as
      `input_layernorm.*` / `pre_mlp_layernorm.*` while the TE spec folds them into the linears
      (`linear_qkv.layer_norm_*`, `linear_fc1.layer_norm_*`): give it the decoder's local-spec map
      (Megatron's GPT one), so checkpoints do not depend on the spec.
    """
    from megatron.core.models.vision import vit_layer_specs
    from megatron.core.transformer.enums import AttnMaskType

    if use_te:
        return vit_layer_specs.get_vit_layer_with_transformer_engine_spec()
    spec = vit_layer_specs.get_vit_layer_with_local_spec()
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(attention, params={**attention.params, "attn_mask_type": AttnMaskType.no_mask})
    keys_map = qwen3.layer_spec(use_te=False).submodules.sharded_state_dict_keys_map
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention, sharded_state_dict_keys_map=keys_map)
    )


def decoder_layer_spec(use_te: bool):
    """Qwen3's decoder layer spec, with layers that add DeepStack features (`DeepStackLayer`)."""
    return dataclasses.replace(qwen3.layer_spec(use_te), module=DeepStackLayer)


# ----------------------------------------------------------------------------- position math


def vision_patch_positions(t: int, h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch of one image, in the processor's order: merge x merge blocks
    row-major, patches row-major inside a block, repeated for each of the t frames."""
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
    rows = rows.permute(0, 2, 1, 3).reshape(-1).repeat(t)
    cols = cols.permute(0, 2, 1, 3).reshape(-1).repeat(t)
    return rows, cols


def interpolated_position_table(
    table: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, h: int, w: int, side: int
) -> torch.Tensor:
    """The learned side x side position table resampled (bilinear, corners aligned) to an h x w
    grid, read at the given patch coordinates."""

    def taps(index: torch.Tensor, size: int):
        src = index.float() * (side - 1) / max(size - 1, 1)
        lo = src.floor()
        frac = src - lo
        lo = lo.long()
        return lo.clamp(max=side - 1), (lo + 1).clamp(max=side - 1), 1 - frac, frac

    r0, r1, wr0, wr1 = taps(rows, h)
    c0, c1, wc0, wc1 = taps(cols, w)
    out = table[r0 * side + c0] * (wr0 * wc0)[:, None]
    out = out + table[r0 * side + c1] * (wr0 * wc1)[:, None]
    out = out + table[r1 * side + c0] * (wr1 * wc0)[:, None]
    return out + table[r1 * side + c1] * (wr1 * wc1)[:, None]


def image_token_mask(
    tokens: torch.Tensor, image_grid_thw: torch.Tensor | None, images_per_row: torch.Tensor | None, shape: Qwen3VLShape
) -> torch.Tensor:
    """[b, s] True where a row's images go: its first (sum of its images' merged patches) image
    placeholder tokens. A placeholder id the policy happened to sample in its response is text,
    as it was for the rollout engine. Without `images_per_row`, every placeholder is an image's."""
    is_pad = tokens == shape.image_token_id
    if images_per_row is None or image_grid_thw is None:
        return is_pad
    per_image = image_grid_thw.prod(-1) // shape.vision.spatial_merge_size**2
    owner = torch.repeat_interleave(torch.arange(len(images_per_row)), images_per_row.cpu())
    needed = torch.zeros(len(images_per_row), dtype=torch.long).index_add_(0, owner, per_image.cpu())
    return is_pad & (is_pad.long().cumsum(1) <= needed.to(tokens.device).unsqueeze(1))


def mrope_position_ids(tokens: torch.Tensor, image_mask: torch.Tensor, image_grid_thw: torch.Tensor | None,
                       shape: Qwen3VLShape) -> torch.Tensor:  # fmt: skip
    """[3, b, s] (temporal, height, width) positions for right-padded token rows.

    Text advances all three by one per token. An image's merged tokens take t/h/w grid positions
    offset by the running position; the text after it resumes at offset + max(h, w) / merge.
    Images (runs of `image_mask`) take their grids from `image_grid_thw` in order, row by row.
    """
    merge = shape.vision.spatial_merge_size
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    rows = []
    for is_image in image_mask.tolist():
        pieces, pos, i = [], 0, 0
        while i < len(is_image):
            if is_image[i]:
                t, h, w = next(grids)
                gh, gw = h // merge, w // merge
                tt = torch.arange(t).view(t, 1, 1).expand(t, gh, gw).reshape(-1)
                hh = torch.arange(gh).view(1, gh, 1).expand(t, gh, gw).reshape(-1)
                ww = torch.arange(gw).view(1, 1, gw).expand(t, gh, gw).reshape(-1)
                pieces.append(torch.stack([tt, hh, ww]) + pos)
                i += t * gh * gw
                pos += max(gh, gw)
            else:
                j = i
                while j < len(is_image) and not is_image[j]:
                    j += 1
                pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos += j - i
                i = j
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows, dim=1).to(tokens.device)


class InterleavedMRotaryEmbedding(torch.nn.Module):
    """Qwen3-VL's interleaved M-RoPE as Megatron rotary frequencies [s, b, 1, head_dim].

    Rotary channel j (of head_dim/2) takes its position from height if j % 3 == 1 and
    j < 3 * sections[1], from width if j % 3 == 2 and j < 3 * sections[2], else from time.
    Drop-in for GPTModel's `rotary_pos_emb` when built with position_embedding_type="mrope".
    """

    def __init__(self, head_dim: int, base: float, sections: tuple[int, int, int]):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        axis = torch.zeros(head_dim // 2, dtype=torch.long)
        for a in (1, 2):
            axis[a : 3 * sections[a] : 3] = a
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None) -> torch.Tensor:
        if position_ids.dim() == 2:  # text only: the three axes coincide
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # [3, b, s, d/2]
        axis = self.axis.to(position_ids.device).view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, axis)[0]  # [b, s, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.transpose(0, 1).unsqueeze(2).contiguous()


def vision_rotary_freqs(rows: torch.Tensor, cols: torch.Tensor, v: VisionShape) -> torch.Tensor:
    """2D rotary for ViT patches: half the channels rotate with the row, half with the column."""
    quarter = v.head_dim // 2
    inv_freq = 1.0 / (v.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter))
    half = torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], dim=-1)
    return torch.cat([half, half], dim=-1)[:, None, None, :]  # [patches, 1, 1, head_dim]


# ----------------------------------------------------------------------------- modules


class _ShardedModuleList(torch.nn.ModuleList):
    """A ModuleList whose items keep their own (TP-aware) sharded_state_dict; a plain ModuleList
    would be checkpointed as replicated tensors."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = {}
        for i, module in enumerate(self):
            out.update(module.sharded_state_dict(f"{prefix}{i}.", sharded_offsets, metadata))
        return out


class PatchMerger(MegatronModule):
    """LayerNorm -> concat merge x merge patches -> Linear -> GELU -> Linear (TP column/row).

    The main merger normalises each patch before concatenation; DeepStack mergers normalise the
    concatenated group ("post-shuffle")."""

    def __init__(self, config, v: VisionShape, out_size: int, postshuffle: bool):
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__(config=config)
        self.postshuffle, self.width = postshuffle, v.merged_size
        self.norm = torch.nn.LayerNorm(v.merged_size if postshuffle else v.hidden_size, eps=v.layer_norm_eps,
                                       dtype=config.params_dtype)  # fmt: skip
        init = config.init_method
        self.linear_fc1 = ColumnParallelLinear(v.merged_size, v.merged_size, config=config, init_method=init,
                                               bias=True, gather_output=False)  # fmt: skip
        self.linear_fc2 = RowParallelLinear(v.merged_size, out_size, config=config, init_method=init, bias=True,
                                            input_is_parallel=True, skip_bias_add=False)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.width)) if self.postshuffle else self.norm(x).reshape(-1, self.width)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))  # exact GELU here, tanh-GELU in the blocks (as in HF)
        return x


class VisionEncoder(MegatronModule):
    """Pixels of several images -> merged image-token embeddings + DeepStack features."""

    def __init__(self, config, v: VisionShape, out_size: int, use_te: bool):
        from megatron.core.transformer.transformer_block import TransformerBlock

        super().__init__(config=config)
        self.v = v
        kernel = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv3d(v.in_channels, v.hidden_size, kernel, stride=kernel, bias=True,
                                                dtype=config.params_dtype)  # fmt: skip
        self.pos_embed = torch.nn.Embedding(v.num_position_embeddings, v.hidden_size, dtype=config.params_dtype)
        # The block is a container here (forward walks its layers, to read DeepStack taps).
        self.decoder = TransformerBlock(config, vision_layer_spec(use_te), post_layer_norm=False)
        self.merger = PatchMerger(config, v, out_size, postshuffle=False)
        self.deepstack_mergers = _ShardedModuleList(
            PatchMerger(config, v, out_size, postshuffle=True) for _ in v.deepstack_visual_indexes
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        v = self.v
        dtype = self.patch_embed.proj.weight.dtype
        patches = pixel_values.to(dtype).view(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        embedded = self.patch_embed.proj(patches).view(-1, v.hidden_size)
        merged, deep = [], [[] for _ in v.deepstack_visual_indexes]
        start = 0
        recompute = self.config.recompute_granularity == "full" and self.training
        for t, h, w in grid_thw.tolist():
            n = t * h * w
            rows, cols = vision_patch_positions(t, h, w, v.spatial_merge_size)
            rows, cols = rows.to(embedded.device), cols.to(embedded.device)
            x = embedded[start : start + n] + interpolated_position_table(
                self.pos_embed.weight, rows, cols, h, w, v.grid_side
            ).to(dtype)
            start += n
            rotary = vision_rotary_freqs(rows, cols, v).to(embedded.device)
            x = x.unsqueeze(1)  # [patches, batch=1, hidden], Megatron's [s, b, h]
            for index, layer in enumerate(self.decoder.layers):
                if recompute:  # keep only the block's input; rerun it in the backward
                    x = tensor_parallel.checkpoint(partial(_vision_block, layer), False, x, rotary)
                else:
                    x = _vision_block(layer, x, rotary)
                if index in v.deepstack_visual_indexes:
                    j = v.deepstack_visual_indexes.index(index)
                    deep[j].append(self.deepstack_mergers[j](x[:, 0]))
            merged.append(self.merger(x[:, 0]))
        return torch.cat(merged), [torch.cat(d) for d in deep]


def _vision_block(layer, x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
    return layer(x, attention_mask=None, rotary_pos_emb=rotary)[0]


def deepstack_context(decoder_input: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor],
                      features: list[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """DeepStack features as one tensor [s, b, fed layers, h]: layer i's features at the image
    tokens' (sequence, batch) `positions`, zero elsewhere."""
    s, b, h = decoder_input.shape
    context = decoder_input.new_zeros(s, b, len(features), h)
    return context.index_put(positions, torch.stack(features, dim=1).to(context.dtype))


class DeepStackLayer(TransformerLayer):
    """A decoder layer that adds its DeepStack features (if any) to its output hidden states.

    The features arrive as the `context` argument (`deepstack_context`, split along the sequence
    like the hidden states under sequence parallelism), which Megatron's TransformerBlock hands to
    every layer and threads through their outputs and its full-recompute checkpoints (its channel
    for encoder outputs consumed by decoder layers; self-attention-only layers do not read it, so
    it is not passed on to the attention). Adding zeros elsewhere leaves the other tokens exact.
    """

    def forward(self, *args, context: torch.Tensor | None = None, **kwargs):
        hidden, _ = super().forward(*args, context=None, **kwargs)
        index = self.layer_number - 1  # global, 0-based; the fed layers all sit on the first stage
        if context is not None and index < context.shape[2]:
            hidden = hidden + context[:, :, index]
        return hidden, context


class Qwen3VLModel(MegatronModule):
    """One pipeline stage of Qwen3-VL: [ViT + mergers on the first stage] + a GPTModel decoder.

    forward(input_ids [b, s], position_ids (ignored: M-RoPE ids are derived from input_ids and
    image_grid_thw), attention_mask, pixel_values=None, image_grid_thw=None, images_per_row=None,
    logit_positions=None) -> vocab-parallel logits [b, s, V/tp] on the last stage ([b, R, V/tp]
    with `logit_positions` [b, R], see qwen3.Qwen3GPTModel), hidden states elsewhere.
    """

    def __init__(self, shape: Qwen3VLShape, config, *, pre_process: bool, post_process: bool, use_te: bool,
                 vp_stage: int | None = None):  # fmt: skip
        super().__init__(config=config)
        self.shape = shape
        self.pre_process, self.post_process = pre_process, post_process
        # the embeddings are split along the sequence (sequence parallelism) after images are placed
        self.language_model = qwen3.language_model(shape, config, decoder_layer_spec(use_te), use_te=use_te,
                                                   pre_process=pre_process, post_process=post_process,
                                                   vp_stage=vp_stage, position_embedding_type="mrope",
                                                   scatter_embedding_sequence_parallel=False)  # fmt: skip
        # Megatron-Core's M-RoPE is Qwen2-VL's chunked layout; Qwen3-VL interleaves the axes.
        self.language_model.rotary_pos_emb = InterleavedMRotaryEmbedding(shape.head_dim, shape.rope_theta,
                                                                         shape.mrope_section)  # fmt: skip
        self.model_type = self.language_model.model_type  # read by Megatron's pipeline schedules
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights
        self.vision_model = None
        if pre_process:
            self.vision_model = VisionEncoder(vision_transformer_config(shape, config), shape.vision, shape.hidden_size, use_te)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def forward(self, input_ids, position_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                images_per_row=None, labels=None, **kwargs):  # fmt: skip
        image_mask = image_token_mask(input_ids, image_grid_thw, images_per_row, self.shape)
        position_ids = mrope_position_ids(input_ids, image_mask, image_grid_thw, self.shape)
        decoder_input, context = None, None
        if self.pre_process:
            decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
            if pixel_values is not None and image_grid_thw is not None and len(image_grid_thw):
                b_idx, s_idx = image_mask.nonzero(as_tuple=True)  # row-major = image order
                image_embeds, deep = self.vision_model(pixel_values, image_grid_thw)
                if image_embeds.shape[0] != s_idx.numel():
                    raise ValueError(f"{s_idx.numel()} image tokens in the batch but the images give {image_embeds.shape[0]}")
                decoder_input = decoder_input.index_put((s_idx, b_idx), image_embeds.to(decoder_input.dtype))
                if deep:
                    context = deepstack_context(decoder_input, (s_idx, b_idx), deep)
            if self.config.sequence_parallel:
                # clone: the chunk would keep the whole sequence alive (as Megatron's embedding does)
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input).clone()
                if context is not None:
                    context = tensor_parallel.scatter_to_sequence_parallel_region(context).clone()
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
                                   extra_block_kwargs={"context": context} if context is not None else None,
                                   **kwargs)  # fmt: skip


def build_model(shape: Qwen3VLShape, config, *, pre_process: bool, post_process: bool, use_te: bool,
                vp_stage: int | None = None):  # fmt: skip
    return Qwen3VLModel(shape, config, pre_process=pre_process, post_process=post_process, use_te=use_te, vp_stage=vp_stage)

