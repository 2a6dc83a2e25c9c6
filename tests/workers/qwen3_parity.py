"""torchrun worker (4 ranks, gloo): Megatron Qwen3 / Qwen3-VL vs HF logits at several TP/PP
layouts, and a TP2PP2-saved checkpoint reloaded at other layouts. Writes a JSON report on rank 0.

    torchrun --nproc-per-node 4 tests/workers/qwen3_parity.py SPEC.json REPORT.json
SPEC: {"inputs", "layouts": [[tp, pp], ...], "models": [{"name", "ckpt", "hf_logits"}],
       "reshard": {"ckpt", "save_to", "layouts"}}
inputs: a torch file with "micro_batches": [{"tokens"[, "pixel_values", "image_grid_thw"]}, ...]
REPORT: {"logits": [{"model", "tp", "pp", "max_abs_diff"}], "reshard": [{"tp", "pp", "equal", "max_abs_diff"}]}
(reshard: log-probs after reloading vs at TP2PP2 before saving)
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs  # noqa: E402
from megatron_rlsd.checkpoint import dist as ckpt  # noqa: E402
from megatron_rlsd.models.forward import forward_only  # noqa: E402
from megatron_rlsd.models.registry import build_pipeline_stage  # noqa: E402
from megatron_rlsd.parallel import ParallelConfig, init_distributed, seed_model_parallel_rng  # noqa: E402


def set_layout(tp: int, pp: int):
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    platform = init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    seed_model_parallel_rng(1234)
    return platform


def load_stage(platform, ckpt_path):
    hf_config = json.loads((ckpt.hf_dir_of(ckpt.resolve_step_dir(ckpt_path)) / "config.json").read_text())
    model, _ = build_pipeline_stage(hf_config, platform, init_weights=False)
    ckpt.load_model_weights(model, ckpt_path)
    model.eval()
    return model


def full_logits(logits, mb):
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits).clone()


def token_logprobs(logits, mb):
    from megatron.core import parallel_state as ps

    tokens = mb["tokens"]
    return vocab_parallel_logprobs(logits[:, :-1], tokens[:, 1:], tp_group=ps.get_tensor_model_parallel_group())


def owner_result(results):
    """The value held by the rank that computed it (last PP stage, TP rank 0, DP rank 0)."""
    from megatron.core import parallel_state as ps

    mine = None
    if results and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        mine = torch.cat(results)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return next(g for g in gathered if g is not None)


def main(spec_path, report_path):
    spec = json.loads(Path(spec_path).read_text())
    micro_batches = torch.load(spec["inputs"], weights_only=True)["micro_batches"]
    report = {"logits": [], "reshard": []}
    for m in spec["models"]:
        ref = torch.load(m["hf_logits"], weights_only=True)
        for tp, pp in spec["layouts"]:
            platform = set_layout(tp, pp)
            model = load_stage(platform, m["ckpt"])
            out = owner_result(forward_only(model, micro_batches, full_logits))
            report["logits"].append({"model": m["name"], "tp": tp, "pp": pp, "max_abs_diff": (out - ref).abs().max().item()})

    r = spec["reshard"]
    platform = set_layout(2, 2)
    model = load_stage(platform, r["ckpt"])
    base = owner_result(forward_only(model, micro_batches, token_logprobs))
    step_dir = Path(r["save_to"]) / ckpt.step_dir_name(1)
    ckpt.save_model_weights(model, step_dir)
    if dist.get_rank() == 0:
        ckpt.publish_latest(Path(r["save_to"]), step_dir)
    dist.barrier()
    for tp, pp in r["layouts"]:
        platform = set_layout(tp, pp)
        model = load_stage(platform, r["save_to"])
        lp = owner_result(forward_only(model, micro_batches, token_logprobs))
        report["reshard"].append(
            {"tp": tp, "pp": pp, "equal": bool(torch.equal(lp, base)), "max_abs_diff": (lp - base).abs().max().item()}
        )
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
