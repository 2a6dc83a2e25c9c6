"""Answer extraction and the format check, in linear time on any input.

Responses come from a sampling policy, so the code here treats them as
arbitrary text: nothing raises, and nothing backtracks.  Only ``str.find`` /
``str.rfind`` and one linear regex scan (a pattern of fixed literals) are used,
so a 1 MB response costs a few milliseconds.

* :func:`extract_answer`: the content of the last ``<answer>...</answer>``;
  else the content of the last ``\\boxed{...}`` with balanced braces; else
  ``None``.
* :func:`has_valid_format`: the authors' format reward,
  ``<thought>...</thought> ... <answer>...</answer>`` spanning the whole
  response (leading / trailing whitespace allowed).
"""

from __future__ import annotations

import re

__all__ = [
    "ANSWER_CLOSE",
    "ANSWER_OPEN",
    "THOUGHT_CLOSE",
    "THOUGHT_OPEN",
    "extract_answer",
    "extract_boxed",
    "has_valid_format",
]

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THOUGHT_OPEN, THOUGHT_CLOSE = "<thought>", "</thought>"

# Alternatives are fixed literals (no nested quantifiers): one linear scan.
# Escaped braces (\{ \}) are LaTeX set braces, not grouping: they match first
# and are skipped by the scanner.
_BRACE_TOKENS = re.compile(r"\\boxed\s{0,8}\{|\\[{}]|[{}]")


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{...}`` whose braces balance, stripped.

    Nested braces (``\\boxed{\\frac{1}{2}}``) are kept; a ``\\boxed{`` that is
    never closed is ignored (an earlier balanced one is used instead).  For
    nested boxes the outer one wins (it closes last).
    """
    if not isinstance(text, str) or "\\boxed" not in text:
        return None
    stack: list[int] = []  # content start for \boxed{, -1 for a plain {
    best: tuple[int, int] | None = None  # (content start, content end) closing last
    for m in _BRACE_TOKENS.finditer(text):
        tok = m.group()
        if tok[0] == "\\" and len(tok) == 2:  # \{ or \}
            continue
        if tok == "}":
            if stack:
                start = stack.pop()
                if start >= 0:
                    best = (start, m.start())
        elif tok == "{":
            stack.append(-1)
        else:  # \boxed{
            stack.append(m.end())
    if best is None:
        return None
    return text[best[0] : best[1]].strip()


def extract_answer(text: str) -> str | None:
    """The model's final answer, or ``None`` when there is none.

    Content of the last complete ``<answer>...</answer>`` (the last closing
    tag and the nearest opening tag before it), stripped; an empty answer
    counts as none.  Otherwise the last balanced ``\\boxed{...}``.
    """
    if not isinstance(text, str):
        return None
    close = text.rfind(ANSWER_CLOSE)
    if close >= 0:
        open_ = text.rfind(ANSWER_OPEN, 0, close)
        if open_ >= 0:
            content = text[open_ + len(ANSWER_OPEN) : close].strip()
            return content or None
    boxed = extract_boxed(text)
    return boxed or None


def has_valid_format(text: str) -> bool:
    """``<thought>...</thought>`` then ``<answer>...</answer>``, covering the whole response.

    Equivalent to the authors' ``re.fullmatch(r"<thought>.*</thought>.*<answer>.*</answer>", s, re.DOTALL)``
    on the stripped response, computed with ``str.find`` (no backtracking).
    """
    if not isinstance(text, str):
        return False
    s = text.strip()
    if not (s.startswith(THOUGHT_OPEN) and s.endswith(ANSWER_CLOSE)):
        return False
    end_thought = s.find(THOUGHT_CLOSE, len(THOUGHT_OPEN))
    if end_thought < 0:
        return False
    open_answer = s.find(ANSWER_OPEN, end_thought + len(THOUGHT_CLOSE))
    # The final </answer> must start after the opening tag ends.
    return open_answer >= 0 and open_answer + len(ANSWER_OPEN) <= len(s) - len(ANSWER_CLOSE)
