"""Prompts with images: chat messages -> token ids with expanded image placeholders + pixels.

The HF processor of the model (Qwen3-VL: resize to the pixel budget, 14/16-px patches, one
`<|image_pad|>` per merged 2x2 patch group) is the single source of truth: the trainer feeds
Megatron exactly these ids and patches, and the rollout engine is checked to expand the
placeholders the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_rlsd.data.templates import encode_prompt, render_chat


@dataclass
class VisionInput:
    """The images of one prompt, as the model consumes them."""

    pixel_values: torch.Tensor  # [patches, channels * temporal_patch * patch * patch]
    image_grid_thw: torch.Tensor  # [images, 3] patches along time, height, width

    @staticmethod
    def concat(inputs: list[VisionInput | None]) -> dict[str, torch.Tensor]:
        """Model kwargs for a micro-batch whose rows carry `inputs` (None: a text-only row)."""
        present = [v for v in inputs if v is not None]
        if not present:
            return {}
        return {
            "pixel_values": torch.cat([v.pixel_values for v in present]),
            "image_grid_thw": torch.cat([v.image_grid_thw for v in present]),
            # tells the model which placeholder tokens are images (a response may sample the id)
            "images_per_row": torch.tensor([0 if v is None else len(v.image_grid_thw) for v in inputs]),
        }


def load_image(image):
    """A PIL image as is, or a path opened as RGB; raises ValueError naming the file when it
    cannot be decoded."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot decode image {image}: {e}") from None


class PromptEncoder:
    """Encodes chat messages for one model: the tokenizer alone for text models, the HF
    processor for vision-language models (when `multimodal`)."""

    def __init__(self, hf_dir: str | Path, tokenizer, multimodal: bool):
        self.tokenizer = tokenizer
        self.processor = None
        if multimodal:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(hf_dir)

    def encode(self, messages: list[dict[str, Any]], images: list) -> tuple[list[int], VisionInput | None]:
        """`images`: paths or PIL images (decode once and pass the images when encoding twice)."""
        if not images:
            return encode_prompt(self.tokenizer, messages), None
        if self.processor is None:
            raise ValueError("this row has images but the model is text-only; use a vision-language model")
        out = self.processor(
            text=[render_chat(self.tokenizer, messages)], images=[load_image(p) for p in images], return_tensors="pt"
        )
        return out["input_ids"][0].tolist(), VisionInput(out["pixel_values"], out["image_grid_thw"])
