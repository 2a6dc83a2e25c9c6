"""benchmarks/gpu/check.py, the prepared GPU check, at its CPU smoke size: the same script that a
GPU machine runs (build, trainer stages, checkpoint round trip, weight export) must run end to end
here and write the report the device run is read from."""

import importlib.util
import json
import math
import os
import subprocess
import sys

from conftest import REPO


def _load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
    # the log-prob kernel, timed before the build against log_softmax + gather: every size's figures
    # finite and positive; on the CPU no device peak (so no bandwidth ratio) and no GPU memory
    lk = run["logprob_kernel"]
    assert "error" not in lk and lk["tp_world_size"] == 1 and lk["dtype"] == "bfloat16", lk
    sizes = lk["sizes"]
    assert len(sizes) == 2 and sizes[0]["tokens"] < sizes[1]["tokens"]
    for rec in sizes + [lk]:  # lk: the headline, the largest N
        for key in ("tokens", "vocab", "bytes", "kernel_s", "naive_s", "kernel_with_entropy_s", "achieved_gbps",
                    "naive_gbps", "time_ratio"):  # fmt: skip
            assert isinstance(rec[key], (int, float)) and math.isfinite(rec[key]) and rec[key] > 0, (key, rec)
        assert rec["bytes"] == rec["tokens"] * (3 * rec["vocab"] * 2 + 40)  # logits read twice, gradient written once
        assert rec["peak_gbps"] is None and rec["bandwidth_ratio"] is None, rec
        assert rec["extra_mib"] is None and rec["naive_extra_mib"] is None, rec
        assert rec["max_logp_diff"] < 1e-3 and rec["max_grad_diff"] < 1e-2, rec
    assert lk["tokens"] == sizes[-1]["tokens"] and lk["kernel_s"] == sizes[-1]["kernel_s"]
    assert run["phases"]["logprob_kernel"] > 0
    assert {"run1.logprob_kernel_figures_finite_positive", "run1.logprob_kernel_matches_naive"} <= set(result["checks"])
    assert not any("bandwidth" in k or "slower_than_naive" in k for k in result["checks"])  # GPU-only checks
    for phase in ("build", "checkpoint_save", "load", "export_after_reload", "load_into_fresh_optimizer"):
        assert run["phases"][phase] > 0
    text = (out / "gpu_check.txt").read_text()
    assert text.startswith("megatron_rlsd GPU check: PASS") and "MFU = 6 x params x tokens" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("   log-prob kernel (fwd+bwd, bfloat16, vocab ")]
    assert "device peak unknown" in line and all(f"N {r['tokens']}: kernel " in line for r in sizes), line
    assert "GB/s" in line and "kernel/naive" in line and "ERROR" not in line, line
    assert (out / "part-1-tiny.json").is_file()
    assert not (tmp_path / "work" / "tiny").exists()  # model files and checkpoint removed


def test_gpu_check_peak_bandwidth_table_and_kernel_line():
    check = _load_check()
    assert check.peak_dram("NVIDIA H200") == ("H200", 4.8e12)
    assert check.peak_dram("NVIDIA H100 80GB HBM3") == ("H100 SXM", 3.35e12)
    assert check.peak_dram("NVIDIA H100 PCIe") == ("H100 PCIe", 2.0e12)
    assert check.peak_dram("NVIDIA A100-SXM4-80GB") == ("A100 80GB SXM", 2.039e12)
    for unknown in ("NVIDIA GH200 480GB", "NVIDIA A100-SXM4-40GB", "NVIDIA L4", "cpu"):
        assert check.peak_dram(unknown) == (None, None), unknown
    assert check.logprob_min_bytes(16384, 151936) == 16384 * (3 * 151936 * 2 + 40)
    rec = {"tokens": 16384, "vocab": 151936, "kernel_s": 0.05, "naive_s": 0.025, "kernel_with_entropy_s": 0.06,
           "achieved_gbps": 298.8, "naive_gbps": 597.6, "bandwidth_ratio": 0.0625, "time_ratio": 2.0,
           "extra_mib": 6000.0, "naive_extra_mib": 40000.0}  # fmt: skip
    line = check.logprob_kernel_line({"dtype": "bfloat16", "vocab": 151936, "peak_device": "H200", "peak_gbps": 4800,
                                      "sizes": [rec]})  # fmt: skip
    assert "H200 peak 4800 GB/s" in line and "298.8 GB/s = 0.0625 of peak" in line and "kernel/naive 2.000" in line
    assert "extra memory 6000 MiB vs naive 40000 MiB" in line
    failed = check.logprob_kernel_line({"dtype": "bfloat16", "vocab": 151936, "sizes": [], "error": "OutOfMemoryError: x"})
    assert "no size measured" in failed and failed.endswith("ERROR: OutOfMemoryError: x")


def test_bench_gpu_reads_the_kernel_bandwidth(tmp_path, monkeypatch):
    """bench_gpu's line and checks from a GPU check's report (the device and the check run faked)."""
    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks import bench_gpu
    from benchmarks.common import Context

    ctx = Context(quick=True, work=tmp_path)
    sizes = [{"tokens": n, "achieved_gbps": 300.0, "bandwidth_ratio": ratio, "time_ratio": 2.0}
             for n, ratio in ((4096, 0.7), (16384, 0.6))]  # fmt: skip
    report = {"runs": [{"summary": {"update_tokens_per_s": 1000.0, "update_mfu": 0.31, "teacher_tokens_per_s": 3000.0},
                        "logprob_kernel": {"peak_gbps": 4800, "sizes": sizes}}]}  # fmt: skip
    (ctx.dir("gpu") / "gpu_check.json").write_text(json.dumps(report))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(bench_gpu.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))
    r = bench_gpu.run(ctx)
    assert "N=16384 300.0 GB/s (0.6 of 4800 GB/s peak), kernel/naive time 2.0" in r.figures, r.figures
    (bw,) = [c for c in r.checks if c.label.startswith("log-prob kernel bandwidth")]
    assert bw.value == 0.6 and bw.op == ">=" and bw.limit == 0.5 and bw.ok
    report["runs"][0]["logprob_kernel"] = {"peak_gbps": None, "sizes": [dict(s, bandwidth_ratio=None) for s in sizes]}
    (ctx.dir("gpu") / "gpu_check.json").write_text(json.dumps(report))
    r = bench_gpu.run(ctx)  # an unknown device: figures, no bandwidth check
    assert "device peak unknown" in r.figures and not [c for c in r.checks if "bandwidth" in c.label]
