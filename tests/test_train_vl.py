"""The vision-language default end to end: tiny Qwen3-VL, synthetic shapes task, RLSD at TP2PP2 on
4 gloo ranks, with colocated vLLM engines generating from the images.

One run checks: finite losses; every engine's rollout log-probs on image prompts equal Megatron's
after each weight sync (the train/rollout max difference, over all 4 engines' samples); and RL
itself trains the vision tower (its tensors differ between the checkpoints of steps 1 and 3,
both taken after the warm start).
"""

import math

import torch

from test_resume import checkpoint_contents
from test_train import metrics, train


def test_tiny_vl_default_trains_with_images(tmp_path):
    out = tmp_path / "vl"
    # a short warm start on the colour question (random guessing among 4 colours already gives
    # reward variance) plus a small format bonus: enough for real RLSD updates in 3 steps
    proc = train(f"trainer.output_dir={out}", f"model.hf_dir={out / 'tiny_qwen3_vl'}", f"data.train_file={out / 'shapes.jsonl'}",
                 "demo.synthetic_task=largest_color", "demo.synthetic_rows=200", "reward.format_bonus=0.1",
                 "trainer.warmup_sft_steps=25", "trainer.steps=3", "trainer.prompts_per_step=8", "trainer.save_interval=1",
                 "trainer.keep_checkpoints=3",
                 config="examples/tiny_vl_cpu.yaml")  # fmt: skip
    assert "demo: built a tiny Qwen3-VL" in proc.stdout and "data:" in proc.stdout
    rows = metrics(out)
    keys = ("step", "reward", "loss", "grad_norm", "clip_low", "clip_high", "train_rollout_logp_maxdiff")
    print([{k: r.get(k) for k in keys} for r in rows])
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
        assert r["train_rollout_logp_maxdiff"] <= 1e-4, r  # vLLM == Megatron on image prompts, fp32
    assert any(r["grad_norm"] > 0 and r["loss"] != 0 for r in rows[1:])  # rewards varied: real updates
    assert (out / "COMPLETED").is_file()

    steps = [checkpoint_contents(out / "checkpoints" / f"step_000000{n}", tmp_path / f"s{n}.pt") for n in (1, 3)]
    vision = [k for k in steps[0] if k.startswith("vision_model.") and torch.is_tensor(steps[0][k])]
    assert vision and all(k in steps[1] for k in vision)
    changed = [k for k in vision if not torch.equal(steps[0][k], steps[1][k])]
    print(f"vision tensors changed by RL steps 2-3: {len(changed)} of {len(vision)}")
    assert changed, "RL did not train the vision tower"
