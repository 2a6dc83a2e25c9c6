"""Test-only fault injection, driven by the `test_faults` config section (empty in real runs).

The trainer and the checkpointer call these hooks at the places where real faults strike; with
the section empty every hook does nothing.
"""

from __future__ import annotations

import os
import signal

import torch


class FaultInjector:
    def __init__(self, cfg):
        self.nan_steps = {int(x) for x in cfg.nan_loss_at_steps.split(",") if x.strip()}
        self.crash_step, self.crash_phase = cfg.crash_in_save_at_step, cfg.crash_in_save_phase

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of optimizer step `step`, made NaN where asked."""
        return loss * float("nan") if step in self.nan_steps else loss

    def in_save(self, step: int, phase: str) -> None:
        """While saving the checkpoint of `step`: every rank SIGKILLs itself at `phase` if asked
        (writing: shards written, no metadata yet; published: complete, not yet renamed)."""
        if step == self.crash_step and phase == self.crash_phase:
            os.kill(os.getpid(), signal.SIGKILL)
