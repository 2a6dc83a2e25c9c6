"""torchrun worker (1 rank): every tensor that reaches the model or the loss is on the model's device.

On CPU the platform layer maps "cuda" to the host, so a batch left on the host would pass
unnoticed there and fail on a GPU. Here the model is moved to PyTorch's `meta` device (a device
other than the host, with shapes and no data): the scoring passes and the update's loss, through
Megatron's schedule and the trainer's own code, then only work if every tensor the model and the
loss read crossed to the model's device at the seam (models/forward.py: to_device). A tensor left
behind raises "... is on cpu, expected meta". For every loss mode, writes a JSON report on rank 0.

    torchrun --nproc-per-node 1 tests/workers/device_seam.py REPORT.json HF_DIR DATA.jsonl OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layouts import config, fixed_batch  # noqa: E402

from megatron_rlsd.build import build  # noqa: E402
from megatron_rlsd.metrics import Accumulator  # noqa: E402
from megatron_rlsd.models.forward import forward_only  # noqa: E402
from megatron_rlsd.parallel import init_distributed  # noqa: E402
from megatron_rlsd.trainer import Trainer  # noqa: E402

MODES = ("rlsd", "grpo", "opsd", "grpo_opsd", "sdpo", "rlrt", "antisd", "egrsd")


def to_meta(module: torch.nn.Module) -> None:
    """Everything the model holds on `meta`: parameters, buffers, and plain tensor attributes
    (Megatron's rotary embedding keeps `inv_freq` as one, made on the current CUDA device)."""
    module.to("meta")
    for m in module.modules():
        for name, value in vars(m).items():
            if torch.is_tensor(value) and not isinstance(value, torch.nn.Parameter):
                setattr(m, name, value.to("meta"))


def main(report_path, hf_dir, data, out):
    report = {}
    platform = None
    for mode in MODES:
        cfg = config(hf_dir, data, out, 1, 1, f"algorithm.loss_mode={mode}", "rollout.truncated_is_cap=2.0",
                     "trainer.max_tokens_per_microbatch=64")  # fmt: skip
        platform = platform or init_distributed(cfg.parallel)
        components = build(cfg, platform, with_engine=False)
        to_meta(components.model.module)  # the policy (and, cloned from it, the teacher) on another device
        trainer = Trainer(cfg, components)
        samples = fixed_batch(trainer)
        batch, acc = trainer.local_batch(samples), Accumulator()
        student = trainer.score_student(batch)  # the separate pass of several mini-batches per step
        teacher = trainer.score_teacher(batch)
        if trainer.mode.entropy_gate:  # AntiSD with its gate open (its median needs real values, not meta)
            trainer.mode.gate.load_state_dict({"warm": [0.0], "h_warm": 0.0, "open": True})
            trainer.mode.begin_step(1.0)
        micro_batches, loss_fn = trainer.update_inputs(batch, trainer.mode.denominator(samples), None, teacher, acc)
        losses = forward_only(trainer.c.model, micro_batches, loss_fn)  # the update's forward, credit and loss
        tensors = [*student.values(), *(teacher or {}).values()]
        tensors += [loss for loss, _ in losses] + [v for _, report_ in losses for v in report_.values()]
        report[mode] = {"devices": sorted({str(t.device) for t in tensors}), "n_tensors": len(tensors),
                        "micro_batch_devices": sorted({str(v.device) for mb in micro_batches for v in mb.values()
                                                       if torch.is_tensor(v)})}  # fmt: skip
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
