"""torchrun worker (4 ranks, gloo): Megatron Qwen3-VL vs HF logits on image batches at TP1PP1,
TP2PP1 and TP2PP2, plus log-probs after a TP2PP2 save reloaded at TP1PP1. Report on rank 0.

    torchrun --nproc-per-node 4 tests/workers/qwen3_vl_parity.py SPEC.json REPORT.json
SPEC: {"models": [{"name", "ckpt", "inputs", "hf_logits"}], "reshard": {"ckpt", "save_to"}}
inputs: a torch file with "micro_batches": [{"tokens", "pixel_values", "image_grid_thw"}, ...]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwen3_parity import full_logits, load_stage, owner_result, set_layout, token_logprobs  # noqa: E402

from megatron_rlsd.checkpoint import dist as ckpt  # noqa: E402
from megatron_rlsd.models.forward import forward_only  # noqa: E402


def main(spec_path, report_path):
    spec = json.loads(Path(spec_path).read_text())
    report = {"logits": [], "reshard": []}
    for m in spec["models"]:
        micro_batches = torch.load(m["inputs"], weights_only=True)["micro_batches"]
        ref = torch.load(m["hf_logits"], weights_only=True)
        for tp, pp in [(1, 1), (2, 1), (2, 2)]:
            platform = set_layout(tp, pp)
            model = load_stage(platform, m["ckpt"])
            out = owner_result(forward_only(model, micro_batches, full_logits))
            report["logits"].append({"model": m["name"], "tp": tp, "pp": pp, "max_abs_diff": (out - ref).abs().max().item()})

    r = spec["reshard"]
    micro_batches = torch.load(r["inputs"], weights_only=True)["micro_batches"]
    platform = set_layout(2, 2)
    model = load_stage(platform, r["ckpt"])
    base = owner_result(forward_only(model, micro_batches, token_logprobs))
    step_dir = Path(r["save_to"]) / ckpt.step_dir_name(1)
    ckpt.save_model_weights(model, step_dir)
    if dist.get_rank() == 0:
        ckpt.publish_latest(Path(r["save_to"]), step_dir)
    dist.barrier()
    platform = set_layout(1, 1)
    model = load_stage(platform, r["save_to"])
    lp = owner_result(forward_only(model, micro_batches, token_logprobs))
    report["reshard"].append({"tp": 1, "pp": 1, "max_abs_diff": (lp - base).abs().max().item()})
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
