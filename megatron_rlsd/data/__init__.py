"""Prompt data: JSONL/parquet loading, a resumable sampler, prompt templates, synthetic tasks."""

from .dataset import FIELDS, EpochSampler, PromptRow, load_prompt_rows
from .synthetic import SYNTHETIC_TASKS, make_synthetic_rows, sft_text, write_jsonl
from .templates import (
    DEFAULT_STUDENT_TEMPLATE,
    DEFAULT_TEACHER_TEMPLATE,
    FORMAT_INSTRUCTION,
    PromptTemplates,
    encode_prompt,
    render_chat,
)

__all__ = [
    "DEFAULT_STUDENT_TEMPLATE",
    "DEFAULT_TEACHER_TEMPLATE",
    "FIELDS",
    "FORMAT_INSTRUCTION",
    "SYNTHETIC_TASKS",
    "EpochSampler",
    "PromptRow",
    "PromptTemplates",
    "encode_prompt",
    "load_prompt_rows",
    "make_synthetic_rows",
    "render_chat",
    "sft_text",
    "write_jsonl",
]
