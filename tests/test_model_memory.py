"""The model's memory options change nothing they should not, at TP2PP2 on 4 gloo ranks, for Qwen3
(tied and untied embeddings) and Qwen3-VL (images, DeepStack): activation recomputation
(selective, full uniform and block), sequence parallelism (sequence lengths that TP does not
divide), and response-only logits (`logit_positions`), alone and combined. One torchrun launch
(tests/workers/model_memory.py), which also measures the memory response-only logits save."""

import dataclasses
import json

import pytest
import torch

from conftest import torchrun

PROMPT, RESPONSE = 2048, 128  # the memory check's sequence
LAYERS, MICRO_BATCHES, TP = 4, 2, 2
# Forward calls of decoder layers and attention cores in a training pass, per layer, micro-batch
# and TP rank: full recompute reruns layers (block: the first of each stage's 2), selective the
# attention cores. The ViT reruns every block under full recompute, whatever the method.
RERUNS = {"selective": (1, 2, 1, 2), "full_uniform_1": (2, 2, 2, 2), "full_uniform_2": (2, 2, 2, 2),
          "full_block_1": (1.5, 1.5, 2, 2), "sequence_parallel_full_recompute": (2, 2, 2, 2)}  # fmt: skip


def _text_batch(vocab: int, b: int, length: int, prompts: list[int], responses: list[int], seed: int) -> dict:
    """Right-padded rows of a prompt and a response each, and the response's targets."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (b, length), generator=gen)
    width = max(responses)
    resp_pos = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, p + r :] = 0
        resp_pos[i, :r] = torch.arange(p - 1, p - 1 + r)
        mask[i, :r] = True
    resp_ids = torch.where(mask, tokens.gather(1, resp_pos + 1), 0)
    return {"tokens": tokens, "resp_pos": resp_pos, "resp_ids": resp_ids, "mask": mask}


def _text_inputs(vocab: int) -> list[dict]:
    """47 tokens (sequence parallelism pads them to 48), responses 15 wide (its response rows to 16)."""
    return [_text_batch(vocab, 2, 47, [20, 31], [9, 15], seed=1), _text_batch(vocab, 2, 47, [12, 30], [15, 7], seed=2)]


def _vl_inputs(hf_dir) -> list[dict]:
    """Two micro-batches of two rows: (start, grid) of each image (4 or 6 image tokens), a row
    with two, one with an image across the middle of the sequence (where sequence parallelism
    splits it), a text-only row; 41 tokens (sequence parallelism pads them to 42)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    image, first_special = cfg["image_token_id"], cfg["vision_start_token_id"]
    patch, merge = cfg["vision_config"]["patch_size"], cfg["vision_config"]["spatial_merge_size"]
    out = []
    layouts = [(1, [26, 28], [[(2, (1, 4, 4)), (9, (1, 6, 4))], [(18, (1, 4, 6))]]), (2, [26, 20], [[], [(3, (1, 4, 4))]])]
    for seed, prompts, rows in layouts:
        mb = _text_batch(first_special, 2, 41, prompts, [12, 9], seed=seed)  # no vision special ids
        for i, row in enumerate(rows):
            for start, (t, h, w) in row:
                mb["tokens"][i, start : start + t * h * w // merge**2] = image
        grid = torch.tensor([g for row in rows for _, g in row], dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        mb["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * patch * patch, generator=gen)
        mb["image_grid_thw"] = grid
        mb["images_per_row"] = torch.tensor([len(row) for row in rows])
        out.append(mb)
    return out


def test_recompute_sequence_parallel_and_response_logits_change_nothing(tiny_qwen3, tmp_path):
    from megatron_rlsd.models.tiny import build_tiny_qwen3
    from megatron_rlsd.models.tiny_vl import build_tiny_qwen3_vl

    vl = build_tiny_qwen3_vl(tmp_path / "vl", num_layers=LAYERS)
    models = {"qwen3_untied": tiny_qwen3["untied"], "qwen3_tied": tiny_qwen3["tied"], "qwen3_vl": vl}
    inputs, images = {}, {}
    for name, hf_dir in models.items():
        if name == "qwen3_vl":
            micro_batches = _vl_inputs(hf_dir)
        else:
            micro_batches = _text_inputs(json.loads((hf_dir / "config.json").read_text())["vocab_size"])
        images[name] = sum(len(mb.get("image_grid_thw", ())) for mb in micro_batches)
        torch.save(micro_batches, tmp_path / f"{name}.pt")
        inputs[name] = str(tmp_path / f"{name}.pt")
    # a vocabulary of Qwen3's order of magnitude, so that the logits dominate the last stage
    wide = build_tiny_qwen3(tmp_path / "wide", vocab_size=32768, hidden_size=64, intermediate_size=128)
    spec = {"models": {k: str(v) for k, v in models.items()}, "inputs": inputs, "memory_model": str(wide),
            "memory_lengths": [PROMPT, RESPONSE]}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun("tests/workers/model_memory.py", str(tmp_path / "spec.json"), str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report, indent=1))

    for name in models:
        grads = report["grads"][name]
        assert grads["zero_grads"] == 0 and grads["params"] > 0, grads  # every parameter learns (ViT, DeepStack)
        variants = report["variants"][name]
        assert variants.keys() == set(RERUNS) | {"response_logits", "sequence_parallel", "sequence_parallel_full_logits"}
        for variant, r in variants.items():
            assert r["sequence_parallel"] == variant.startswith("sequence_parallel"), (name, variant)
            if variant in ("selective", "full_uniform_1", "full_uniform_2", "full_block_1"):
                # recomputation reruns the same operations: the same numbers to the bit
                assert r["grad_max_rel_diff"] == r["logp_max_abs_diff"] == r["logits_max_abs_diff"] == 0.0, (name, variant, r)
            elif variant == "response_logits":
                # the output layer on the response rows only: measured 2.0e-7 (gradients,
                # relative to each parameter's largest), 0 (log-probs)
                assert r["grad_max_rel_diff"] <= 1e-6 and r["logp_max_abs_diff"] <= 1e-6, (name, r)
            else:
                # sequence parallelism: the norms' weight gradients are summed in two halves
                # (measured 4.6e-7); logits and log-probs are sums over the same terms in the same
                # order (two ranks) and come out to the bit
                assert r["grad_max_rel_diff"] <= 2e-6, (name, variant, r)
                assert r["logp_max_abs_diff"] == r["logits_max_abs_diff"] == 0.0, (name, variant, r)
        calls = report["calls"][name]
        base = calls["reference"]
        decoder = LAYERS * MICRO_BATCHES * TP
        vision = json.loads((vl / "config.json").read_text())["vision_config"]["depth"] * images[name] * TP
        assert base == {"decoder_layers": decoder, "decoder_attention": decoder, "vision_layers": vision,
                        "vision_attention": vision}  # fmt: skip
        for variant, counts in calls.items():
            factors = RERUNS.get(variant, (1, 1, 1, 1))
            assert list(counts.values()) == [n * f for n, f in zip(base.values(), factors)], (name, variant, counts)

    # response logits on the last stage: at least one [T, V/tp] fp32 logits tensor less at the
    # peak (measured: 441.6 MB -> 217.3 MB, 224.3 MB saved, 1.57 logits tensors of 142.6 MB)
    memory = report["memory"]
    assert memory["full_logits"] - memory["response_logits"] >= memory["logits_bytes"], memory


def test_recompute_and_sequence_parallel_config_fields():
    """model.recompute* and parallel.sequence_parallel map onto TransformerConfig; unusable values
    are refused naming the fix; the ViT follows the decoder's recompute but never splits its sequence."""
    from megatron_rlsd.models import qwen3, qwen3_vl
    from megatron_rlsd.platform import Platform

    cpu = Platform("cpu", "gloo")
    shape = qwen3.Qwen3Shape(num_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             intermediate_size=128, vocab_size=256, rms_norm_eps=1e-6, rope_theta=1e6,
                             tie_word_embeddings=False, max_position_embeddings=128)  # fmt: skip
    fields = ("recompute_granularity", "recompute_method", "recompute_num_layers", "sequence_parallel")

    def config(**kwargs):
        c = qwen3.transformer_config(shape, cpu, **kwargs)
        return tuple(getattr(c, f) for f in fields)

    assert config() == (None, None, None, False)
    assert config(recompute="selective", tp=2, sequence_parallel=True) == ("selective", None, None, True)
    assert config(recompute="full", recompute_method="block", recompute_num_layers=3) == ("full", "block", 3, False)
    assert config(recompute="full", recompute_num_layers=2, pp=2) == ("full", "uniform", 2, False)
    assert config(sequence_parallel=True) == (None, None, None, False)  # nothing to split at TP1
    with pytest.raises(ValueError, match="recompute_num_layers=3 does not divide the 4 decoder layers.*block"):
        config(recompute="full", recompute_num_layers=3)
    with pytest.raises(ValueError, match="recompute_num_layers=2 does not divide the 1 decoder layers"):
        config(recompute="full", recompute_num_layers=2, pp=4)
    with pytest.raises(ValueError, match="model.recompute must be one of none, selective, full"):
        config(recompute="everything")

    vision = qwen3_vl.VisionShape(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, in_channels=3,
                                  patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                                  num_position_embeddings=16, deepstack_visual_indexes=(0,))  # fmt: skip
    vl_shape = qwen3_vl.Qwen3VLShape(**dataclasses.asdict(shape), vision=vision, mrope_section=(2, 3, 3))
    text = qwen3_vl.transformer_config(vl_shape, cpu, tp=2, sequence_parallel=True, recompute="full",
                                       recompute_method="block", recompute_num_layers=1)  # fmt: skip
    vision = qwen3_vl.vision_transformer_config(vl_shape, text)
    assert tuple(getattr(text, f) for f in fields) == ("full", "block", 1, True)
    assert tuple(getattr(vision, f) for f in fields) == ("full", "block", 1, False)
