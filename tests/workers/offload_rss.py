"""One process (world size 1): what offload.grads hands to the rollout engine, measured by RSS.

A Qwen3 stage of 168M parameters under Megatron's DDP has a 640 MiB fp32 gradient buffer;
Offloader.for_rollout must free it (Megatron's offload_grad_buffers) and for_training bring it back.
Prints a JSON line: RSS in MiB before, while offloaded, after the restore, and the buffer's size.

    python tests/workers/offload_rss.py
"""

import json
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402

from megatron_rlsd.config import OffloadConfig, OptimConfig  # noqa: E402
from megatron_rlsd.models.registry import build_pipeline_stage  # noqa: E402
from megatron_rlsd.offload import Offloader  # noqa: E402
from megatron_rlsd.optimizer import build_optimizer  # noqa: E402
from megatron_rlsd.parallel import ParallelConfig, init_distributed  # noqa: E402

HF = {"architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 8, "hidden_size": 1024, "num_attention_heads": 8,
      "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 3072, "vocab_size": 32768}  # fmt: skip


def main():
    platform = init_distributed(ParallelConfig())
    model, _ = build_pipeline_stage(HF, platform)
    model = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                    module=model)  # fmt: skip
    offloader = Offloader(OffloadConfig(grads=True, optimizer=True), model, build_optimizer(OptimConfig(), model, bf16=False))

    def rss():
        return psutil.Process().memory_info().rss / 2**20

    before = rss()
    offloader.for_rollout()
    away = rss()
    offloader.for_training()
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in model.buffers) / 2**20
    print(json.dumps({"before": before, "offloaded": away, "restored": rss(), "grad_buffer": grads}))


if __name__ == "__main__":
    main()
