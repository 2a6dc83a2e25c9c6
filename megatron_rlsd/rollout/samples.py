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

    def as_micro_batch(self) -> dict:
        """The model's and the loss's inputs (rows with images add `pixel_values`,
        `image_grid_thw`, `images_per_row`)."""
        mb = {"tokens": self.tokens, "resp_pos": self.resp_pos, "resp_ids": self.resp_ids, "mask": self.mask}
        return mb | VisionInput.concat(self.vision)


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


def plan_micro_batches(lengths: list[int], max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Row indices of each micro-batch.

    `max_tokens` 0: consecutive groups of `max_rows` rows. Otherwise a token budget: rows sorted
    longest first and grouped greedily so that (rows x the group's longest row) <= max_tokens and
    rows <= max_rows; each micro-batch is then padded only to its own longest row. A row longer
    than the budget gets a micro-batch of its own."""
    n = len(lengths)
    if max_tokens <= 0:
        return [list(range(i, min(i + max_rows, n))) for i in range(0, n, max_rows)]
    groups, current = [], []
    for i in sorted(range(n), key=lambda j: -lengths[j]):
        if current and (len(current) >= max_rows or (len(current) + 1) * lengths[current[0]] > max_tokens):
            groups.append(current)
            current = []
        current.append(i)
    return groups + ([current] if current else [])


def micro_batches(samples: list[Sample], groups: list[list[int]], *, teacher: bool, pad_id: int,
                  extra: dict[str, torch.Tensor] | None = None) -> list[dict]:  # fmt: skip
    """One packed micro-batch per group of sample indices (`plan_micro_batches`), with `extra`
    tensors of the whole batch picked alongside: [B] per row, or [B, R, ...] per response token
    (cut to the micro-batch's response width). `rows` records which samples a micro-batch holds."""
    out = []
    for idx in groups:
        packed = pack([samples[i] for i in idx], teacher, pad_id)
        mb = packed.as_micro_batch() | {"rows": torch.tensor(idx)}
        width = packed.mask.shape[1]
        for k, v in (extra or {}).items():
            picked = v[torch.tensor(idx, device=v.device)]
            mb[k] = picked[:, :width] if picked.dim() >= 2 else picked
        out.append(mb)
    return out


def gather_rows(parts: list[torch.Tensor], groups: list[list[int]], n_rows: int) -> torch.Tensor:
    """Per-micro-batch results [b_i, r_i, ...] back in sample order: [n_rows, max r_i, ...], zero
    where a row's response ended."""
    width = max(p.shape[1] for p in parts)
    first = parts[0]
    out = torch.zeros((n_rows, width, *first.shape[2:]), dtype=first.dtype, device=first.device)
    for part, idx in zip(parts, groups):
        out[torch.tensor(idx, device=first.device), : part.shape[1]] = part
    return out


def padding_efficiency(samples: list[Sample], groups: list[list[int]], teacher: bool = False) -> tuple[int, int]:
    """(useful tokens, computed tokens) of packing `samples` into `groups`."""
    lengths = [len(s.teacher_prompt if teacher else s.student_prompt) + len(s.response) for s in samples]
    return sum(lengths), sum(len(g) * max(lengths[i] for i in g) for g in groups)


def pad_lists(values: list[list[float]], width: int) -> torch.Tensor:
    """[len(values), width] fp32, each list left-aligned and zero-padded (or cut) to `width`."""
    out = torch.zeros(len(values), width, dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, : min(len(v), width)] = torch.tensor(v[:width], dtype=torch.float32)
    return out
