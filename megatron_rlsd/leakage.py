"""Privileged-information leakage: student responses that refer to a reference they never saw.

RLSD's paper (arXiv 2604.03128, Sec. 3 and Fig. 3) diagnoses on-policy self-distillation this way:
a student trained to match a teacher that reads the reference solution learns to write as if it
had read it too ("Given that the reference solution uses 9 values ...", "But wait, the reference
solution says 'No' ..."). The student's prompt never contains a reference, so any such mention
in a response is leakage. The trainer logs the share of a step's responses that match one of the
patterns (`trainer.leakage_patterns`, case-insensitive regular expressions) as `leakage`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["DEFAULT_LEAKAGE_PATTERNS", "LeakageDetector"]

# From the paper's examples, widened to the obvious paraphrases; a plain "the answer is" is not
# leakage (the format asks for an answer), so every pattern names a reference/given solution.
DEFAULT_LEAKAGE_PATTERNS: tuple[str, ...] = (
    r"\breference (solution|answer)s?\b",
    r"\b(the|a) (provided|given) (solution|answer)s?\b",
    r"\b(solution|answer) (that )?(was|is) (provided|given)\b",
    r"\baccording to the (solution|answer)\b",
    r"\bthe (solution|answer) (says|states|shows|suggests)\b",
)


class LeakageDetector:
    """Whether a response refers to a reference solution/answer (any pattern matches)."""

    def __init__(self, patterns: Iterable[str] = DEFAULT_LEAKAGE_PATTERNS):
        self.patterns = list(patterns)
        compiled = []
        for p in self.patterns:
            try:
                compiled.append(re.compile(p, re.IGNORECASE))
            except re.error as e:
                raise ValueError(f"leakage pattern {p!r} is not a valid regular expression: {e}") from None
        self._regex = compiled

    def refers(self, text: str) -> bool:
        return any(r.search(text) for r in self._regex)

    def share(self, texts: Sequence[str]) -> float:
        """The share of `texts` that refer to a reference (0 with no texts or no patterns)."""
        if not texts or not self._regex:
            return 0.0
        return sum(self.refers(t) for t in texts) / len(texts)
