"""Handing GPU memory to the rollout engine and back (the `offload` config section).

While vLLM generates, Megatron's gradient buffers and optimizer state are idle. After the
optimizer step, before the weight sync wakes the engine's KV cache:
- gradients are dropped (their storage freed; Megatron's `offload_grad_buffers`): they are zeroed
  at the next update anyway, so nothing is copied;
- the optimizer's state (fp32 main weights, Adam moments) moves to host memory (Megatron's
  `offload_to_cpu`).
Both come back (`for_training`) after the rollouts, before the teacher pass. The teacher snapshot
is kept on the host by TeacherWeights itself (offload.teacher).
"""

from __future__ import annotations


class Offloader:
    def __init__(self, cfg, model, optimizer):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.away = False

    def for_rollout(self) -> None:
        if self.away:
            return
        if self.cfg.grads:
            self.model.offload_grad_buffers()
        if self.cfg.optimizer:
            self.optimizer.offload_to_cpu()
        self.away = True

    def for_training(self) -> None:
        if not self.away:
            return
        if self.cfg.grads:
            self.model.restore_grad_buffers()
        if self.cfg.optimizer:
            self.optimizer.restore_from_cpu()
        self.away = False
