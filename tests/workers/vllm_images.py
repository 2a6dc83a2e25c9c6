"""torchrun worker (1 rank): the repo's VLLMEngine on image prompts of the tiny Qwen3-VL, starting
from dummy weights, every weight pushed with update_weights. Writes a JSON report that
tests/test_tiny_vl.py compares with HF transformers.

    torchrun --nproc-per-node 1 tests/workers/vllm_images.py SPEC.json REPORT.json
"""

import json
import sys
from pathlib import Path

import torch

# (W, H): 32x32 is one merged 32x32 patch (1 token), 96x64 is 3x2 of them (6 tokens), 40x100 is
# resized to 32x96 (3 tokens)
SIZES = {"a": (32, 32), "b": (96, 64), "c": (40, 100)}
# user content per case: one image; two images of different sizes around text
CASES = {
    "one_image": [{"type": "image"}, {"type": "text", "text": "What is 3+4?"}],
    "two_images": [{"type": "image"}, {"type": "text", "text": "Count the items in both lists."}, {"type": "image"}],
}
CASE_IMAGES = {"one_image": ["b"], "two_images": ["a", "c"]}
RESPONSE = "The answer is <answer>7</answer>."
TEMPERATURE = 0.7  # generate's: its log-probs are those of softmax(logits / TEMPERATURE)


def perturbed(state: dict[str, torch.Tensor], seed: int, only: str = "") -> dict[str, torch.Tensor]:
    """Deterministic multiplicative noise (norm weights move too) on tensors whose name starts
    with `only`; the others are returned as they are."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(state):
        t = state[name]
        out[name] = t * (1 + 0.3 * torch.randn(t.shape, generator=gen)) if name.startswith(only) else t
    return out


def _worker(spec_path: str, report_path: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from safetensors.torch import load_file

    from megatron_rlsd.config import RolloutConfig
    from megatron_rlsd.parallel import ParallelConfig, init_distributed
    from megatron_rlsd.rollout.vllm_engine import VLLMEngine

    spec = json.loads(Path(spec_path).read_text())
    platform = init_distributed(ParallelConfig())
    engine = VLLMEngine(spec["hf_dir"], RolloutConfig(kv_cache_mb=64), platform, max_model_len=512, seed=0)
    images = [spec["images"][c] for c in CASES]  # file paths: the engine opens them

    def push(state):  # two buckets: the vision tower, then the language model and head
        def buckets():
            yield [(k, v) for k, v in sorted(state.items()) if k.startswith("model.visual.")]
            yield [(k, v) for k, v in sorted(state.items()) if not k.startswith("model.visual.")]

        engine.sleep()  # as after a rollout
        engine.update_weights(buckets())

    def score():  # the expanded prompt + response of each case
        return dict(zip(CASES, engine.score([spec["sequences"][c] for c in CASES], images)))

    report = {"dummy": score()}
    state = load_file(str(Path(spec["hf_dir"]) / "model.safetensors"))
    push(state)
    report["synced"] = score()
    # the same prompts with one placeholder per image (chat template) and processor-expanded
    prompts = [spec["prompts"][c] for c in CASES] + [spec["expanded_prompts"][c] for c in CASES]
    gens = engine.generate(prompts, [11, 12, 11, 12], temperature=TEMPERATURE, top_p=1.0, max_new_tokens=6,
                           stop_token_ids=[], images=images + images)  # fmt: skip
    report["generate"] = [g.__dict__ for g in gens]
    # bad placeholders are refused: a count that does not match the images, and an expansion
    # (5 tokens for a 6-token image) that is not the engine's
    two, one = spec["prompts"]["two_images"], spec["expanded_prompts"]["one_image"]
    pad = engine.image_token_id
    short = one[: one.index(pad)] + one[one.index(pad) + 1 :]
    report["refused"] = []
    for prompt, imgs in ((two, images[0]), (short, images[0])):
        try:
            engine.generate([prompt], [0], temperature=1.0, top_p=1.0, max_new_tokens=1, stop_token_ids=[], images=[imgs])
            report["refused"].append(None)
        except ValueError as e:
            report["refused"].append(str(e))
    push(perturbed(state, seed=1))
    report["perturbed"] = score()
    push(perturbed(perturbed(state, seed=1), seed=2, only="model.visual."))
    report["vision_perturbed"] = score()
    Path(report_path).write_text(json.dumps(report))
    engine.close()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
