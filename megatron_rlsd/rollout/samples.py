"""The data contract between rollout, rewards and training, and its packing into tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_rlsd.data import PromptRow
from megatron_rlsd.data.vision import VisionInput


@dataclass
class Sample:
    """One sampled response to one prompt, with everything the update needs."""

    row: PromptRow
    group: int  # index of the prompt within the step; samples of one group share it
    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    text: str = ""
    reward: float = 0.0
    correct: bool = False
    format_ok: bool = False  # the response has the required answer format
    advantage: float = 0.0
    teacher_valid: bool = True  # sdpo: False when the group has no usable successful sibling
    vision: VisionInput | None = None  # the prompt's images (student and teacher prompts share them)

    # What a rank fills in after generating and verifying a sample; the rest every rank already has.
    ROLLOUT_FIELDS = ("response", "rollout_logprobs", "finish_reason", "text", "reward", "correct", "format_ok")


@dataclass
class PackedBatch:
    """Right-padded token blocks plus response-aligned targets for a list of samples.

    tokens [B, T]: prompt + response (student or teacher prompt), padded with `pad_id`.
    resp_pos [B, R]: position whose logits predict response token j (prompt_len - 1 + j).
    resp_ids [B, R], mask [B, R]: response tokens and their validity.
    """

    tokens: torch.Tensor
    resp_pos: torch.Tensor
    resp_ids: torch.Tensor
    mask: torch.Tensor
    vision: list[VisionInput | None] = field(default_factory=list)  # per row

    def micro_batches(self, size: int, **extra: torch.Tensor) -> list[dict]:
        """Split along the batch into dicts of tensors (extra [B, ...] tensors split alongside);
        rows with images add `pixel_values` / `image_grid_thw` for the model."""
        out = []
        for start in range(0, self.tokens.shape[0], size):
            sl = slice(start, start + size)
            mb = {"tokens": self.tokens[sl], "resp_pos": self.resp_pos[sl], "resp_ids": self.resp_ids[sl], "mask": self.mask[sl]}
            mb.update({k: v[sl] for k, v in extra.items()})
            mb.update(VisionInput.concat(self.vision[sl]))
            out.append(mb)
        return out


def pack(samples: list[Sample], teacher: bool, pad_id: int) -> PackedBatch:
    """Host tensors of the samples' prompts (student or teacher) + responses, right-padded to the
    longest row."""
    prompts = [s.teacher_prompt if teacher else s.student_prompt for s in samples]
    seq_len = max(len(p) + len(s.response) for p, s in zip(prompts, samples))
    resp_len = max(1, max(len(s.response) for s in samples))
    b = len(samples)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    resp_pos = torch.zeros((b, resp_len), dtype=torch.long)
    resp_ids = torch.full((b, resp_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, resp_len), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, samples)):
        seq = p + s.response
        tokens[i, : len(seq)] = torch.tensor(seq)
        n = len(s.response)
        resp_pos[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        resp_ids[i, :n] = torch.tensor(s.response)
        mask[i, :n] = True
    return PackedBatch(tokens, resp_pos, resp_ids, mask, [s.vision for s in samples])


def response_logits(logits: torch.Tensor, resp_pos: torch.Tensor) -> torch.Tensor:
    """[b, T, V] logits -> [b, R, V] rows that predict each response token (a new tensor)."""
    return logits[torch.arange(logits.shape[0], device=logits.device).unsqueeze(1), resp_pos]


def pad_lists(values: list[list[float]], width: int) -> torch.Tensor:
    """[len(values), width] fp32, each list left-aligned and zero-padded (or cut) to `width`."""
    out = torch.zeros(len(values), width, dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, : min(len(v), width)] = torch.tensor(v[:width], dtype=torch.float32)
    return out
