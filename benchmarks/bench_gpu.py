"""gpu: the prepared GPU check (benchmarks/gpu/check.py), only where a CUDA device is present:
tokens/s/GPU and MFU of the update step, teacher and student pass times, the log-prob kernel's
achieved memory bandwidth, the device's name. On a machine without a GPU it reports that it was
skipped.

The check runs the trainer's Megatron path on one GPU (see benchmarks/gpu/README.md). Headline:
the update's MFU (6 x params x tokens / time / the device's dense bf16 peak), target >= 0.3 (a
well-tuned Megatron dense step reaches 0.35-0.5 on H100-class GPUs at long sequences); the teacher
pass, a forward only, should take <= 0.5 x the update per token (forward + backward is ~3 forwards).
The log-prob kernel (vocab_parallel_logprobs, forward + backward over bf16 logits of Qwen's
151,936-entry vocabulary, N = 4,096 and 16,384 tokens): its achieved GB/s (the minimum bytes,
3 x N x V x 2, over its time) against the device's datasheet DRAM peak, target >= 0.5 at every N
(a bandwidth-bound op should reach half the peak), and its time against plain log_softmax + gather.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import REPO, Check, Context, Result


def run(ctx: Context) -> Result:
    import torch

    if not torch.cuda.is_available():
        return Result("gpu", "", skipped="no CUDA device on this machine (benchmarks/gpu/check.py runs where one is)")
    out = ctx.dir("gpu")
    args = [sys.executable, str(REPO / "benchmarks" / "gpu" / "check.py"), "--out", str(out)] + (["--quick"] if ctx.quick else [])
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    result = json.loads((out / "gpu_check.json").read_text())
    runs = result.get("runs") or [result]
    details = [f"  gpu: {line}" for line in (out / "gpu_check.txt").read_text().splitlines()[:40]] if (out / "gpu_check.txt").exists() else []
    summary, device = {}, torch.cuda.get_device_name(0)
    for r in runs:
        if isinstance(r, dict) and r.get("summary"):
            summary = r["summary"]
    upd_tps, upd_mfu = summary.get("update_tokens_per_s"), summary.get("update_mfu")
    tea_tps = summary.get("teacher_tokens_per_s")
    # the log-prob kernel: measured in the first run only; one record per N
    lk = next((r["logprob_kernel"] for r in runs if isinstance(r, dict) and r.get("logprob_kernel")), {})
    sizes = lk.get("sizes") or []
    peak = f" of {lk.get('peak_gbps')} GB/s peak" if lk.get("peak_gbps") else ", device peak unknown"
    kernel = "; log-prob kernel " + (", ".join(
        f"N={s['tokens']} {s['achieved_gbps']} GB/s ({s['bandwidth_ratio']}{peak}), kernel/naive time {s['time_ratio']}"
        for s in sizes) or f"not measured ({lk.get('error', 'no record')})")  # fmt: skip
    figures = (f"{device}: update {upd_tps} tokens/s/GPU, MFU {upd_mfu}; teacher {tea_tps} tokens/s{kernel}; "
               f"check exit code {proc.returncode}")
    checks = [Check("update MFU", upd_mfu, ">=", 0.3)]
    if upd_tps and tea_tps:
        checks.append(Check("teacher time/update time per token", upd_tps / tea_tps, "<=", 0.5))
    ratios = [s.get("bandwidth_ratio") for s in sizes]
    if ratios and all(r is not None for r in ratios):  # a device in check.py's peak table
        checks.append(Check("log-prob kernel bandwidth/peak (min over N)", min(ratios), ">=", 0.5))
    return Result("gpu", figures, checks, details)
