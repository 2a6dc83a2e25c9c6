"""Verifiable rewards: answer extraction, format check, math equivalence with a hard timeout."""

from .extract import extract_answer, extract_boxed, has_valid_format
from .verifier import (
    MAX_VERIFY_CHARS,
    REASONS,
    MathVerifier,
    RewardConfig,
    RewardResult,
    answers_match,
    check_answer,
    get_default_verifier,
    normalize_answer,
    score_response,
    score_responses,
    shutdown_default_verifier,
)

__all__ = [
    "MAX_VERIFY_CHARS",
    "REASONS",
    "MathVerifier",
    "RewardConfig",
    "RewardResult",
    "answers_match",
    "check_answer",
    "extract_answer",
    "extract_boxed",
    "get_default_verifier",
    "has_valid_format",
    "normalize_answer",
    "score_response",
    "score_responses",
    "shutdown_default_verifier",
]
