"""Tiny Qwen3-VL: the built folder loads in transformers, and vLLM (the repo's VLLMEngine) matches
HF on image prompts: prompt log-probs, generation, and after weight pushes into the vision tower.

The vLLM side runs once, in a torchrun worker (tests/workers/vllm_images.py) that writes a JSON
report; the tests compare it with HF transformers in the pytest process.
"""

import json

import pytest
import torch
from workers.vllm_images import CASE_IMAGES, CASES, RESPONSE, SIZES, TEMPERATURE, perturbed

TOL = 1e-5  # measured <= 9.6e-7 (fp32 on both sides)

@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    """The tiny Qwen3-VL folder, three test images as PNG files, and the processor's view of
    each case: chat-template prompt ids, expanded ids (+ a response) and the HF model inputs."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from megatron_rlsd.models.tiny_vl import build_tiny_qwen3_vl

    root = tmp_path_factory.mktemp("tiny_vl")
    hf_dir = build_tiny_qwen3_vl(root / "hf", seed=5)
    rng = np.random.default_rng(0)
    paths = {}
    for key, (w, h) in SIZES.items():
        paths[key] = str(root / f"{key}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[key])
    proc = AutoProcessor.from_pretrained(hf_dir)
    response = proc.tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    cases = {}
    for case, content in CASES.items():
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        imgs = [Image.open(paths[k]).convert("RGB") for k in CASE_IMAGES[case]]
        prompt = proc(text=[text], images=imgs, return_tensors="pt")
        full = proc(text=[text + RESPONSE], images=imgs, return_tensors="pt")
        assert full["input_ids"][0].tolist() == prompt["input_ids"][0].tolist() + response
        cases[case] = {
            "prompt": proc.tokenizer(text)["input_ids"],  # one <|image_pad|> per image
            "expanded_prompt": prompt["input_ids"][0].tolist(),
            "sequence": full["input_ids"][0].tolist(),
            "inputs": full,
            "images": [paths[k] for k in CASE_IMAGES[case]],
        }
    return {"dir": hf_dir, "proc": proc, "cases": cases, "root": root}


def _hf_logprobs(model, inputs, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of tokens 1.. under HF's softmax(logits / temperature), fp32 forward as the engine."""
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    return torch.log_softmax(logits[:-1] / temperature, -1).gather(-1, ids[1:, None])[:, 0]


def _hf_model(hf_dir, state=None):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def vllm_report(tiny_vl):
    from conftest import torchrun

    spec = {
        "hf_dir": str(tiny_vl["dir"]),
        "images": {c: v["images"] for c, v in tiny_vl["cases"].items()},
        "prompts": {c: v["prompt"] for c, v in tiny_vl["cases"].items()},
        "expanded_prompts": {c: v["expanded_prompt"] for c, v in tiny_vl["cases"].items()},
        "sequences": {c: v["sequence"] for c, v in tiny_vl["cases"].items()},
    }
    root = tiny_vl["root"]
    (root / "spec.json").write_text(json.dumps(spec))
    torchrun("tests/workers/vllm_images.py", str(root / "spec.json"), str(root / "report.json"), nproc=1)
    return json.loads((root / "report.json").read_text())


def test_tiny_vl_loads_in_transformers(tiny_vl):
    from transformers import AutoConfig, AutoTokenizer

    from megatron_rlsd.models.tiny import VOCAB_MULTIPLE

    cfg = AutoConfig.from_pretrained(tiny_vl["dir"])
    tok = AutoTokenizer.from_pretrained(tiny_vl["dir"])
    assert cfg.architectures == ["Qwen3VLForConditionalGeneration"]
    for attr, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):  # fmt: skip
        assert getattr(cfg, attr) == tok.convert_tokens_to_ids(token) < len(tok)
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert cfg.text_config.vocab_size % VOCAB_MULTIPLE == 0 and cfg.text_config.vocab_size >= len(tok)
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == cfg.text_config.head_dim // 2

    # a chat with two images of different sizes -> placeholders expanded per image grid
    proc = tiny_vl["proc"]
    case = tiny_vl["cases"]["two_images"]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in proc.tokenizer.decode(case["prompt"])
    inputs = case["inputs"]
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 2, 2], [1, 6, 2]]  # 16-px patches of 32x32 and of 40x100 resized to 32x96
    assert inputs["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 16 * 16)
    ids = inputs["input_ids"][0]
    assert int((ids == cfg.image_token_id).sum()) == int(grid.prod(-1).sum()) // 4
    assert inputs["mm_token_type_ids"].shape == inputs["input_ids"].shape

    # the model runs, and the images matter
    model = _hf_model(tiny_vl["dir"])
    lp = _hf_logprobs(model, inputs)
    swapped = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))
    assert torch.isfinite(lp).all()
    assert (lp - _hf_logprobs(model, swapped)).abs().max() > 1e-2


def test_vllm_scores_image_prompts_like_hf(tiny_vl, vllm_report):
    model = _hf_model(tiny_vl["dir"])
    diffs = {}
    for case, c in tiny_vl["cases"].items():
        ref = _hf_logprobs(model, c["inputs"])
        ours = torch.tensor(vllm_report["synced"][case])
        assert ours.shape == ref.shape
        diffs[case] = (ours - ref).abs().max().item()
        # the dummy weights the engine started with really were replaced by the push
        assert (torch.tensor(vllm_report["dummy"][case]) - ref).abs().max() > 0.1
    print(f"vLLM vs HF fp32 image-prompt log-probs, max abs diff: {diffs}")
    assert max(diffs.values()) <= TOL


def test_vllm_generates_with_images(tiny_vl, vllm_report):
    model = _hf_model(tiny_vl["dir"])
    gens = vllm_report["generate"]
    cases = list(tiny_vl["cases"])
    for i, case in enumerate(cases):
        c = tiny_vl["cases"][case]
        single, expanded = gens[i], gens[i + len(cases)]
        # the engine's prompt is the processor's, whichever placeholder form it was given
        assert single["prompt_ids"] == expanded["prompt_ids"] == c["expanded_prompt"]
        assert single["response_ids"] == expanded["response_ids"]  # same seed, same request
        assert len(single["response_ids"]) == len(single["logprobs"]) == 6
        # the sampled tokens' log-probs are HF's at the sampling temperature, on prompt + response
        # with the same pixels
        inputs = dict(c["inputs"])
        ids = torch.tensor([c["expanded_prompt"] + single["response_ids"]])
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones_like(ids)
        mm = torch.zeros_like(ids)
        mm[:, : len(c["expanded_prompt"])] = c["inputs"]["mm_token_type_ids"][0, : len(c["expanded_prompt"])]
        inputs["mm_token_type_ids"] = mm
        ref = _hf_logprobs(model, inputs, TEMPERATURE)[-6:]
        diff = (torch.tensor(single["logprobs"]) - ref).abs().max().item()
        print(f"{case}: sampled log-probs at T={TEMPERATURE}, max abs diff to HF {diff:.2e}")
        assert diff <= TOL
    assert "2 image placeholder(s) but 1 image(s)" in vllm_report["refused"][0]
    assert "differ from the engine's expansion" in vllm_report["refused"][1]


def test_weight_push_reaches_vision_tower(tiny_vl, vllm_report):
    """Pushes through update_weights: all weights perturbed, then only the vision tower again.
    The engine follows HF each time, with the same images it has seen (and cached encoder outputs
    for) before."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_vl["dir"] / "model.safetensors"))
    first = perturbed(state, seed=1)
    second = perturbed(first, seed=2, only="model.visual.")
    for stage, weights in (("perturbed", first), ("vision_perturbed", second)):
        model = _hf_model(tiny_vl["dir"], weights)
        for case, c in tiny_vl["cases"].items():
            ref = _hf_logprobs(model, c["inputs"])
            ours = torch.tensor(vllm_report[stage][case])
            print(f"{stage} {case}: max abs diff {(ours - ref).abs().max().item():.2e}")
            assert (ours - ref).abs().max() <= TOL
    for case in tiny_vl["cases"]:
        synced, p1, p2 = (torch.tensor(vllm_report[s][case]) for s in ("synced", "perturbed", "vision_perturbed"))
        assert (p1 - synced).abs().max() > 1e-2
        # a vision-only change moves the tokens after the first image, and nothing before it
        first_image = tiny_vl["cases"][case]["sequence"].index(tiny_vl["proc"].image_token_id)
        assert (p2 - p1).abs().max() > 1e-2
        torch.testing.assert_close(p2[:first_image], p1[:first_image], rtol=0, atol=1e-6)
