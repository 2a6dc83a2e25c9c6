"""torchrun worker (4 ranks, TP2PP2): every loss mode trains on one model, plus fault handling.

After a short supervised warm start (so SDPO finds correct siblings), each loss mode runs two
steps: losses must be finite and the weights must change. Then an injected NaN loss must be
skipped (weights unchanged, counted), and consecutive NaNs must stop the run with the last good
checkpoint intact. Writes a JSON report on rank 0.

    torchrun --nproc-per-node 4 tests/workers/loss_modes.py REPORT.json [config overrides...]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_rlsd.config import load_config  # noqa: E402
from megatron_rlsd.trainer import Trainer  # noqa: E402
from megatron_rlsd.trainer_setup import save_checkpoint, warm_start_sft  # noqa: E402


def weights_checksum(trainer) -> float:
    total = torch.zeros(1, dtype=torch.float64)
    for p in trainer.module.parameters():
        total += p.detach().double().abs().sum()
    dist.all_reduce(total)
    return total.item()


def main(report_path, *overrides):
    cfg = load_config("examples/tiny_cpu.yaml", list(overrides))
    trainer = Trainer(cfg)
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    warm_start_sft(trainer)
    trainer.sync_weights()
    report = {"modes": {}}
    for mode in ("rlsd", "grpo", "opsd", "grpo_opsd", "sdpo"):
        cfg.algorithm.loss_mode = mode
        before = weights_checksum(trainer)
        rows = [trainer.train_step() for _ in range(2)]
        report["modes"][mode] = {
            "losses": [r.get("loss") for r in rows],
            "grad_norms": [r.get("grad_norm") for r in rows],
            "weights_changed": weights_checksum(trainer) != before,
        }

    cfg.algorithm.loss_mode = "rlsd"
    save_checkpoint(trainer)
    good_step = trainer.step
    cfg.trainer.inject_nan_at_steps = ",".join(str(trainer.step + i) for i in (1, 2, 3))
    cfg.trainer.max_consecutive_nonfinite = 2
    before = weights_checksum(trainer)
    row = trainer.train_step()
    report["nan"] = {"update_ok": row["update_ok"], "skipped": row["nonfinite_skipped"],
                     "weights_unchanged": weights_checksum(trainer) == before}  # fmt: skip
    try:
        trainer.train_step()
        report["nan"]["abort"] = None
    except RuntimeError as e:
        report["nan"]["abort"] = str(e)
    latest = (trainer.out_dir / "checkpoints" / "latest").read_text().strip()
    report["nan"]["latest_is_last_good"] = latest == f"step_{good_step:07d}"
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))
    trainer.engine.close()  # also tears down torch.distributed (vLLM's cleanup)


if __name__ == "__main__":
    main(*sys.argv[1:])
