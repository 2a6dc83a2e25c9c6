"""The vision-language default end to end: tiny Qwen3-VL, synthetic shapes task, RLSD at TP2PP2 on
4 gloo ranks, with colocated vLLM engines generating from the images.

One run checks: finite losses; every engine's rollout log-probs on image prompts equal Megatron's
after each weight sync (the train/rollout max difference, over all 4 engines' samples); and the
vision tower itself is trained (its exported tensors changed).
"""

import math

import torch
from safetensors.torch import load_file

from conftest import run_tool
from test_train import metrics, train


def test_tiny_vl_default_trains_with_images(tmp_path):
    out = tmp_path / "vl"
    # a short warm start on the colour question (random guessing among 4 colours already gives
    # reward variance) plus a small format bonus: enough for real RLSD updates in 3 steps
    proc = train(f"trainer.output_dir={out}", f"model.hf_dir={out / 'tiny_qwen3_vl'}", f"data.train_file={out / 'shapes.jsonl'}",
                 "data.synthetic_task=largest_color", "data.synthetic_rows=200", "reward.format_bonus=0.1",
                 "trainer.warmup_sft_steps=25", "trainer.steps=3", "trainer.save_interval=0",
                 config="examples/tiny_vl_cpu.yaml")  # fmt: skip
    assert "built tiny Qwen3-VL" in proc.stdout and "data:" in proc.stdout
    rows = metrics(out)
    keys = ("step", "reward", "loss", "grad_norm", "clip_low", "clip_high", "train_rollout_logp_maxdiff")
    print([{k: r.get(k) for k in keys} for r in rows])
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
        assert r["train_rollout_logp_maxdiff"] <= 1e-4, r  # vLLM == Megatron on image prompts, fp32
    assert any(r["grad_norm"] > 0 and r["loss"] != 0 for r in rows)  # rewards varied: real updates
    assert (out / "COMPLETED").is_file()

    run_tool("convert_megatron_to_hf", "--ckpt", str(out / "checkpoints"), "--out", str(tmp_path / "hf_out"), "--quiet")
    before = load_file(out / "tiny_qwen3_vl" / "model.safetensors")
    after = load_file(tmp_path / "hf_out" / "model.safetensors")
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith("model.visual.")]
    assert vision and any(not torch.equal(before[k], after[k]) for k in vision), "the vision tower did not train"
