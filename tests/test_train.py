"""The main job end to end: `torchrun -m megatron_rlsd.train` on 4 gloo ranks at TP2PP2.

- a few steps in every loss mode finish with finite losses and changed weights;
- a run resumes from its checkpoint;
- the embedded default (seeded) raises mean reward clearly above its start;
- bad configs fail before any heavy initialisation with one clear line.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port, run_tool


def train(*overrides, config="examples/tiny_cpu.yaml", nproc=4, timeout=900):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "megatron_rlsd.train", "--config", config, *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def small_run(tmp, *overrides):
    return (
        f"model.hf_dir={tmp / 'tiny'}", f"data.train_file={tmp / 'add.jsonl'}", f"trainer.output_dir={tmp / 'out'}",
        "trainer.warmup_sft_steps=0", "trainer.steps=2", "trainer.prompts_per_step=4", "rollout.group_size=4",
        "rollout.max_new_tokens=8", "trainer.micro_batch_size=8", "optim.lr=1e-3", "data.synthetic_rows=64",
        "algorithm.teacher_refresh_interval=2", *overrides,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["rlsd", "grpo", "opsd", "grpo_opsd", "sdpo"])
def test_every_loss_mode_trains_a_few_steps(tmp_path, mode):
    extra = ["algorithm.sdpo_topk=16"]
    if mode == "sdpo":
        # SDPO's teacher context is a correct sibling: warm the tiny model up so some exist
        extra += ["trainer.warmup_sft_steps=60", "trainer.prompts_per_step=8", "rollout.max_new_tokens=24"]
    proc = train(*small_run(tmp_path, f"algorithm.loss_mode={mode}", *extra))
    rows = metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    assert "step    2 |" in proc.stdout
    # the trained weights differ from the initial HF weights
    run_tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "out" / "checkpoints"), "--out", str(tmp_path / "hf_out"), "--quiet")
    before, after = load_file(tmp_path / "tiny" / "model.safetensors"), load_file(tmp_path / "hf_out" / "model.safetensors")
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    if mode in ("opsd", "sdpo") and max(abs(r["loss"]) for r in rows) == 0.0:
        pytest.fail(f"{mode}: zero loss, nothing to learn from")
    assert changed, "no weight changed"


def test_run_resumes_from_its_checkpoint(tmp_path):
    train(*small_run(tmp_path, "trainer.save_interval=1"))
    proc = train(*small_run(tmp_path, "trainer.save_interval=1", "trainer.steps=3"))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2, 3]


def test_embedded_default_raises_reward(tmp_path):
    out = tmp_path / "default"
    train(f"trainer.output_dir={out}", f"model.hf_dir={out / 'tiny_qwen3'}", f"data.train_file={out / 'add.jsonl'}",
          "trainer.save_interval=0")  # fmt: skip
    rewards = [r["reward"] for r in metrics(out)]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    print(f"reward first-5 mean {start:.3f}, last-10 mean {end:.3f}: {[round(r, 3) for r in rewards]}")
    assert end > start + 0.05, (start, end)


def _config_error(tmp_path, *overrides, world_size="4"):
    env = dict(os.environ, WORLD_SIZE=world_size, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megatron_rlsd.train", "--config", "examples/tiny_cpu.yaml", *overrides],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Megatron" not in proc.stderr and "vLLM" not in proc.stderr  # failed before heavy init
    return lines[0]


def test_bad_configs_fail_fast_with_one_line(tmp_path, tiny_qwen3):
    assert "unknown loss mode 'ppo'" in _config_error(tmp_path, "algorithm.loss_mode=ppo")
    assert "group_size must be >= 2" in _config_error(tmp_path, "rollout.group_size=1")
    assert "data.train_file" in _config_error(tmp_path, "data.synthetic_task=", f"data.train_file={tmp_path}/none.jsonl")
    hf = str(tiny_qwen3["untied"])  # 8 heads, 4 KV heads
    assert "does not divide num_key_value_heads=4" in _config_error(
        tmp_path, f"model.hf_dir={hf}", "model.build_tiny=false", "parallel.tensor_model_parallel_size=8", world_size="16")
    assert "unknown config key trainer.stepz" in _config_error(tmp_path, "trainer.stepz=3")
    assert "must be an integer" in _config_error(tmp_path, "trainer.steps=many")
    assert "not divisible by TP*PP*CP" in _config_error(tmp_path, world_size="6")
