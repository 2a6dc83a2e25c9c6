"""Forward-only passes through Megatron's pipeline schedule (scoring, no gradients).

Batches are right-padded token blocks, so the model's causal mask is all the masking needed:
padding only ever follows real tokens. Multimodal micro-batches also carry `pixel_values`
(patches of all the batch's images, in order of appearance), `image_grid_thw` and
`images_per_row`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


VISION_INPUTS = ("pixel_values", "image_grid_thw", "images_per_row")


def model_inputs(mb: dict) -> tuple[tuple, dict]:
    """(args, kwargs) for one pipeline stage's forward on micro-batch `mb`."""
    tokens = mb["tokens"]
    position_ids = mb.get("position_ids")
    if position_ids is None:
        position_ids = position_ids_for(tokens)
    return (tokens, position_ids, None), {k: mb[k] for k in VISION_INPUTS if mb.get(k) is not None}


def forward_only(
    model: torch.nn.Module,
    micro_batches: list[dict],
    compute: Callable[[torch.Tensor, dict], Any],
) -> list[Any]:
    """Run `micro_batches` (dicts with "tokens" [b, T] int64, equal shapes) through the pipeline.

    On the last pipeline stage, `compute(logits, micro_batch)` is called once per micro-batch
    with the vocab-parallel logits [b, T, V/tp] and its results are returned in order; other
    stages return []. Every rank of the model-parallel group must call this together.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    b, seq = micro_batches[0]["tokens"].shape
    for mb in micro_batches:
        if tuple(mb["tokens"].shape) != (b, seq):
            raise ValueError("all micro-batches of one forward_only call must share one shape")

    def step(data_iterator, stage_model):
        mb = next(data_iterator)
        args, kwargs = model_inputs(mb)
        output = stage_model(*args, **kwargs)
        return output, partial(_collect, compute, mb)

    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(micro_batches),
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=b,
            forward_only=True,
            collect_non_loss_data=True,
        )


def _collect(compute, mb, output, non_loss_data=False):
    return compute(output, mb)
