"""Build a tiny, fully local Qwen3-VL checkpoint for tests and smoke runs.

:func:`build_tiny_qwen3_vl` writes a regular Hugging Face folder that
``transformers`` (``AutoProcessor``, ``Qwen3VLForConditionalGeneration``) and
vLLM load offline:

* ``config.json`` (``Qwen3VLForConditionalGeneration``): a tiny Qwen3 text
  model with interleaved M-RoPE and a tiny Qwen3-VL vision tower (patch
  embedding, learned position grid, deepstack mergers).
* ``model.safetensors``: random weights from a private ``torch.Generator``
  (the global RNG is untouched), so the same arguments give identical files.
* The tiny BPE tokenizer of :mod:`megatron_rlsd.models.tiny` plus Qwen3-VL's
  vision special tokens, and a ChatML chat template that renders an image part
  as ``<|vision_start|><|image_pad|><|vision_end|>`` like Qwen3-VL's; the
  processor expands the single ``<|image_pad|>`` to one token per merged patch.
* Processor configs (``Qwen3VLProcessor`` with the Qwen2-VL image processor and
  the Qwen3-VL video processor) with a small pixel budget, so test images of a
  few dozen pixels give a handful of image tokens.  These are the
  torchvision-backed processors, as vLLM's Qwen3-VL uses; on CPU machines
  tools/setup_env.sh makes PyPI's torchvision importable for them.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from megatron_rlsd.models import tiny

__all__ = ["VISION_SPECIAL_TOKENS", "VL_CHAT_TEMPLATE", "build_tiny_qwen3_vl"]

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
# Appended after the trained vocabulary, in this order (Qwen3-VL's own order).
VISION_SPECIAL_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# ChatML as in tiny.CHAT_TEMPLATE; list content may also hold image/video parts, told apart and
# rendered as Qwen3-VL's template does (an "image"/"image_url" key or type "image").
VL_CHAT_TEMPLATE = tiny.chatml_template(
    "{%- if 'image' in part or 'image_url' in part or part.type == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif 'video' in part or part.type == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
)


def build_tiny_qwen3_vl(
    out_dir: str | os.PathLike,
    *,
    mrope_section: Sequence[int] | None = None,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_num_heads: int = 2,
    vision_intermediate_size: int = 128,
    patch_size: int = 16,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
    num_position_embeddings: int = 64,
    deepstack_visual_indexes: Sequence[int] = (0, 1),
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
    vision_init_std: float = 0.05,
    **text,
) -> pathlib.Path:
    """Write a tiny random Qwen3-VL HF checkpoint (model, tokenizer, processor) to ``out_dir``.

    ``text``: the text decoder and tokenizer arguments of :class:`megatron_rlsd.models.tiny.TinyText`
    (``num_layers``, ``hidden_size``, ``head_dim``, ``seed``, ``corpus``, ...), as for
    :func:`megatron_rlsd.models.tiny.build_tiny_qwen3`.
    ``mrope_section`` (temporal, height, width rotary pairs) must sum to ``head_dim // 2``; by
    default it keeps Qwen3-VL's 24:20:20 split (``[6, 5, 5]`` for ``head_dim`` 32);
    ``num_position_embeddings`` must be a square (the vision tower's learned position grid);
    ``min_pixels`` / ``max_pixels`` bound the resized image area, which is then a multiple of
    ``(patch_size * spatial_merge_size) ** 2``: an image gives
    ``resized_pixels / (patch_size * spatial_merge_size) ** 2`` image tokens.
    ``vision_init_std`` is larger than the text std so that images move the log-probs clearly.
    Returns ``out_dir`` as a :class:`pathlib.Path`.
    """
    t = tiny.TinyText(**text)
    rotary_pairs = t.head_dim // 2
    if mrope_section is None:
        hw = rotary_pairs * 5 // 16
        mrope_section = (rotary_pairs - 2 * hw, hw, hw)
    if sum(mrope_section) != rotary_pairs:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim // 2 = {rotary_pairs}")
    if vision_hidden_size % vision_num_heads:
        raise ValueError("vision_hidden_size must be divisible by vision_num_heads")
    side = round(num_position_embeddings**0.5)
    if side * side != num_position_embeddings:
        raise ValueError(f"num_position_embeddings must be a square, got {num_position_embeddings}")
    if len(deepstack_visual_indexes) and max(deepstack_visual_indexes) >= vision_depth:
        raise ValueError("deepstack_visual_indexes must index vision blocks (< vision_depth)")
    # deepstack features are added to the first len(deepstack_visual_indexes) text layers
    if len(deepstack_visual_indexes) > t.num_layers:
        raise ValueError("more deepstack_visual_indexes than text layers")

    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen3_vl import Qwen3VLVideoProcessor

    vocab = t.vocab(extra_special_tokens=VISION_SPECIAL_TOKENS)
    tokenizer = vocab.tokenizer
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}

    config = Qwen3VLConfig(
        architectures=["Qwen3VLForConditionalGeneration"],
        text_config=dict(
            **t.config_fields(vocab),
            max_position_embeddings=4096,
            # Qwen3-VL's interleaved multimodal RoPE: rotary pairs split over (t, h, w) positions
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": list(mrope_section),
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden_size,
            hidden_act="gelu_pytorch_tanh",
            intermediate_size=vision_intermediate_size,
            num_heads=vision_num_heads,
            in_channels=3,
            patch_size=patch_size,
            spatial_merge_size=spatial_merge_size,
            temporal_patch_size=temporal_patch_size,
            out_hidden_size=t.hidden_size,
            num_position_embeddings=num_position_embeddings,
            deepstack_visual_indexes=list(deepstack_visual_indexes),
            initializer_range=0.02,
        ),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=bool(t.tie_word_embeddings),
        bos_token_id=vocab.pad_id,
        eos_token_id=vocab.eos_id,
        pad_token_id=vocab.pad_id,
        dtype="float32",
    )

    # vision weights get a larger std so that images move the log-probs clearly
    model = tiny.random_model(Qwen3VLForConditionalGeneration, config, t.seed,
                              lambda name: vision_init_std if ".visual." in f".{name}" else 0.02, vocab.real_size)  # fmt: skip

    # The processors: image/video patches of patch_size, merged spatial_merge_size^2 -> 1 token.
    # Qwen3-VL normalizes with mean = std = 0.5.
    common = dict(
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=spatial_merge_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **common
    )
    video_processor = Qwen3VLVideoProcessor(
        # cap_pixels_per_frame: the reference (qwen-vl-utils) behaviour, transformers' default from 5.22
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 4}, cap_pixels_per_frame=True, **common
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=VL_CHAT_TEMPLATE,
    )
    return tiny.save_checkpoint(out_dir, model, vocab, processor, VISION_SPECIAL_TOKENS)
