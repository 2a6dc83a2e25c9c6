#!/usr/bin/env python3
"""The CPU study: every loss mode, several seeds, from one shared warm start; one plot, one table.

    python examples/study/run_study.py [--work outputs/study] [--modes rlsd,grpo,...] [--seeds 1,2,3]
                                       [--steps 50] [--jobs 2] [--plot docs/images/study.png]

1. Warm start, once: the embedded default's tiny Qwen3 and addition task (made when missing),
   100 supervised steps on the rows' solutions, then one GRPO step at lr 0 (it leaves the weights
   as they were) so the trainer writes a checkpoint; exported to WORK/warm_hf.
2. Runs: `torchrun --nproc-per-node 1 -m megatron_rlsd.train --config examples/study/study.yaml`
   from WORK/warm_hf, one per (mode, seed), `--jobs` at a time, each in WORK/runs/MODE-sSEED. A run
   that finished (COMPLETED) is not rerun, so an interrupted study picks up where it stopped.
3. Summary: per mode, mean and spread (min..max) over seeds of reward, policy entropy, leakage
   and clip share per step: WORK/summary.json, a table on the console, and the plot (--plot).

`--summary-only` redraws the plot and the table from existing runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODES = ("rlsd", "grpo", "opsd", "grpo_opsd", "sdpo", "rlrt", "antisd", "egrsd")
CURVES = ("reward", "entropy", "leakage", "clip")  # clip: clip_low + clip_high where a mode clips


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: str, overrides: list[str], log: Path) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}",
           "-m", "megatron_rlsd.train", "--config", config, *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def warm_start(work: Path) -> Path:
    hf = work / "warm_hf"
    if (hf / "config.json").is_file():
        return hf
    out = work / "warm"
    overrides = [f"model.hf_dir={work / 'tiny_qwen3'}", f"data.train_file={work / 'add.jsonl'}", f"trainer.output_dir={out}",
                 "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                 "trainer.steps=1", "optim.lr=0", "algorithm.loss_mode=grpo", "trainer.tensorboard=false"]  # fmt: skip
    print(f"study: warm start (100 supervised steps) in {out}", flush=True)
    if torchrun("examples/tiny_cpu.yaml", overrides, out / "console.log"):
        sys.exit(f"study: the warm start failed; see {out / 'console.log'}")
    subprocess.check_call([sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt", str(out / "checkpoints"),
                           "--out", str(hf), "--quiet"], cwd=REPO)  # fmt: skip
    return hf


def run_one(work: Path, hf: Path, mode: str, seed: int, steps: int) -> tuple[str, int, float]:
    out = work / "runs" / f"{mode}-s{seed}"
    if (out / "COMPLETED").exists():
        return f"{mode}-s{seed}", 0, 0.0
    overrides = [f"model.hf_dir={hf}", f"data.train_file={work / 'add.jsonl'}", f"trainer.output_dir={out}",
                 f"algorithm.loss_mode={mode}", f"trainer.seed={seed}", f"trainer.steps={steps}", "trainer.resume=never"]  # fmt: skip
    t0 = time.time()
    rc = torchrun("examples/study/study.yaml", overrides, work / "logs" / f"{mode}-s{seed}.log")
    return f"{mode}-s{seed}", rc, time.time() - t0


def read_metrics(run: Path) -> list[dict]:
    rows = {}
    with open(run / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def curve(rows: list[dict], name: str) -> list[float]:
    if name == "clip":
        return [r.get("clip_low", 0.0) + r.get("clip_high", 0.0) for r in rows]
    return [float(r.get(name, 0.0)) for r in rows]


def summarize(work: Path, modes, seeds) -> dict:
    summary = {}
    for mode in modes:
        runs = [work / "runs" / f"{mode}-s{s}" for s in seeds]
        runs = [r for r in runs if (r / "COMPLETED").exists()]
        if not runs:
            continue
        per_seed = [read_metrics(r) for r in runs]
        n = min(len(rows) for rows in per_seed)
        entry = {"seeds": len(runs), "steps": n}
        for name in CURVES:
            values = [curve(rows[:n], name) for rows in per_seed]
            entry[name] = {
                "mean": [sum(v[i] for v in values) / len(values) for i in range(n)],
                "min": [min(v[i] for v in values) for i in range(n)],
                "max": [max(v[i] for v in values) for i in range(n)],
                "first5": [sum(v[:5]) / len(v[:5]) for v in values],
                "last10": [sum(v[-10:]) / len(v[-10:]) for v in values],
            }
        summary[mode] = entry
    return summary


def table(summary: dict) -> str:
    def ms(xs):
        mean = sum(xs) / len(xs)
        sd = (sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5
        return f"{mean:.3f} ± {sd:.3f}"

    lines = ["| mode | seeds | reward, first 5 steps | reward, last 10 | entropy, first 5 | entropy, last 10 | leakage, last 10 | clip share, last 10 |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, e in summary.items():
        lines.append(f"| {mode} | {e['seeds']} | {ms(e['reward']['first5'])} | {ms(e['reward']['last10'])} | "
                     f"{ms(e['entropy']['first5'])} | {ms(e['entropy']['last10'])} | {ms(e['leakage']['last10'])} | "
                     f"{ms(e['clip']['last10'])} |")  # fmt: skip
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for ax, name in zip(axes, CURVES):
        for mode, e in summary.items():
            steps = list(range(1, e["steps"] + 1))
            (line,) = ax.plot(steps, e[name]["mean"], label=mode, lw=1.6)
            ax.fill_between(steps, e[name]["min"], e[name]["max"], color=line.get_color(), alpha=0.15)
        ax.set_title({"clip": "clip share (clip_low + clip_high)"}.get(name, name))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("mean over seeds; band: min..max over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "study")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each is one process)")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "study.png")
    p.add_argument("--summary-only", action="store_true")
    a = p.parse_args()
    modes, seeds = a.modes.split(","), [int(s) for s in a.seeds.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    work = a.work.resolve()
    if not a.summary_only:
        hf = warm_start(work)
        jobs = [(m, s) for s in seeds for m in modes]
        print(f"study: {len(jobs)} runs of {a.steps} steps, {a.jobs} at a time, in {work / 'runs'}", flush=True)
        failed = []
        with ThreadPoolExecutor(a.jobs) as pool:
            for name, rc, secs in pool.map(lambda j: run_one(work, hf, j[0], j[1], a.steps), jobs):
                print(f"study: {name}: {'done' if rc == 0 else f'FAILED (exit {rc})'}"
                      f"{f' in {secs:.0f} s' if secs else ' (already done)'}", flush=True)  # fmt: skip
                if rc:
                    failed.append(name)
        if failed:
            print(f"study: {len(failed)} run(s) failed; their logs are in {work / 'logs'}", file=sys.stderr)
    summary = summarize(work, modes, seeds)
    if not summary:
        sys.exit("study: no finished run to summarise")
    (work / "summary.json").write_text(json.dumps(summary))
    plot(summary, a.plot)
    print(table(summary))
    print(f"study: summary in {work / 'summary.json'}, plot in {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
