"""The optimizer and the one update step that the warm start and RL share.

`update` = zero the gradients -> forward and backward over the pipeline -> gradients ready
(Megatron's `prepare_grads`: unscale, copy to fp32 main grads) -> global norm over every TP/PP/DP
shard -> if finite, clip with that norm and step (`step_with_ready_grads`); if not, skip. The norm
is computed once, the gradients prepared once (Megatron's `optimizer.step()` would redo both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_rlsd.models.forward import forward_backward


def build_optimizer(optim_cfg, model, *, bf16: bool):
    """Megatron's Adam (AdamW-style decay) over `model` (DDP-wrapped), constant lr."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = optim_cfg
    oc = OptimizerConfig(
        optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        clip_grad=o.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=model.ddp_config.use_distributed_optimizer,
    )  # fmt: skip
    return get_megatron_optimizer(oc, [model])


def _parts(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def apply_hparams(optimizer, optim_cfg, lr: float | None = None) -> None:
    """Set lr (default optim.lr), weight decay, betas and the clip on every parameter group, as
    get_megatron_optimizer sets them. Used after a checkpoint's parameter groups were loaded
    (optim.* may change on resume) and around the warm start. (There is no LR scheduler, so
    Megatron's per-group wd_mult is not applied: norms are decayed too, as the authors' AdamW.)"""
    for part in _parts(optimizer):
        part.config.clip_grad = optim_cfg.grad_clip
    for group in optimizer.param_groups:
        group["lr"] = optim_cfg.lr if lr is None else lr
        group["weight_decay"] = optim_cfg.weight_decay
        if "betas" in group:
            group["betas"] = (optim_cfg.adam_beta1, optim_cfg.adam_beta2)


def reset_moments(optimizer) -> None:
    """Forget Adam's moments and step count (the fp32 main weights stay): Adam starts them afresh
    at the next step."""
    for part in _parts(optimizer):
        part.optimizer.state.clear()


@dataclass
class StepResult:
    applied: bool  # False: the gradient norm was not finite and the update was skipped
    grad_norm: float  # before clipping, over all shards (the same on every rank)


@torch.no_grad()
def optimizer_step(optimizer) -> StepResult:
    """Clip and step with Megatron's split API, unless the gradients are not finite."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()  # fp16 loss-scale overflow
    grad_norm = math.inf if found_inf else float(optimizer.get_grad_norm())  # all-reduced
    if not math.isfinite(grad_norm):
        return StepResult(False, grad_norm)
    for part in _parts(optimizer):
        params = part.get_parameters()
        if part.config.clip_grad > 0 and params:
            clip_grad_by_total_norm_fp32(params, part.config.clip_grad, grad_norm,
                                         part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)  # fmt: skip
    return StepResult(bool(optimizer.step_with_ready_grads()), grad_norm)


def update(model, optimizer, micro_batches: list[dict], loss_fn) -> tuple[list[dict], StepResult]:
    """One optimizer step over `micro_batches` (see models.forward.forward_backward for
    `loss_fn`); returns the last stage's per-micro-batch reports and the step's outcome."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = forward_backward(model, micro_batches, loss_fn)
    return reports, optimizer_step(optimizer)
