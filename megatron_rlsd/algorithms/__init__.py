"""RL math: group advantages, RLSD token credit, the loss modes, vocab-parallel divergences."""

from megatron_rlsd.algorithms.advantages import group_advantages
from megatron_rlsd.algorithms.loss_modes import LOSS_MODES, LossMode, MicroBatch, make_loss_mode
from megatron_rlsd.algorithms.losses import (
    aggregate,
    opsd_token_divergence,
    policy_loss,
    sdpo_token_divergence,
    truncated_is_weights,
)
from megatron_rlsd.algorithms.rlsd import LambdaSchedule, rlsd_clip_fractions, rlsd_token_advantages

__all__ = [
    "LOSS_MODES",
    "LambdaSchedule",
    "LossMode",
    "MicroBatch",
    "aggregate",
    "group_advantages",
    "make_loss_mode",
    "opsd_token_divergence",
    "policy_loss",
    "rlsd_clip_fractions",
    "rlsd_token_advantages",
    "sdpo_token_divergence",
    "truncated_is_weights",
]
