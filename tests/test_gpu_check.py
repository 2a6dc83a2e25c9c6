"""benchmarks/gpu/check.py, the prepared GPU check, at its CPU smoke size: the same script that a
GPU machine runs (build, trainer stages, checkpoint round trip, weight export) must run end to end
here and write the report the device run is read from."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_runs_at_the_tiny_cpu_size_and_reports(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu/check.py"), "--device", "cpu", "--shape", "tiny",
         "--out", str(out), "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["ok"] and all(result["checks"].values()), result["checks"]
    # the parent's checks and each run's own, all present
    assert {"within_budget", "checkpoint_round_trip_ran", "run1.finished", "run1.policy_changed",
            "run1.rollout_logprobs_match_megatron", "run1.checkpoint_restores_every_tensor",
            "run1.checkpoint_restores_trainer_state", "run1.export_after_reload_equals_export_before_save",
            "run1.every_stage_ran"} <= set(result["checks"])  # fmt: skip
    (run,) = result["runs"]
    assert run["spec"]["shape"] == "tiny" and run["environment"]["backend"] == "gloo"
    assert run["environment"]["megatron_rlsd"] == str(REPO / "megatron_rlsd")  # the tree under test, not an install
    steps = run["run_size"]["steps"]
    assert [m["step"] for m in run["metrics"]] == list(range(1, steps + 1))
    # one record per stage and step (plus the sync before the first step), each with a time;
    # the model stages with their tokens, rate and MFU; no GPU memory on the CPU
    stages = {(r["step"], r["stage"]) for r in run["stages"]}
    per_step = ("rollout", "reward", "teacher", "update", "sync")
    assert stages == {(0, "sync")} | {(s, st) for s in range(1, steps + 1) for st in per_step}
    for r in run["stages"]:
        assert r["time_s"] > 0 and r["peak_allocated_gib"] is None, r
        if r["stage"] in ("update", "teacher"):
            assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1, r
    # the stand-in received every HF tensor at the first sync and after each step
    assert run["export"]["syncs"] == steps + 1 and run["export"]["tensors"] > 0 and run["export"]["bytes"] > 0
    # fp32 on the CPU: Megatron's log-probs equal the stand-in's (weights through the export);
    # measured mean 1.5e-7, max 9.5e-7
    assert all(m["train_rollout_logp_diff"] < 1e-5 for m in run["metrics"])
    # both reloads compared every saved tensor: the model's, the optimizer's (fp32 main weights,
    # two moments and the step per weight) and the teacher's
    ck = run["checkpoint"]
    kinds = ck["tensors_by_kind"]
    assert ck["ran"] and ck["bytes"] > 0 and kinds["model/"] > 0 and kinds["teacher/"] == kinds["model/"]
    assert kinds["optimizer"] == 4 * kinds["model/"], kinds
    for reload in ("load", "load_into_fresh_optimizer"):
        assert ck[f"{reload}_tensors_differing"] == [] and ck[f"{reload}_tensors_compared"] == sum(kinds.values()), ck
    assert run["placement"] == {"model": ["cpu"], "optimizer": ["cpu"], "teacher": ["cpu"], "rollout_stand_in": ["cpu"]}
    for phase in ("build", "checkpoint_save", "load", "export_after_reload", "load_into_fresh_optimizer"):
        assert run["phases"][phase] > 0
    text = (out / "gpu_check.txt").read_text()
    assert text.startswith("megatron_rlsd GPU check: PASS") and "MFU = 6 x params x tokens" in text
    assert (out / "part-1-tiny.json").is_file()
    assert not (tmp_path / "work" / "tiny").exists()  # model files and checkpoint removed
