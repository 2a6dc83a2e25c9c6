"""Megatron-Core Qwen3-VL equals HF transformers on image batches, at TP1PP1, TP2PP1 and TP2PP2,
through our converter; a TP2PP2-saved checkpoint reloads at TP2PP1 and TP1PP1; the conversion round
trip is bit-exact, vision tower included."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import megatron_parity, run_tool

TOL = 1e-5  # Megatron vs HF fp32 logits, measured <= 2.1e-6 at every layout
IMAGE, VIDEO, VISION_START, VISION_END = 700, 701, 702, 703
PATCH, MERGE = 16, 2


def _build_hf(path, tied: bool):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config=dict(num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=768,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                          "mrope_interleaved": True}),
        # 3 blocks, DeepStack taps after blocks 0 and 2 (not adjacent), a 4x4 learned position grid
        # that every test image resamples differently
        vision_config=dict(depth=3, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 2], patch_size=PATCH),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        tie_word_embeddings=tied,
    )  # fmt: skip
    model = Qwen3VLForConditionalGeneration(config).float()
    with torch.no_grad():  # values far from init defaults, so a mis-mapped tensor cannot hide
        for name, p in model.named_parameters():
            p.normal_(0, 0.05 if p.dim() > 1 else 0.3)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    model.save_pretrained(path)
    return model.eval()


def _row(pieces, length):
    """Token row from text lengths and image grids: text, <vision_start>, image tokens, <vision_end>..."""
    gen = torch.Generator().manual_seed(length + len(pieces))
    tokens, grids = [], []
    for piece in pieces:
        if isinstance(piece, int):
            tokens += torch.randint(3, 600, (piece,), generator=gen).tolist()
        else:
            t, h, w = piece
            tokens += [VISION_START] + [IMAGE] * (t * h * w // MERGE**2) + [VISION_END]
            grids.append(piece)
    assert len(tokens) <= length
    return tokens + [0] * (length - len(tokens)), grids


def _micro_batch(rows, length):
    tokens, grids = [], []
    for pieces in rows:
        t, g = _row(pieces, length)
        tokens.append(t)
        grids += g
    grid = torch.tensor(grids, dtype=torch.long)
    patches = int(grid.prod(-1).sum())
    gen = torch.Generator().manual_seed(patches)
    pixels = torch.randn(patches, 3 * 2 * PATCH * PATCH, generator=gen)
    return {"tokens": torch.tensor(tokens), "pixel_values": pixels, "image_grid_thw": grid}


def _inputs():
    """Two micro-batches of two rows: one or two images per row, five grid sizes (square, tall,
    wide), text before, between and after images, a text-only row, right padding."""
    length = 48
    return [
        _micro_batch([[3, (1, 4, 4), 5, (1, 6, 4), 2], [4, (1, 2, 8), 6]], length),
        _micro_batch([[7], [2, (1, 8, 6), 3, (1, 4, 4), 1]], length),
    ]


def _hf_logits(model, micro_batches):
    outs = []
    with torch.no_grad():
        for mb in micro_batches:
            ids = mb["tokens"]
            kwargs = dict(mm_token_type_ids=(ids == IMAGE).int())
            if len(mb["image_grid_thw"]):
                kwargs.update(pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"])
            outs.append(model(input_ids=ids, **kwargs).logits)
    return torch.cat(outs)


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vl")
    return {name: (root / name, _build_hf(root / name, tied)) for name, tied in (("untied", False), ("tied", True))}


def test_megatron_qwen3_vl_matches_hf_at_tp_pp_layouts(tiny_vl, tmp_path):
    micro_batches = _inputs()
    models = {}
    for name, (hf_dir, model) in tiny_vl.items():
        logits = _hf_logits(model, micro_batches)
        blank = [dict(mb, pixel_values=torch.zeros_like(mb["pixel_values"])) for mb in micro_batches]
        assert (_hf_logits(model, blank) - logits).abs().max() > 0.1  # the pixels matter: parity is not vacuous
        models[name] = (hf_dir, logits)
    layouts = [(1, 1), (2, 1), (2, 2)]
    report = megatron_parity(tmp_path, models, micro_batches, layouts, [(1, 1), (2, 1)])
    assert {(r["model"], r["tp"], r["pp"]) for r in report["logits"]} == {
        (m, tp, pp) for m in ("tied", "untied") for tp, pp in layouts
    }
    for r in report["logits"]:
        assert r["max_abs_diff"] <= TOL, r
    # the TP2PP2-saved checkpoint: the same log-probs at TP2PP1 to the bit, at TP1PP1 up to the
    # reordered fp32 sums of another TP size (measured 1.4e-6)
    tp1, tp2 = report["reshard"]
    assert (tp1["tp"], tp1["pp"], tp2["tp"], tp2["pp"]) == (1, 1, 2, 1)
    assert tp2["equal"] and tp1["max_abs_diff"] <= 5e-6, report["reshard"]

    # the TP2PP2-saved checkpoint exports bit-identical tensors, vision tower included
    run_tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "resharded"), "--out", str(tmp_path / "hf_back"), "--quiet")
    original = load_file(tiny_vl["untied"][0] / "model.safetensors")
    back = load_file(tmp_path / "hf_back" / "model.safetensors")
    assert original.keys() == back.keys()
    assert any(k.startswith("model.visual.deepstack_merger_list.1.") for k in back)
    for k in original:
        assert original[k].dtype == back[k].dtype and torch.equal(original[k], back[k]), k


def test_round_trip_tied_and_export_loads_in_transformers(tiny_vl, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    hf_dir, model = tiny_vl["tied"]
    run_tool("convert_hf_to_megatron", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--quiet")
    run_tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--quiet")
    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    a.pop("lm_head.weight", None)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    micro_batches = _inputs()
    assert torch.equal(_hf_logits(reloaded, micro_batches), _hf_logits(model, micro_batches))


def test_sampled_placeholder_ids_in_responses_are_text(tiny_vl):
    """A policy can sample the image placeholder id; the rollout engine embedded it as text, so
    the model must too: only a row's first (its images' merged patches) placeholders are images."""
    from megatron_rlsd.models.qwen3_vl import Qwen3VLShape, image_token_mask, mrope_position_ids

    shape = Qwen3VLShape.from_hf_config(json.loads((tiny_vl["untied"][0] / "config.json").read_text()))
    row0, grids0 = _row([2, (1, 4, 4), 3], 16)  # 4 image tokens at 3..6
    row1, _ = _row([5], 16)
    row0[12] = IMAGE  # sampled in the response
    row1[7] = IMAGE  # a text-only row's sample
    tokens, grid = torch.tensor([row0, row1]), torch.tensor(grids0)
    mask = image_token_mask(tokens, grid, torch.tensor([1, 0]), shape)
    assert mask[0].nonzero().flatten().tolist() == [3, 4, 5, 6] and not mask[1].any()
    pos = mrope_position_ids(tokens, mask, grid, shape)
    # text resumes after the 2x2 image at offset + max(h, w) / merge, and the sampled id is text
    assert pos[:, 0, 3:7].tolist() == [[3, 3, 3, 3], [3, 3, 4, 4], [3, 4, 3, 4]]
    assert pos[:, 0, 7].tolist() == [5, 5, 5] and pos[:, 0, 12].tolist() == [10, 10, 10]
    assert pos[:, 1].tolist() == [list(range(16))] * 3
