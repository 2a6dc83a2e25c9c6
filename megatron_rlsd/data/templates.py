"""Student and teacher prompt templates, and chat-template encoding.

The student sees the problem with the output-format instruction; the teacher
(the same model, RLSD's privileged context) sees the raw problem, the
reference answer, and the same format instruction.  Wording follows the
authors' ``unified.jinja`` (math) and ``teacher_hint_self_distill.jinja``.

Templates are plain text with two placeholders, ``{problem}`` and (teacher
only, required) ``{answer}``.  Substitution is a single pass over the
template, so other braces (``\\boxed{}``) are kept literally and a problem
that happens to contain ``{answer}`` is not expanded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dataset import PromptRow

__all__ = [
    "DEFAULT_STUDENT_TEMPLATE",
    "DEFAULT_TEACHER_TEMPLATE",
    "FORMAT_INSTRUCTION",
    "PromptTemplates",
    "encode_prompt",
    "render_chat",
    "user_message",
]

FORMAT_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue enclosed within <thought> </thought> tags. "
    "The final answer MUST be enclosed within <answer> </answer> tags."
)

DEFAULT_STUDENT_TEMPLATE = (
    "You are an intelligent assistant capable of solving mathematical problems.\n\n"
    "[MATHEMATICS Tasks]\n"
    "- Goal: Solve the math problem.\n"
    f"- Format: {FORMAT_INSTRUCTION}\n\n"
    "{problem}"
)

DEFAULT_TEACHER_TEMPLATE = (
    "{problem}\n\n"
    "Here is a reference solution:\n"
    "{answer}\n\n"
    "After understanding the reference solution, please try to solve this problem using your own approach below. "
    f"{FORMAT_INSTRUCTION}"
)

_PLACEHOLDER = re.compile(r"\{(problem|answer)\}")


def _fill(template: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _check(template: str, required: Sequence[str], source: str) -> None:
    missing = [f"{{{name}}}" for name in required if f"{{{name}}}" not in template]
    if missing:
        raise ValueError(f"{source}: prompt template lacks placeholder(s) {', '.join(missing)}")


@dataclass(frozen=True)
class PromptTemplates:
    student: str = DEFAULT_STUDENT_TEMPLATE
    teacher: str = DEFAULT_TEACHER_TEMPLATE

    def __post_init__(self) -> None:
        _check(self.student, ["problem"], "student template")
        _check(self.teacher, ["problem", "answer"], "teacher template")

    @classmethod
    def from_files(
        cls, student_path: str | os.PathLike | None = None, teacher_path: str | os.PathLike | None = None
    ) -> PromptTemplates:
        """Load templates from UTF-8 text files; a ``None`` path keeps the built-in default."""
        student, teacher = DEFAULT_STUDENT_TEMPLATE, DEFAULT_TEACHER_TEMPLATE
        if student_path is not None:
            student = Path(student_path).read_text(encoding="utf-8")
            _check(student, ["problem"], str(student_path))
        if teacher_path is not None:
            teacher = Path(teacher_path).read_text(encoding="utf-8")
            _check(teacher, ["problem", "answer"], str(teacher_path))
        return cls(student=student, teacher=teacher)

    def student_text(self, row: PromptRow) -> str:
        return _fill(self.student, {"problem": row.problem.strip(), "answer": row.answer})

    def teacher_text(self, row: PromptRow, context: str | None = None) -> str:
        """The teacher prompt; `context` (default: the row's answer) fills {answer}: the privileged
        information, e.g. a reference solution for OPSD."""
        return _fill(self.teacher, {"problem": row.problem.strip(), "answer": row.answer if context is None else context})

    def student_messages(self, row: PromptRow) -> list[dict[str, Any]]:
        """One user turn: the student prompt (images first, when the row has any)."""
        return [user_message(self.student_text(row), row.images)]

    def teacher_messages(self, row: PromptRow, context: str | None = None) -> list[dict[str, Any]]:
        """One user turn: the teacher prompt with the privileged context (default: the reference
        answer), same images."""
        return [user_message(self.teacher_text(row, context), row.images)]


def user_message(text: str, images: Sequence[str]) -> dict[str, Any]:
    """A user turn: the images (if any) first, then the text."""
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def render_chat(tokenizer, messages: list[dict[str, Any]]) -> str:
    """The chat template applied to ``messages`` with the assistant turn opened, as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat_template; use an instruct/chat tokenizer or set one")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(text, list):  # some versions return one string per conversation
        text = text[0]
    return text


def encode_prompt(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt token ids: :func:`render_chat` then encode without extra special tokens.

    Rendering to text first sidesteps the return type of
    ``apply_chat_template(tokenize=True)`` (a list or a BatchEncoding,
    depending on the transformers version); the template already contains
    every special token it wants.
    """
    ids = tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]
