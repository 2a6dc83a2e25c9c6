"""Sequence-level advantages (GRPO group normalisation).

Paper (arXiv 2604.03128) Eq. 1, the group-normalised advantage::

    A^(i) = (R^(i) - mean_G R) / (std_G R + eps)

as in the authors' code (EasyR1 / verl ``compute_grpo_outcome_advantage``):
``torch.std`` (unbiased, ``G - 1`` in the denominator) and ``eps = 1e-6``.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["group_advantages"]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages of ``rewards`` normalised within consecutive groups.

    Args:
        rewards: ``[N]`` rewards, the ``group_size`` responses of one prompt
            stored consecutively (rows ``g * group_size ... (g + 1) * group_size - 1``
            form group ``g``).
        group_size: responses per prompt ``G`` (>= 2: the unbiased std of a
            single sample is undefined).
        eps: added to the group std in the denominator.

    Returns:
        ``[N]`` advantages ``(r - mean) / (std + eps)`` per group, in the
        rewards' floating dtype (fp32 for integer / bool rewards).  A group
        whose rewards are all equal gets advantage exactly 0 for every response.

    Raises:
        ValueError: ``rewards`` not 1-D, ``group_size`` not an integer >= 2,
            ``N`` not divisible by ``group_size``, or ``eps`` negative.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor [N], got {shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"the number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size}); "
            "each prompt must contribute exactly group_size responses"
        )
    if not (float(eps) >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
    grouped = r.reshape(-1, int(group_size))
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased, as torch.std in the authors' code
    adv = (grouped - mean) / (std + eps)
    # A group of identical rewards carries no signal; make that exactly 0 even
    # where the fp mean of e.g. eight copies of 0.1 is not exactly 0.1.
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv), adv).reshape(-1)
