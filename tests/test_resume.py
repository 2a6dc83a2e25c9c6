"""Resuming a run as if it had never stopped, surviving kills, and refusing what would not resume.

The launches form one lineage shared by this module's tests (a 4-rank launch costs ~50 s):

  A1  run A, TP2PP2 on 4 ranks with vLLM engines of 2 ranks each, checkpoint every step; while writing checkpoint 3 (shards
      written, no metadata yet) every rank SIGKILLs itself (test_faults.crash_in_save_*) ->
      step_1, step_2 published, .incomplete-step_0000003 left behind.   Copies: B <- A, C <- A.
  A2  run A again with trainer.steps 3 -> 4 (an allowed change): removes the incomplete step,
      resumes from step 2, runs steps 3-4.
  B   the copy with trainer.resume=never: moves the old outputs aside, runs steps 1-4 in one go.
  C   the copy at TP1PP1 on one rank (a layout and engine-size change): resumes from step 2 and
      runs step 3.

A (stopped, killed mid-save, resumed) must equal B bitwise: every step's metrics, TensorBoard's
scalars and the whole final checkpoint (model, Adam moments and step, teacher snapshot, per-rank
RNG states, the trainer's own state). C's step 3 must be close to B's. Config mismatches and bad data are checked in-process plus one single-process
CLI call each (no torchrun launch).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from conftest import REPO, free_port

STEPS = 4
RUN = (
    "trainer.warmup_sft_steps=30", "trainer.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=24",
    "trainer.micro_batch_size=8", "optim.lr=5e-4", "demo.synthetic_rows=64", "reward.format_bonus=0.5",
    "algorithm.teacher_refresh_interval=3", "trainer.save_interval=1", "trainer.keep_checkpoints=2",
    "rollout.vllm_tensor_parallel_size=2",
)  # fmt: skip
# K=3: at the resumed step 2 the teacher snapshot (the warmed-up policy) differs from the policy


def kill_tree(pid):
    """SIGKILL a process and every process under it at once (torchrun starts each worker in its
    own session, so a process-group kill would miss them)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def launch(work, out, *overrides, nproc=4, timeout=600):
    """The CLI under torchrun; returns (exit code, output); killed with all its processes after
    `timeout` s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "megatron_rlsd.train", "--config", "examples/tiny_cpu.yaml", f"model.hf_dir={work / 'tiny'}",
           f"data.train_file={work / 'add.jsonl'}", f"trainer.output_dir={out}", *RUN, *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    watchdog = threading.Timer(timeout, kill_tree, [proc.pid])
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
        rc = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.stdout.close()
    assert time.time() - t0 < timeout, "launch timed out:\n" + "".join(lines[-50:])
    print(f"launch {out.name} {' '.join(overrides)}: rc {rc}, {time.time() - t0:.0f} s")
    return rc, "".join(lines)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _no_time(row):
    return {k: v for k, v in row.items() if not k.startswith("time_") and not k.endswith("_per_s")}


def checkpoint_contents(step_dir, scratch):
    """Every tensor and object of a dist checkpoint, read in this process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_dir, scratch)
    return torch.load(scratch, weights_only=False)


def _max_diff(a, b, path="") -> tuple[float, str]:
    """Largest absolute difference between two nested structures (inf where they differ in kind)."""
    if torch.is_tensor(a) and torch.is_tensor(b):
        if a.shape != b.shape or a.dtype != b.dtype:
            return math.inf, path
        if not a.is_floating_point():
            return (0.0 if torch.equal(a, b) else math.inf), path
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0, path
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf, f"{path} keys {sorted(set(a) ^ set(b))[:5]}"
        return max((_max_diff(a[k], b[k], f"{path}.{k}") for k in a), default=(0.0, path))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return math.inf, path
        return max((_max_diff(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))), default=(0.0, path))
    return (0.0 if a == b else math.inf), path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    A, B, C = work / "A", work / "B", work / "C"
    logs = {}
    rc, logs["A1"] = launch(work, A, "trainer.steps=3", "test_faults.crash_in_save_at_step=3", "test_faults.crash_in_save_phase=writing")
    assert rc != 0 and "saved checkpoint" in logs["A1"], logs["A1"][-3000:]
    snapshot_after_crash = sorted(p.name for p in (A / "checkpoints").iterdir())
    logs["A1_metrics_steps"] = [r["step"] for r in metrics(A)]
    shutil.copytree(A, B)
    shutil.copytree(A, C)
    rc, logs["A2"] = launch(work, A, f"trainer.steps={STEPS}")
    assert rc == 0, logs["A2"][-4000:]
    rc, logs["B"] = launch(work, B, f"trainer.steps={STEPS}", "trainer.resume=never")
    assert rc == 0, logs["B"][-4000:]
    tp1 = ("parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
           "rollout.vllm_tensor_parallel_size=1", "trainer.steps=3")
    rc, logs["C"] = launch(work, C, *tp1, nproc=1)
    assert rc == 0, logs["C"][-4000:]
    return {"work": work, "A": A, "B": B, "C": C, "logs": logs, "after_crash": snapshot_after_crash}


def test_crash_mid_save_resumes_from_last_complete_checkpoint(runs):
    """A1 died while writing checkpoint 3: A2 drops the unpublished step and resumes from step 2."""
    A, logs = runs["A"], runs["logs"]
    assert runs["after_crash"] == [".incomplete-step_0000003", "hf", "latest", "step_0000001", "step_0000002"]
    assert logs["A1_metrics_steps"] == [1, 2, 3]  # step 3 was logged before the kill
    a2 = logs["A2"]
    assert f"removed unpublished checkpoint {A / 'checkpoints' / '.incomplete-step_0000003'}" in a2
    assert f"resumed from {A / 'checkpoints' / 'step_0000002'} at step 2 (RNG states restored)" in a2
    assert ".incomplete" not in a2.split("resumed from", 1)[1].split("\n", 1)[0]
    assert "resume: trainer.steps 3 -> 4" in a2  # an allowed change, logged
    assert "warm start" not in a2  # resumed runs do not warm-start again
    assert sorted(p.name for p in (A / "checkpoints").iterdir()) == ["hf", "latest", "step_0000003", "step_0000004"]
    assert [r["step"] for r in metrics(A)] == [1, 2, 3, 4]  # the killed run's step 3 was replaced
    assert (A / "COMPLETED").is_file()


def test_resumed_run_equals_uninterrupted_run(runs):
    """A (killed mid-save, resumed) vs B (never stopped): the same metrics at every step and the
    same final checkpoint, every tensor bitwise, per-rank RNG states included."""
    A, B, work = runs["A"], runs["B"], runs["work"]
    ma, mb = metrics(A), metrics(B)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    assert any(r["loss"] != 0 for r in mb[2:]), mb  # the resumed steps learn something
    for ra, rb in zip(ma, mb):
        assert _no_time(ra) == _no_time(rb), (ra, rb)
    # engines of 2 ranks each (A, B) and of one (C) sample what Megatron scores
    for r in ma + mb + metrics(runs["C"]):
        assert r["train_rollout_logp_maxdiff"] <= 1e-5, r
    a = checkpoint_contents(A / "checkpoints" / "step_0000004", work / "a.pt")
    b = checkpoint_contents(B / "checkpoints" / "step_0000004", work / "b.pt")
    groups = {"model": lambda k: not k.startswith(("optimizer.", "teacher.", "rng_state")),
              "optimizer": lambda k: k.startswith("optimizer."), "teacher": lambda k: k.startswith("teacher."),
              "rng": lambda k: k.startswith("rng_state")}  # fmt: skip
    report = {}
    for name, pick in groups.items():
        keys = sorted(k for k in a if pick(k))
        assert keys and keys == sorted(k for k in b if pick(k)), name
        report[name] = _max_diff({k: a[k] for k in keys}, {k: b[k] for k in keys})
    print("exact resume, max |A - B| per group:", report)
    assert all(diff == 0.0 for diff, _ in report.values()), report
    assert len([k for k in a if k.startswith("rng_state/")]) == 4  # one RNG shard per rank
    # the trainer's own state (step, sampler position, teacher age, fault counters)
    common = [torch.load(d / "checkpoints" / "step_0000004" / "common.pt", weights_only=False)["trainer"] for d in (A, B)]
    assert common[0] == common[1], common
    assert common[0]["step"] == 4 and common[0]["sampler"]["position"] == 16 and common[0]["teacher"] == {"age": 1}
    # TensorBoard: the killed run's step 3 was purged and logged again, once
    tb = [_tensorboard_steps(d / "tensorboard", "reward") for d in (A, B)]
    assert tb[0] == tb[1] and [step for step, _ in tb[0]] == [1, 2, 3, 4], tb


def _tensorboard_steps(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_start_fresh_moves_the_previous_run_aside(runs):
    """trainer.resume=never on an output directory with checkpoints: nothing is deleted, the old
    outputs move to previous-<timestamp>/, and the run starts from step 0 (warm start included)."""
    B, log = runs["B"], runs["logs"]["B"]
    (previous,) = B.glob("previous-*")
    assert "trainer.resume=never: moved the previous run's" in log and "resumed from" not in log
    assert "warm start 30/30" in log
    # the unpublished step was removed first (it is garbage), the published ones moved
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == ["hf", "latest", "step_0000001", "step_0000002"]
    assert [r["step"] for r in metrics(previous)] == [1, 2, 3]


def test_resume_at_another_layout(runs):
    """Checkpoint of TP2PP2 x 4 ranks, resumed at TP1PP1 on one rank from step 2: step 3 is close
    to the uninterrupted TP2PP2 run's (same rollouts; log-probs within fp32 noise)."""
    C, B, logs = runs["C"], runs["B"], runs["logs"]
    layout = "RNG states not restored: layout"
    c2 = logs["C"]
    assert f"resumed from {C / 'checkpoints' / 'step_0000002'} at step 2 ({layout}" in c2
    assert "resume: parallel.tensor_model_parallel_size 2 -> 1" in c2
    assert "resume: rollout.vllm_tensor_parallel_size 2 -> 1" in c2  # an engine's size may change
    mc, mb = metrics(C), metrics(B)
    assert [r["step"] for r in mc] == [1, 2, 3]
    c3, b3 = mc[2], mb[2]
    assert all(math.isfinite(c3[k]) for k in ("loss", "grad_norm", "entropy"))
    for k in ("reward", "accuracy", "response_len", "lambda"):
        assert c3[k] == b3[k], (k, c3[k], b3[k])
    # computed before the step's update: the loaded weights at another layout; the gradient norm
    # counts every TP shard of every split weight (build.mark_tensor_parallel_weights)
    diffs = {k: abs(c3[k] - b3[k]) for k in ("loss", "entropy", "teacher_student_gap", "train_rollout_logp_diff")}
    diffs["grad_norm_rel"] = abs(c3["grad_norm"] - b3["grad_norm"]) / b3["grad_norm"]
    print("TP1PP1 resume vs TP2PP2 uninterrupted at step 3, |diff|:", diffs)
    assert max(diffs.values()) < 1e-5, diffs


def test_config_mismatch_is_refused_and_allowed_changes_resume(runs):
    """Fields that define the run are refused with one line naming the field and both values;
    layout, optimizer, length and bookkeeping fields resume (each change noted)."""
    from megatron_rlsd.checkpointer import check_resume
    from megatron_rlsd.config import ConfigError, load_config

    work, A = runs["work"], runs["A"]
    base = [f"model.hf_dir={work / 'tiny'}", f"data.train_file={work / 'add.jsonl'}", f"trainer.output_dir={A}", *RUN,
            f"trainer.steps={STEPS}"]  # fmt: skip

    def check(*extra):
        return check_resume(load_config("examples/tiny_cpu.yaml", [*base, *extra]))

    assert check() == []
    os.symlink(work / "add.jsonl", work / "add_link.jsonl")
    assert check(f"data.train_file={work / 'add_link.jsonl'}") == []  # the same file through another path
    notes = check("trainer.steps=9", "parallel.tensor_model_parallel_size=1", "optim.lr=1e-4", "rollout.max_new_tokens=32")
    assert notes == ["resume: optim.lr 0.0005 -> 0.0001", "resume: parallel.tensor_model_parallel_size 2 -> 1",
                     "resume: rollout.max_new_tokens 24 -> 32", "resume: trainer.steps 4 -> 9"], notes  # fmt: skip
    shutil.copy(work / "add.jsonl", work / "other.jsonl")
    refused = {"algorithm.loss_mode": "grpo", "algorithm.teacher_refresh_interval": 5, "rollout.group_size": 8,
               "rollout.temperature": 0.7, "trainer.seed": 7, "trainer.prompts_per_step": 8, "data.seed": 3,
               "data.train_file": str(work / "other.jsonl"), "reward.format_bonus": 0.0, "model.params_dtype": "bfloat16"}  # fmt: skip
    saved = json.loads((A / "checkpoints" / "step_0000004" / "train_config.json").read_text())
    for field, value in refused.items():
        section, name = field.split(".")
        with pytest.raises(ConfigError) as e:
            check(f"{field}={value}")
        assert f"{field}={value!r} but the checkpoint was written with {field}={saved[section][name]!r}" in str(e.value)
    wide = work / "tiny_wide"
    shutil.copytree(work / "tiny", wide)
    hf = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(hf | {"intermediate_size": hf["intermediate_size"] * 2}))
    with pytest.raises(ConfigError, match="has intermediate_size=512 in config.json but the checkpoint's model has intermediate_size=256"):
        check(f"model.hf_dir={wide}")
    with pytest.raises(ConfigError, match="trainer.resume=require but .* holds no checkpoint"):
        check(f"trainer.output_dir={work / 'empty'}", "trainer.resume=require")
    assert check(f"trainer.output_dir={work / 'empty'}") == []  # auto: nothing to resume, a fresh start

    # the CLI: exit code 2 and one line, before any heavy initialisation
    env = dict(os.environ, WORLD_SIZE="4", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megatron_rlsd.train", "--config", "examples/tiny_cpu.yaml", *base,
                           "algorithm.loss_mode=grpo"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "algorithm.loss_mode='grpo' but the checkpoint was written with algorithm.loss_mode='rlsd'" in lines[0]
    assert "vLLM" not in proc.stderr and "Megatron" not in proc.stderr


BAD_ROWS = [
    '{"id": "ok1", "problem": "What is 1 + 2?", "answer": "3"}',
    '{"id": "r2", "answer": "1"}',  # missing_problem
    '{"id": "r3", "problem": "What is 1 + 1?", "answer": "  "}',  # missing_answer
    '{"id": "r4", "problem": ["not", "a", "string"], "answer": "1"}',  # bad_problem
    '{"id": "r5", "problem": "What is 2 + 2?", "answer": true}',  # bad_answer
    '{"id": "r6", "problem": "What is',  # bad_json (id from the file and line)
    '[1, 2]',  # not_an_object
    '{"id": "r8", "problem": "' + "What is 1 + 1? " * 40 + '", "answer": "2"}',  # prompt_too_long
    '{"id": "r9", "problem": "' + "And 2 + 2? " * 40 + '", "answer": "4"}',  # prompt_too_long
    '{"id": "ok2", "problem": "What is 4 + 4?", "answer": 8}',
]


def test_bad_rows_are_reported_per_reason_and_no_usable_row_is_a_config_error(tmp_path, tiny_qwen3, capsys):
    """The trainer's data loading (single process): one start-up line per skip reason with its
    count and first row ids; prompts over data.max_prompt_tokens after the chat template are
    skipped as prompt_too_long; a dataset without a usable row is a ConfigError."""
    from transformers import AutoTokenizer

    from megatron_rlsd.config import ConfigError, load_config
    from megatron_rlsd.data import PromptTemplates
    from megatron_rlsd.data.training_set import load_training_rows
    from megatron_rlsd.data.vision import PromptEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3["untied"])
    templates = PromptTemplates.from_files("examples/templates/tiny_student.txt", "examples/templates/tiny_teacher.txt")
    encoder = PromptEncoder(tiny_qwen3["untied"], tokenizer, multimodal=False)

    def rows_of(lines, name):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        cfg = load_config("examples/tiny_cpu.yaml", [f"model.hf_dir={tiny_qwen3['untied']}", "demo.tiny_model=",
                                                     f"data.train_file={path}", "demo.synthetic_task=", "data.max_prompt_tokens=64"])  # fmt: skip
        return load_training_rows(cfg.data, encoder, templates), path

    rows, path = rows_of(BAD_ROWS, "bad")
    assert [r.id for r in rows] == ["ok1", "ok2"]
    out = capsys.readouterr().out.splitlines()
    print("\n".join(out))
    assert f"data: {path}: 10 rows, 2 usable, 8 skipped" in out
    for reason, n, ids in [("bad_answer", 1, "r5 (line 5)"), ("bad_json", 1, "bad:6"), ("bad_problem", 1, "r4 (line 4)"),
                           ("missing_answer", 1, "r3 (line 3)"), ("missing_problem", 1, "r2 (line 2)"), ("not_an_object", 1, "bad:7"),
                           ("prompt_too_long (> data.max_prompt_tokens=64 tokens after the chat template)", 2, "r8, r9")]:  # fmt: skip
        assert f"data: skipped {n} row(s) {reason}: first ids {ids}" in out, out
    with pytest.raises(ConfigError, match=r"no usable rows \(skipped: .*missing_problem"):
        rows_of(BAD_ROWS[1:7], "all_bad")
    with pytest.raises(ConfigError, match="no usable rows .*prompt_too_long: 2.*raise data.max_prompt_tokens"):
        rows_of(BAD_ROWS[7:9], "all_long")

    # the CLI (one process, TP1PP1): exit code 2 and one config error line, before any model is built
    cmd = [sys.executable, "-m", "megatron_rlsd.train", "--config", "examples/tiny_cpu.yaml", f"model.hf_dir={tiny_qwen3['untied']}",
           "demo.tiny_model=", f"data.train_file={tmp_path / 'all_bad.jsonl'}", "demo.synthetic_task=",
           "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1", f"trainer.output_dir={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"data.train_file {tmp_path / 'all_bad.jsonl'}: no usable rows" in lines[0]
    assert "vLLM" not in proc.stderr + proc.stdout


def test_unpublished_checkpoints_are_found_and_pruning_never_touches_newer_steps(tmp_path):
    """`latest` is the commit point: `.incomplete-*` directories and step directories newer than
    `latest` (a writer killed between the rename and `latest`) are unpublished; keeping the last K
    only ever deletes steps older than the one just published."""
    from megatron_rlsd.checkpoint import dist as ckpt

    root = tmp_path / "checkpoints"
    for name in ("step_0000001", "step_0000002", "step_0000003", "step_0000005", ".incomplete-step_0000004", "hf"):
        (root / name).mkdir(parents=True)
    assert ckpt.unpublished_dirs(root) == [root / ".incomplete-step_0000004"]  # no `latest`: steps are left alone
    ckpt.publish_latest(root, root / "step_0000003")
    assert ckpt.unpublished_dirs(root) == [root / ".incomplete-step_0000004", root / "step_0000005"]
    assert ckpt.prune_step_dirs(root, root / "step_0000003", keep=2) == [root / "step_0000001"]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000003", "step_0000005"]
