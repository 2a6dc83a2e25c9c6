"""The teacher's weights, kept beside the policy's and swapped into the same Megatron modules for
the teacher pass (no second model object).

Three kinds, chosen by the `algorithm` config:
- live policy (`teacher_refresh_interval: 1`): nothing is kept, the policy is the teacher;
- snapshot (K > 1): a copy of the policy taken every K optimizer steps (paper: K = 10);
- EMA (`teacher_ema_rate: r > 0`): after every step, teacher <- (1 - r) * teacher + r * policy.
The copy has the policy's dtype (bf16 on GPU). With `on_host` (offload.teacher) it lives in pinned
host memory and is copied in only for the teacher pass: a model's worth of GPU memory is free
the rest of the step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class TeacherWeights:
    def __init__(self, module: torch.nn.Module, refresh_interval: int, ema_rate: float = 0.0, on_host: bool = False):
        self.module = module
        self.refresh_interval = refresh_interval
        self.ema_rate = ema_rate
        self.on_host = on_host
        self.age = 0  # optimizer steps since the snapshot was taken (EMA: since the start)
        live = refresh_interval == 1 and ema_rate == 0
        self.weights: list[torch.Tensor] | None = None if live else [self._stored(p) for p in self._params()]

    def _stored(self, p: torch.Tensor) -> torch.Tensor:
        copy = p.detach().to("cpu", copy=True) if self.on_host else p.detach().clone()
        return copy.pin_memory() if self.on_host and torch.cuda.is_available() else copy

    def _params(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters())

    @property
    def is_live(self) -> bool:
        return self.weights is None

    @contextmanager
    def swapped_in(self, write_back: bool = False):
        """The teacher's weights in the modules for the duration of the block. `write_back`: what
        the block wrote into them is the teacher's from then on (loading a checkpoint)."""
        if self.weights is None:
            yield
            return
        params = self._params()
        if self.on_host:  # copied in for the pass; the policy's tensors are put back untouched
            policy = [p.data for p in params]
            for p, t in zip(params, self.weights):
                p.data = t.to(p.device, non_blocking=True)
            try:
                yield
                if write_back:
                    for p, t in zip(params, self.weights):
                        t.copy_(p.data)
            finally:
                for p, data in zip(params, policy):
                    p.data = data
            return
        for p, t in zip(params, self.weights):
            p.data, t.data = t.data, p.data
        try:
            yield
        finally:
            for p, t in zip(params, self.weights):
                p.data, t.data = t.data, p.data

    @torch.no_grad()
    def copy_policy(self) -> None:
        """Teacher := the policy as it is now (after the warm start, at a refresh)."""
        if self.weights is not None:
            for t, p in zip(self.weights, self._params()):
                t.copy_(p, non_blocking=self.on_host)
        self.age = 0

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        """Called after optimizer step `step` (counted from 1)."""
        self.age += 1
        if self.weights is None:
            return
        if self.ema_rate > 0:
            for t, p in zip(self.weights, self._params()):
                t.lerp_(p.detach().to(t.device, t.dtype), self.ema_rate)
        elif step % self.refresh_interval == 0:
            self.copy_policy()

    def state_dict(self) -> dict:
        return {"age": self.age}

    def load_state_dict(self, state: dict) -> None:
        self.age = int(state["age"])
