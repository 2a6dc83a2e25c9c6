"""Passes through Megatron's pipeline schedule: scoring (forward only) and training (forward and
backward), over micro-batches that are dicts of tensors.

Batches are built on the host and cross to the model's device in one place, `to_device`, when a
micro-batch enters a stage; everything a loss reads comes from that moved micro-batch. Batches
are right-padded token blocks, so the model's causal mask is all the masking needed: padding only
ever follows real tokens. Multimodal micro-batches also carry `pixel_values` (patches of all the
batch's images, in order of appearance), `image_grid_thw` and `images_per_row`.

A micro-batch with `resp_pos` [b, R] (the positions that predict its response tokens) gets the
logits of those positions only ([b, R, V/tp]); without it, of every position ([b, T, V/tp]).
Under sequence parallelism the model runs at a length padded to a multiple of the TP size
(`padded_length`); the padding is invisible to callers.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F

VISION_INPUTS = ("pixel_values", "image_grid_thw", "images_per_row")


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(mb: dict, device: torch.device) -> dict:
    """The micro-batch with every tensor on `device` (the one host-to-device crossing)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}


def padded_length(model: torch.nn.Module, length: int) -> int:
    """The sequence length `model` runs micro-batches of `length` tokens at: under sequence
    parallelism the sequence is split evenly over the TP ranks, so `length` rounded up to a
    multiple of the TP size; otherwise `length`."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return -(-length // multiple) * multiple


def model_inputs(mb: dict, length: int | None = None) -> tuple[tuple, dict]:
    """(args, kwargs) for one pipeline stage's forward on micro-batch `mb`: tokens and position
    ids right-padded with zeros to `length` (`padded_length`; the causal mask keeps the padding
    out of every real position), the vision inputs, and `logit_positions` = mb["resp_pos"] when
    the micro-batch has it (the last stage then makes only those positions' logits)."""
    tokens = mb["tokens"]
    position_ids = mb.get("position_ids")
    if position_ids is None:
        position_ids = position_ids_for(tokens)
    pad = (length or tokens.shape[1]) - tokens.shape[1]
    tokens, position_ids = F.pad(tokens, (0, pad)), F.pad(position_ids, (0, pad))
    kwargs = {k: mb[k] for k in VISION_INPUTS if mb.get(k) is not None}
    if mb.get("resp_pos") is not None:
        kwargs["logit_positions"] = mb["resp_pos"]
    return (tokens, position_ids, None), kwargs


def _caller_logits(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    """The last stage's logits as callers see them: full-sequence logits without the padding of
    `padded_length` (response logits have none)."""
    return logits if mb.get("resp_pos") is not None else logits[:, : mb["tokens"].shape[1]]


def _run(model, micro_batches, step, forward_only: bool) -> list:
    """Megatron's schedule over `micro_batches`. Micro-batches may differ in shape (each is padded
    to its own longest row): pipeline stages then exchange each message's shape first. `step`
    pads each micro-batch to its own `padded_length`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    stage_model = model[0] if isinstance(model, list) else model
    shapes = {tuple(mb["tokens"].shape) for mb in micro_batches}
    get_model_config(stage_model).variable_seq_lengths = len(shapes) > 1
    b, seq = max(b for b, _ in shapes), max(s for _, s in shapes)
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micro_batches), model=model, num_microbatches=len(micro_batches),
        seq_length=padded_length(stage_model, seq), micro_batch_size=b, forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )  # fmt: skip


def _inputs(mb: dict, stage_model, device) -> tuple[dict, tuple, dict]:
    """The micro-batch on the model's device and the stage's forward arguments."""
    mb = to_device(mb, device)
    args, kwargs = model_inputs(mb, padded_length(stage_model, mb["tokens"].shape[1]))
    return mb, args, kwargs


def forward_only(model: torch.nn.Module, micro_batches: list[dict], compute: Callable[[torch.Tensor, dict], Any]) -> list[Any]:
    """Run `micro_batches` (dicts with "tokens" [b, T] int64) through the pipeline without
    gradients.

    On the last pipeline stage, `compute(logits, micro_batch)` is called once per micro-batch
    with the vocab-parallel logits and the micro-batch on the model's device: [b, R, V/tp] at
    the micro-batch's `resp_pos` [b, R] when it has them, [b, T, V/tp] otherwise; its results are
    returned in order. Other stages return []. Every rank of the model-parallel group must call
    this together."""
    if not micro_batches:
        return []
    device = model_device(model)

    def step(data_iterator, stage_model):
        mb, args, kwargs = _inputs(next(data_iterator), stage_model, device)
        return stage_model(*args, **kwargs), partial(_collect, compute, mb)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _run(model, micro_batches, step, forward_only=True)
    finally:
        model.train(was_training)


def _collect(compute, mb, output, non_loss_data=False):
    return compute(_caller_logits(output, mb), mb)


def forward_backward(
    model: torch.nn.Module, micro_batches: list[dict], loss_fn: Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]
) -> list[dict]:
    """Forward and backward of `micro_batches` through the pipeline; gradients accumulate in the
    model's grad buffers (reduced over data-parallel ranks when the schedule finishes).

    `loss_fn(logits, mb)` (logits as for `forward_only`'s `compute`) returns `(loss, report)`
    where the losses of all micro-batches on all data-parallel ranks SUM to the step's loss (each
    is normalised by a global count). Returns the reports on the last stage ([] elsewhere)."""
    from megatron.core import parallel_state as ps

    device = model_device(model)
    # Megatron averages the loss over micro-batches and the gradients over DP ranks; our losses
    # are already shares of one global mean, so undo both
    scale = len(micro_batches) * ps.get_data_parallel_world_size()

    def step(data_iterator, stage_model):
        mb, args, kwargs = _inputs(next(data_iterator), stage_model, device)

        def loss(logits):
            value, report = loss_fn(_caller_logits(logits, mb), mb)
            return value * scale, report

        return stage_model(*args, **kwargs), loss

    return _run([model], micro_batches, step, forward_only=False)
