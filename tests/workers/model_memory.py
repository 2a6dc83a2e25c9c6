"""torchrun worker (4 ranks, TP2PP2, gloo): the model's memory options change nothing numerically.

    torchrun --nproc-per-node 4 tests/workers/model_memory.py SPEC.json REPORT.json
SPEC: {"models": {name: HF folder}, "inputs": {name: torch file of micro-batches}, "memory_model": HF folder,
       "memory_lengths": [prompt, response]}
Micro-batches: {"tokens" [b, T], "resp_pos" [b, R], "resp_ids" [b, R], "mask" [b, R][, vision inputs]}.

For every model, stages are built by build.build_model (HF weights, Megatron DDP) under each
variant of VARIANTS, and one training pass (forward, backward, finalize_model_grads) runs with a
log-likelihood loss of the response tokens; plus a scoring pass of the response log-probs and a
scoring pass of every position's logits (no `resp_pos`). The reference variant makes the logits
of every position and picks the response rows afterwards (`response_logits` below);
the others get response logits from the model (`logit_positions`). Then, on the memory model
(one long prompt), the peak bytes of tensors alive at once during one training pass, with full
logits + response_logits and with response logits only.

REPORT: {"variants": {model: {variant: {"grad_max_rel_diff", "logp_max_abs_diff", "logits_max_abs_diff",
                                        "sequence_parallel"}}},
         "calls": {model: {variant: {"decoder_layers", "decoder_attention", "vision_layers", "vision_attention"}}},
         "grads": {model: {"params", "zero_grads", "grad_max_abs"}},
         "memory": {"full_logits": bytes, "response_logits": bytes, "logits_bytes": bytes}}
(diffs: against the variant's baseline in VARIANTS, maxima over ranks; grad_max_rel_diff: per parameter
relative to its largest gradient; calls: forward calls in the training pass, summed over ranks; grads:
the reference's; memory: the last stage's TP rank 0, logits_bytes = one fp32 [T, V/tp] logits tensor)
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.core import parallel_state as ps  # noqa: E402

from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs  # noqa: E402
from megatron_rlsd.build import build_model  # noqa: E402
from megatron_rlsd.config import Config  # noqa: E402
from megatron_rlsd.models.forward import forward_backward, forward_only  # noqa: E402
from megatron_rlsd.parallel import ParallelConfig, init_distributed, seed_model_parallel_rng  # noqa: E402

# name -> (model.recompute, recompute_method, recompute_num_layers, sequence_parallel, response logits
# from the model, the variant it is compared with). With PP2 each stage holds 2 of the 4 decoder layers.
VARIANTS = {
    "reference": ("none", "uniform", 1, False, False, None),
    "response_logits": ("none", "uniform", 1, False, True, "reference"),
    "selective": ("selective", "uniform", 1, False, True, "response_logits"),
    "full_uniform_1": ("full", "uniform", 1, False, True, "response_logits"),
    "full_uniform_2": ("full", "uniform", 2, False, True, "response_logits"),
    "full_block_1": ("full", "block", 1, False, True, "response_logits"),
    "sequence_parallel": ("none", "uniform", 1, True, True, "response_logits"),
    "sequence_parallel_full_logits": ("none", "uniform", 1, True, False, "reference"),
    "sequence_parallel_full_recompute": ("full", "uniform", 1, True, True, "response_logits"),
}



def response_logits(logits: torch.Tensor, resp_pos: torch.Tensor) -> torch.Tensor:
    """The reference path: [b, T, V] logits of every position -> the [b, R, V] rows that predict
    each response token."""
    return logits[torch.arange(logits.shape[0], device=logits.device).unsqueeze(1), resp_pos]

def build(platform, hf_dir, recompute, method, num_layers, sequence_parallel):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, hf_dir=str(hf_dir), recompute=recompute, recompute_method=method,
                                    recompute_num_layers=num_layers)  # fmt: skip
    cfg.parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                  sequence_parallel=sequence_parallel)  # fmt: skip
    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    model, _ = build_model(cfg, platform, hf_config)
    return model


def as_reference(micro_batches):
    """The micro-batches without `resp_pos` for the model: the loss picks the rows itself."""
    return [{("positions" if k == "resp_pos" else k): v for k, v in mb.items()} for mb in micro_batches]


def response_rows(logits, mb):
    return logits if "resp_pos" in mb else response_logits(logits, mb["positions"])


def logprobs(logits, mb):
    return vocab_parallel_logprobs(response_rows(logits, mb), mb["resp_ids"], tp_group=ps.get_tensor_model_parallel_group())


def loss_fn(logits, mb):
    return -(logprobs(logits, mb) * mb["mask"]).sum() / mb["mask"].sum(), {}


def count_calls(model) -> tuple[dict, list]:
    """Counters of forward calls during a pass, summed over the stage's modules of each kind:
    decoder layers, ViT blocks, and their attention cores; and the hooks' handles."""
    counts = dict.fromkeys(("decoder_layers", "decoder_attention", "vision_layers", "vision_attention"), 0)
    handles = []
    for name, module in model.module.named_modules():
        tower = "vision" if name.startswith("vision_model.") else "decoder"
        kind = "layers" if name.split(".")[-2:-1] == ["layers"] else "attention" if name.endswith(".core_attention") else None
        if kind:
            key = f"{tower}_{kind}"
            handles.append(module.register_forward_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1)))
    return counts, handles


def run(model, micro_batches) -> dict:
    """One training pass's gradients (fp32 grad buffers, after finalize_model_grads) and forward
    calls (`count_calls`, summed over ranks), the response log-probs and the full-sequence logits
    of a scoring pass (last stage; None elsewhere)."""
    counts, handles = count_calls(model)
    forward_backward(model, micro_batches, loss_fn)
    for handle in handles:
        handle.remove()
    for key, value in counts.items():
        t = torch.tensor([value])
        dist.all_reduce(t)
        counts[key] = t.item()
    grads = {n: p.main_grad.clone() for n, p in model.module.named_parameters()}
    logp = forward_only(model, micro_batches, logprobs)
    full = forward_only(model, as_reference(micro_batches), lambda logits, mb: logits.clone())
    return {"grads": grads, "calls": counts, "logp": torch.cat(logp) if logp else None,
            "logits": torch.cat(full) if full else None}  # fmt: skip


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def max_abs_diff(a, b) -> float:
    return 0.0 if a is None else (a - b).abs().max().item()


def compare(ref, out) -> dict:
    """Differences from `ref`: gradients relative to each parameter's largest gradient."""
    grads = ref["grads"].items()
    return {
        "grad_max_rel_diff": max_over_ranks(max(max_abs_diff(out["grads"][n], g) / g.abs().max().item() for n, g in grads)),
        "logp_max_abs_diff": max_over_ranks(max_abs_diff(out["logp"], ref["logp"])),
        "logits_max_abs_diff": max_over_ranks(max_abs_diff(out["logits"], ref["logits"])),
        "sequence_parallel": out["sequence_parallel"],
    }


class PeakBytes(TorchDispatchMode):
    """The peak of the bytes of tensor storages made by torch ops while active and alive at once
    (outputs that alias an input, views and in-place results, count nothing new)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in inputs and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(model, micro_batches) -> int:
    with PeakBytes() as tracker:
        forward_backward(model, micro_batches, loss_fn)
    return tracker.peak


def memory_batch(hf_dir, prompt: int, response: int):
    vocab = json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(3, vocab, (1, prompt + response), generator=torch.Generator().manual_seed(0))
    resp_pos = torch.arange(prompt - 1, prompt - 1 + response).unsqueeze(0)
    return [{"tokens": tokens, "resp_pos": resp_pos, "resp_ids": tokens[:, prompt:],
             "mask": torch.ones(1, response, dtype=torch.bool)}]  # fmt: skip


def main(spec_path, report_path):
    spec = json.loads(Path(spec_path).read_text())
    platform = init_distributed(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    report = {"variants": {}, "calls": {}, "grads": {}}
    for name, hf_dir in spec["models"].items():
        micro_batches = torch.load(spec["inputs"][name], weights_only=True)
        results, report["variants"][name], report["calls"][name] = {}, {}, {}
        for variant, (recompute, method, num_layers, sp, from_model, baseline) in VARIANTS.items():
            seed_model_parallel_rng(1234)
            model = build(platform, hf_dir, recompute, method, num_layers, sp)
            results[variant] = run(model, micro_batches if from_model else as_reference(micro_batches))
            results[variant]["sequence_parallel"] = model.config.sequence_parallel
            report["calls"][name][variant] = results[variant]["calls"]
            if baseline:
                report["variants"][name][variant] = compare(results[baseline], results[variant])
        ref = results["reference"]
        grads = ref["grads"].values()
        report["grads"][name] = {
            "params": int(max_over_ranks(len(grads))),
            "zero_grads": int(max_over_ranks(sum(not g.any() for g in grads))),
            "grad_max_abs": max_over_ranks(max(g.abs().max().item() for g in grads)),
        }

    prompt, response = spec["memory_lengths"]
    micro_batches = memory_batch(spec["memory_model"], prompt, response)
    model = build(platform, spec["memory_model"], "none", "uniform", 1, False)
    full = peak_bytes(model, as_reference(micro_batches))
    only = peak_bytes(model, micro_batches)
    vocab_shard = model.module.output_layer.weight.shape[0] if ps.is_pipeline_last_stage() else 0
    owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    gathered = [None] * dist.get_world_size()
    memory = {"full_logits": full, "response_logits": only, "logits_bytes": (prompt + response) * vocab_shard * 4}
    dist.all_gather_object(gathered, memory if owner else None)
    report["memory"] = next(g for g in gathered if g is not None)
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
