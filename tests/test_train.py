"""The main job end to end on 4 gloo ranks at TP2PP2.

- every loss mode trains with finite losses and changed weights; NaN losses are skipped/stop the run;
- the embedded default (seeded) raises mean reward clearly above its start, and on the way stops
  cleanly on a signal and resumes from its checkpoint;
- bad configs fail before any heavy initialisation with one clear line.
"""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
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
    assert set(report["modes"]) == {"rlsd", "grpo", "opsd", "grpo_opsd", "sdpo", "rlrt", "antisd", "egrsd"}
    for mode, r in report["modes"].items():
        assert r["update_ok"] and r["grad_norm"] > 0 and math.isfinite(r["loss"]) and r["loss"] != 0, (mode, r)
        assert r["leakage"] == 1 / r["samples"], (mode, r)  # the one planted leak, on every rank's metrics
        assert r["accuracy"] > 0, (mode, r)  # the planted solutions are verified correct
        # Adam's first step with wd 0: every weight that moved, moved against its gradient
        assert r["moved"] > 0 and r["moved_with_gradient"] == 0 and r["dot"] < 0, (mode, r)
        if mode in ("rlsd", "grpo", "grpo_opsd"):  # TIS on: planted samples' rollout log-probs are 0
            assert 0 < r["pg_tis_weight"] < 1, (mode, r)
    m = report["modes"]
    # OPSD as the paper ran it: the teacher reads the reference solution (the rows all have one)
    assert m["opsd"]["teacher_reads"] == ["solution", "answer"] and m["opsd"]["opsd_context_fallback"] == 0.0
    assert "solution" not in m["rlsd"]["teacher_reads"] and m["rlsd"]["opsd_context_fallback"] is None
    assert 0 < m["rlrt"]["reweighted"] < 1  # only correct rollouts are reweighted
    assert m["antisd"]["lambda"] == 0.5 and m["antisd"]["gate_open"] == 1.0 and m["antisd"]["antisd_term"] != 0
    assert 0 <= m["antisd"]["sign_flipped"] < 1
    # AntiSD's gate input: the median teacher entropy over the global batch, the same on every rank
    med = report["entropy_median"]
    assert len(set(med["values"])) == 1 and abs(med["values"][0] - med["reference"]) <= 1e-9, med
    assert m["egrsd"]["gated"] is not None and m["egrsd"]["clip_low"] + m["egrsd"]["clip_high"] > 0, m["egrsd"]
    # teacher snapshot refreshed every K=2 steps (the plain step was step 1)
    assert [(t["step"], t["age"], t["equals_policy"]) for t in report["teacher"]] == [
        (2, 0, True), (3, 1, False), (4, 0, True), (5, 1, False), (6, 0, True), (7, 1, False), (8, 0, True),
        (9, 1, False)]  # fmt: skip
    nan = report["nan"]
    assert nan["update_ok"] is False and nan["skipped"] == 1 and nan["weights_unchanged"]
    assert "2 consecutive steps had a non-finite loss or gradient; stopping" in nan["abort"]
    assert nan["latest_is_last_good"] and nan["loaded_step"] == 9 and nan["loaded_weights_equal_saved"]


STEPS, STOP_AT = 15, 12  # CI runs the embedded default's first 15 RLSD steps, stopped once on the way


def test_embedded_default_raises_reward_and_resumes_after_a_stop_signal(tmp_path):
    """The embedded default as `tools/run_default.sh` runs it (seeded: 100 supervised steps, then
    RLSD at TP2PP2 with correct gradient norms), cut to 15 steps: the reward rises. On the way,
    SIGTERM to one rank: every rank checkpoints at the step's end and exits 0 with STOPPED; the
    rerun resumes from there (bitwise, so the curve is the uninterrupted run's), finishes with
    COMPLETED, TensorBoard events and a checkpoint whose export differs from the initial weights."""
    import psutil

    from megatron_rlsd.credit_dump import read_credit_dump
    from megatron_rlsd.data.synthetic import make_synthetic_rows, write_jsonl

    out = tmp_path / "default"
    held_out = write_jsonl(make_synthetic_rows(24, seed=99), tmp_path / "heldout.jsonl")  # validation, another seed
    overrides = (f"trainer.output_dir={out}", f"model.hf_dir={out / 'tiny_qwen3'}", f"data.train_file={out / 'add.jsonl'}",
                 f"trainer.steps={STEPS}", "trainer.save_interval=0", f"data.eval_file={held_out}",
                 "trainer.eval_interval=10", "trainer.dump_credit_interval=10")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={free_port()}",
           "-m", "megatron_rlsd.train", "--config", "examples/tiny_cpu.yaml", *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(tmp_path / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO, env=env)
        console = []
        for line in proc.stdout:
            console.append(line.rstrip("\n"))
            if line.startswith(f"step {STOP_AT:4d} |"):
                workers = [p for p in psutil.Process(proc.pid).children() if "megatron_rlsd.train" in " ".join(p.cmdline())]
                assert len(workers) == 4
                workers[-1].send_signal(signal.SIGTERM)  # one rank is enough: ranks agree at the step's end
        assert proc.wait(timeout=600) == 0, "\n".join(console[-50:]) + (tmp_path / "stderr.log").read_text()[-4000:]
    assert "stopping on signal SIGTERM" in "\n".join(console) or "stopping on signal (another rank)" in "\n".join(console)
    stopped_at = metrics(out)[-1]["step"]
    assert STOP_AT <= stopped_at < STEPS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:07d}"
    assert (out / "STOPPED").is_file() and not (out / "COMPLETED").exists()
    # a quiet console: start-up lines, one line per step, the end
    assert sum(line.startswith("step ") for line in console) == stopped_at, console
    assert len(console) <= stopped_at + 15, "\n".join(console)
    print("console:", len(console), "lines")

    proc = train(*overrides)
    assert f"at step {stopped_at}" in proc.stdout and "resumed from" in proc.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (out / "COMPLETED").is_file() and not (out / "STOPPED").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    run_tool("convert_megatron_to_hf", "--ckpt", str(out / "checkpoints"), "--out", str(tmp_path / "hf_out"), "--quiet")
    before, after = load_file(out / "tiny_qwen3" / "model.safetensors"), load_file(tmp_path / "hf_out" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"

    # validation through the engines every 10 steps; a credit dump of the same step
    evaluated = {r["step"]: r["eval/heldout/accuracy"] for r in rows if "eval/heldout/accuracy" in r}
    print("validation accuracy:", evaluated)
    assert sorted(evaluated) == [10] and all(0 <= a <= 1 for a in evaluated.values())
    assert all(r["eval/heldout/n"] == 24 for r in rows if "eval/heldout/n" in r)
    for step in (10,):
        dump = read_credit_dump(out / "credit" / f"step_{step:07d}.jsonl")
        assert dump and {d.correct for d in dump} == {True, False} and all(d.step == step for d in dump), dump
        for d in dump:  # RLSD's credit has the sign of the sequence advantage, Delta beside it
            assert len(d.tokens) == len(d.credit) == len(d.delta) > 0
            assert all(c * d.advantage >= 0 for c in d.credit), d
    for r in rows:  # throughput and the teacher-student statistics are logged every step
        assert r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0, r
        assert r["teacher_student_kl"] >= 0 and r["teacher_student_abs_gap"] >= abs(r["teacher_student_gap"]), r
        # the engines sample what Megatron scores (fp32; summation-order noise grows with the
        # weights' updates: up to 1.5e-5 measured over 40 steps)
        assert r["train_rollout_logp_maxdiff"] <= 5e-5, r
    rewards = [r["reward"] for r in rows]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    print(f"reward first-5 mean {start:.3f}, last-10 mean {end:.3f}: {[round(r, 3) for r in rewards]}")
    print("grad norms:", [round(r["grad_norm"], 3) for r in rows])
    assert end > start + 0.05, (start, end)
    assert max(r["grad_norm"] for r in rows) < 5, "a gradient-norm spike (e.g. a sampled id with a zero embedding row)"


def _config_error(*overrides, world_size=4) -> str:
    """The validation `megatron_rlsd.train` runs first, in this process: its ConfigError's text."""
    from megatron_rlsd.config import ConfigError
    from megatron_rlsd.train import checked_config

    with pytest.raises(ConfigError) as error:
        checked_config("examples/tiny_cpu.yaml", list(overrides), world_size)
    return str(error.value)


def _cli_config_error(*overrides, world_size="4"):
    env = dict(os.environ, WORLD_SIZE=world_size, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megatron_rlsd.train", "--config", "examples/tiny_cpu.yaml", *overrides],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Megatron" not in proc.stderr and "vLLM" not in proc.stderr  # failed before heavy init
    return lines[0]


def test_bad_configs_fail_fast_with_one_line(tmp_path, tiny_qwen3, monkeypatch):
    # the CLI: one line, exit code 2, before Megatron or vLLM start (a field, then the layout)
    assert "unknown loss mode 'ppo'" in _cli_config_error("algorithm.loss_mode=ppo")
    assert "not divisible by TP*PP" in _cli_config_error(world_size="6")
    # the same validation, in-process, for the rest
    monkeypatch.chdir(REPO)
    assert "group_size must be >= 2" in _config_error("rollout.group_size=1")
    assert "data.train_file" in _config_error("demo.synthetic_task=", f"data.train_file={tmp_path}/none.jsonl")
    assert "context_parallel_size > 1 is not implemented" in _config_error("parallel.context_parallel_size=2")
    assert "virtual_pipeline_model_parallel_size is not implemented" in _config_error(
        "parallel.virtual_pipeline_model_parallel_size=2")
    assert "vllm_tensor_parallel_size=3 does not divide the world size 4" in _config_error("rollout.vllm_tensor_parallel_size=3")
    hf = str(tiny_qwen3["untied"])  # 8 heads, 4 KV heads
    assert "does not divide num_key_value_heads=4" in _config_error(
        f"model.hf_dir={hf}", "demo.tiny_model=", "parallel.tensor_model_parallel_size=8", world_size=16)
    assert "unknown config key trainer.stepz" in _config_error("trainer.stepz=3")
    assert "must be an integer" in _config_error("trainer.steps=many")
