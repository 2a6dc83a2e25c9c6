"""The main job end to end on 4 gloo ranks at TP2PP2.

- every loss mode trains with finite losses and changed weights; NaN losses are skipped/stop the run;
- the CLI stops cleanly on a signal and resumes from its checkpoint;
- the embedded default (seeded) raises mean reward clearly above its start;
- bad configs fail before any heavy initialisation with one clear line.
"""

import json
import math
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO, free_port, run_tool, torchrun


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
        "rollout.max_new_tokens=8", "trainer.micro_batch_size=8", "optim.lr=1e-3", "demo.synthetic_rows=64",
        "algorithm.teacher_refresh_interval=2", *overrides,
    )  # fmt: skip


def test_every_loss_mode_trains_and_faults_are_handled(tmp_path):
    """One 4-rank TP2PP2 launch of the real trainer (tests/workers/loss_modes.py)."""
    torchrun("tests/workers/loss_modes.py", str(tmp_path / "report.json"),
             *small_run(tmp_path, "trainer.warmup_sft_steps=20", "trainer.prompts_per_step=8", "rollout.max_new_tokens=24",
                        "rollout.temperature=0.7", "optim.weight_decay=0", "rollout.truncated_is_cap=2.0",
                        "rollout.weight_bucket_mb=1", "offload.grads=true", "offload.optimizer=true"))  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report))
    # sampling at T = 0.7: the engines' log-probs are Megatron's after the sync (both tempered)
    assert report["temperature"] == 0.7
    assert report["plain_step"]["train_rollout_logp_maxdiff"] <= 1e-5, report["plain_step"]
    # memory changes hands in this order (GPU: vLLM sleeps at level 2 after generating; grads and
    # optimizer state leave before the push wakes the engine's weights, then its KV cache)
    assert report["phase_order"] == ["generate", "sleep", "for_training", "step_with_ready_grads", "for_rollout",
                                     "update_weights"], report["phase_order"]  # fmt: skip
    b = report["buckets"]
    assert b["count_per_sync"] > 2 and b["max_bytes"] <= b["cap"], b  # weight_bucket_mb=1 splits the sync
    assert set(report["modes"]) == {"rlsd", "grpo", "opsd", "grpo_opsd", "sdpo"}
    for mode, r in report["modes"].items():
        assert r["update_ok"] and r["grad_norm"] > 0 and math.isfinite(r["loss"]) and r["loss"] != 0, (mode, r)
        assert r["accuracy"] > 0, (mode, r)  # the planted solutions are verified correct
        # Adam's first step with wd 0: every weight that moved, moved against its gradient
        assert r["moved"] > 0 and r["moved_with_gradient"] == 0 and r["dot"] < 0, (mode, r)
        if mode in ("rlsd", "grpo", "grpo_opsd"):  # TIS on: planted samples' rollout log-probs are 0
            assert 0 < r["pg_tis_weight"] < 1, (mode, r)
    # teacher snapshot refreshed every K=2 steps (the plain step was step 1)
    assert [(t["step"], t["age"], t["equals_policy"]) for t in report["teacher"]] == [
        (2, 0, True), (3, 1, False), (4, 0, True), (5, 1, False), (6, 0, True)]  # fmt: skip
    nan = report["nan"]
    assert nan["update_ok"] is False and nan["skipped"] == 1 and nan["weights_unchanged"]
    assert "2 consecutive steps had a non-finite loss or gradient; stopping" in nan["abort"]
    assert nan["latest_is_last_good"] and nan["loaded_step"] == 6 and nan["loaded_weights_equal_saved"]


def test_cli_run_exports_and_resumes_after_a_stop_signal(tmp_path):
    """The CLI end to end, with vLLM engines spanning 2 ranks each (tensor parallel): SIGTERM to
    one rank -> all ranks checkpoint at the step's end and exit
    0 with STOPPED; a rerun resumes from that step, finishes with COMPLETED, TensorBoard events
    and a checkpoint whose exported weights differ from the initial ones."""
    import time

    import psutil

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={free_port()}",
           "-m", "megatron_rlsd.train", "--config", "examples/tiny_cpu.yaml",
           *small_run(tmp_path, "trainer.steps=200", "trainer.save_interval=0", "rollout.vllm_tensor_parallel_size=2")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    log = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (log.is_file() and log.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.5)
    workers = [p for p in psutil.Process(proc.pid).children() if "megatron_rlsd.train" in " ".join(p.cmdline())]
    assert len(workers) == 4
    workers[-1].send_signal(signal.SIGTERM)  # one rank is enough: ranks agree at the step's end
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping on signal SIGTERM" in out or "stopping on signal (another rank)" in out
    stopped_at = [r["step"] for r in metrics(tmp_path / "out")][-1]
    assert 1 <= stopped_at < 200
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:07d}"
    assert (tmp_path / "out" / "STOPPED").is_file() and not (tmp_path / "out" / "COMPLETED").exists()

    proc = train(*small_run(tmp_path, f"trainer.steps={stopped_at + 1}", "trainer.save_interval=0"))
    assert f"at step {stopped_at}" in proc.stdout and "resumed from" in proc.stdout
    assert "resume: rollout.vllm_tensor_parallel_size 2 -> 1" in proc.stdout  # an engine's size may change
    rows = metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == list(range(1, stopped_at + 2))
    # engines of 2 ranks (the first run) and of 1 (the resumed one) both sample what Megatron scores
    assert max(r["train_rollout_logp_maxdiff"] for r in rows) <= 1e-5, [r["train_rollout_logp_maxdiff"] for r in rows]
    assert (tmp_path / "out" / "COMPLETED").is_file() and not (tmp_path / "out" / "STOPPED").exists()
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    run_tool("convert_megatron_to_hf", "--ckpt", str(tmp_path / "out" / "checkpoints"), "--out", str(tmp_path / "hf_out"), "--quiet")
    before, after = load_file(tmp_path / "tiny" / "model.safetensors"), load_file(tmp_path / "hf_out" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"


def test_embedded_default_raises_reward(tmp_path):
    """The embedded default as `tools/run_default.sh` runs it (seeded: 100 supervised steps, then
    40 RLSD steps at TP2PP2), with correct gradient norms: the reward rises."""
    from megatron_rlsd.credit_dump import read_credit_dump
    from megatron_rlsd.data.synthetic import make_synthetic_rows, write_jsonl

    out = tmp_path / "default"
    held_out = write_jsonl(make_synthetic_rows(24, seed=99), tmp_path / "heldout.jsonl")  # validation, another seed
    proc = train(f"trainer.output_dir={out}", f"model.hf_dir={out / 'tiny_qwen3'}", f"data.train_file={out / 'add.jsonl'}",
                 "trainer.save_interval=0", f"data.eval_file={held_out}", "trainer.eval_interval=20",
                 "trainer.dump_credit_interval=20")  # fmt: skip
    rows = metrics(out)
    # validation through the engines every 20 steps; credit dumps of the same steps
    evaluated = {r["step"]: r["eval/heldout/accuracy"] for r in rows if "eval/heldout/accuracy" in r}
    print("validation accuracy:", evaluated)
    assert sorted(evaluated) == [20, 40] and all(0 <= a <= 1 for a in evaluated.values())
    assert all(r["eval/heldout/n"] == 24 for r in rows if "eval/heldout/n" in r)
    for step in (20, 40):
        dump = read_credit_dump(out / "credit" / f"step_{step:07d}.jsonl")
        assert dump and {d.correct for d in dump} == {True, False} and all(d.step == step for d in dump), dump
        for d in dump:  # RLSD's credit has the sign of the sequence advantage, Delta beside it
            assert len(d.tokens) == len(d.credit) == len(d.delta) > 0
            assert all(c * d.advantage >= 0 for c in d.credit), d
    for r in rows:  # throughput and the teacher-student statistics are logged every step
        assert r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0, r
        assert r["teacher_student_kl"] >= 0 and r["teacher_student_abs_gap"] >= abs(r["teacher_student_gap"]), r
    rewards = [r["reward"] for r in rows]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    print(f"reward first-5 mean {start:.3f}, last-10 mean {end:.3f}: {[round(r, 3) for r in rewards]}")
    print("grad norms:", [round(r["grad_norm"], 3) for r in rows])
    assert len(rows) == 40 and end > start + 0.05, (start, end)
    assert max(r["grad_norm"] for r in rows) < 5, "a gradient-norm spike (e.g. a sampled id with a zero embedding row)"
    # a quiet console: start-up lines, one line per step, the end
    console = proc.stdout.splitlines()
    assert sum(line.startswith("step ") for line in console) == 40, console
    assert len(console) <= 40 + 15, "\n".join(console)
    print("console:", len(console), "lines")


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
    assert "data.train_file" in _config_error(tmp_path, "demo.synthetic_task=", f"data.train_file={tmp_path}/none.jsonl")
    assert "context_parallel_size > 1 is not implemented" in _config_error(tmp_path, "parallel.context_parallel_size=2")
    assert "virtual_pipeline_model_parallel_size is not implemented" in _config_error(
        tmp_path, "parallel.virtual_pipeline_model_parallel_size=2")
    assert "vllm_tensor_parallel_size=3 does not divide the world size 4" in _config_error(tmp_path, "rollout.vllm_tensor_parallel_size=3")
    hf = str(tiny_qwen3["untied"])  # 8 heads, 4 KV heads
    assert "does not divide num_key_value_heads=4" in _config_error(
        tmp_path, f"model.hf_dir={hf}", "demo.tiny_model=", "parallel.tensor_model_parallel_size=8", world_size="16")
    assert "unknown config key trainer.stepz" in _config_error(tmp_path, "trainer.stepz=3")
    assert "must be an integer" in _config_error(tmp_path, "trainer.steps=many")
    assert "not divisible by TP*PP" in _config_error(tmp_path, world_size="6")

