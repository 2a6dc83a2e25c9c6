#!/usr/bin/env python3
"""GPU check of the trainer's Megatron path: one GPU, world size 1, NCCL, bf16, local layer spec.

    python3 benchmarks/gpu/check.py [--shape auto|4b|1.7b|0.6b] [--quick] [--out DIR]
    python3 benchmarks/gpu/check.py --device cpu --shape tiny        (the CPU smoke run; tests)

What runs is the project's own code on a Qwen3-shaped model with random weights (shapes from the
real Qwen3 config.json files; a locally trained tiny tokenizer, whose ids are all below the
vocabulary size): `build.build` (tokenizer, rows, Megatron model in DDP, Megatron optimizer), the
`Trainer` with the recipe examples/qwen3_8b_rlsd.yaml scaled to one GPU (RLSD, teacher snapshot
refreshed every 2 steps so the swap and the refresh both run), then for each step
`Trainer.train_step`: rollouts -> rewards (synthetic addition task) -> teacher pass (teacher
weights swapped in) -> update (fused student pass, one optimizer step) -> weight sync. Then a
checkpoint save and reload (`Checkpointer`; every model, optimizer and teacher tensor compared
bitwise) and the weight export again from the reloaded state. Before the model is built, the first
run times the vocab-parallel log-prob kernel (`algorithms/vocab_parallel.py`, forward + backward
over bf16 logits of Qwen's 151,936-entry vocabulary) against plain log_softmax + gather, and reports
its achieved memory bandwidth against the device's peak.

Only the rollout engine is replaced, here and nowhere else: vLLM is not on the device image.
`HFRolloutStandIn` is a transformers Qwen3ForCausalLM on the same GPU whose weights come from the
trainer's weight sync (`rollout/weight_sync.py: iter_hf_buckets`, the HF bucket export), so every
sync proves the export: each HF tensor must arrive exactly once with its shape, and the rollout
log-probs it reports (an HF forward at the rollout temperature) must agree with Megatron's (the
trainer logs the gap as train_rollout_logp_diff). Every second response ends with the row's
reference solution (teacher-forced tokens), so that rewards differ within each group: a random
model never answers, and all-equal rewards would zero every advantage and gradient.

The parent process (this file without --child) plans the runs and starts each in a child process
(a fresh CUDA context and NCCL communicator per model size): on CUDA the largest shape whose
training state fits the GPU with headroom; its checkpoint is saved where the disk (or /dev/shm)
has room for it, and when nowhere has, a second, smaller run proves the checkpoint round trip.
Results: OUT/gpu_check.json and OUT/gpu_check.txt (OUT: --out, else $OUT, else ./gpu_check_out),
one OUT/part-N-SHAPE.json per run (written as each phase ends, so a run killed at its time limit
still leaves what it measured). Exit code 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "qwen3_8b_rlsd.yaml"

# Dense bf16 peak of an H100/H200 SXM (datasheet, without sparsity): the MFU denominator.
PEAK_BF16_FLOPS = 989e12
# Peak DRAM (HBM) bandwidth in bytes/s by device, from NVIDIA's datasheets (H100 SXM5 3.35 TB/s,
# H100 PCIe 2.0 TB/s, H200 4.8 TB/s, A100 80GB SXM4 2,039 GB/s and PCIe 1,935 GB/s): the log-prob
# kernel's bandwidth denominator. Keys are searched (case-insensitive) in
# torch.cuda.get_device_name(), first match wins ("NVIDIA H100 80GB HBM3" is the SXM5 part; a GH200
# does not match H200); an unknown device gets no peak and its bandwidth ratio is None.
PEAK_DRAM_BYTES_PER_S = {
    r"\bH200\b": ("H200", 4.8e12),
    r"\bH100\b.*\bPCIe\b": ("H100 PCIe", 2.0e12),
    r"\bH100\b.*\b(SXM\w*|HBM3)\b": ("H100 SXM", 3.35e12),
    r"\bA100\b.*\b80GB\b.*\bPCIe\b": ("A100 80GB PCIe", 1.935e12),
    r"\bA100\b.*\bSXM4-80GB\b": ("A100 80GB SXM", 2.039e12),
}

# Qwen3 text models as in their config.json (Qwen/Qwen3-*); all tie the LM head to the embedding.
QWEN3_COMMON = dict(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    head_dim=128, num_key_value_heads=8, tie_word_embeddings=True)  # fmt: skip
SHAPES = {
    "4b": QWEN3_COMMON | dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "1.7b": QWEN3_COMMON | dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    "0.6b": QWEN3_COMMON | dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    # CPU smoke size; vocab_size None: the tiny tokenizer's length rounded up to a multiple of 128
    "tiny": dict(vocab_size=None, max_position_embeddings=2048, rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=16,
                 num_key_value_heads=2, tie_word_embeddings=True, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4),
}  # fmt: skip
GPU_SHAPES = ("4b", "1.7b", "0.6b")  # largest first

# GPU bytes per parameter while training at world size 1: bf16 weights 2, fp32 gradient buffer 4,
# fp32 main weights + Adam moments 12, teacher snapshot 2, rollout stand-in's weights 2, and
# torch Adam's foreach temporary (sqrt of the second moment) 4 during the step.
GPU_BYTES_PER_PARAM = 26
GPU_FIXED_BYTES = 16 << 30  # activations and logits of a micro-batch, KV cache, CUDA context
GPU_HEADROOM = 0.9  # plan at most this share of the GPU's memory
# Checkpoint bytes per parameter: bf16 model 2, fp32 main weights + Adam moments 12, teacher 2.
CKPT_BYTES_PER_PARAM = 16
DISK_HEADROOM = 0.9
# A checkpoint's save and its two reloads (read back mostly from the page cache) take about this
# many times the time of writing its bytes once; planned to last at most CKPT_SECONDS.
CKPT_TIME_FACTOR = 2.5
CKPT_SECONDS = 150.0


# Time budget of each phase of a run at the largest shape (seconds; "step": each step). The
# child's time limit is what stops a run; a phase over its budget is reported, to show where the
# time went. Largest expected costs: the first step compiles Megatron's fused kernels
# (torch.compile); a step's rollout is HF generate, one token at a time.
PHASE_BUDGET_S = {
    "import": 30, "distributed_init": 15, "logprob_kernel": 30, "write_model_and_data": 40, "build": 45,
    "rollout_stand_in_init": 20, "trainer_init": 10, "start_and_first_sync": 15, "step": 60, "checkpoint_save": 60, "load": 45,
    "export_after_reload": 10, "load_into_fresh_optimizer": 45,
}  # fmt: skip


@dataclass
class RunSize:
    """One run's work: `steps` optimizer steps over `prompts` x `group` samples."""

    prompts: int
    group: int
    max_new_tokens: int
    micro_batch_size: int
    steps: int


SIZES = {
    "full": RunSize(prompts=8, group=8, max_new_tokens=384, micro_batch_size=4, steps=3),
    "checkpoint_only": RunSize(prompts=4, group=4, max_new_tokens=64, micro_batch_size=4, steps=1),
    "quick": RunSize(prompts=4, group=4, max_new_tokens=64, micro_batch_size=4, steps=2),
    "tiny": RunSize(prompts=2, group=4, max_new_tokens=16, micro_batch_size=4, steps=2),
}


def n_params(shape: dict, vocab: int) -> int:
    """Parameters of a Qwen3 of `shape` (a tied LM head counted once)."""
    h, d = shape["hidden_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    layer = h * q + 2 * h * kv + q * h + 3 * h * shape["intermediate_size"] + 2 * h + 2 * d
    return vocab * h * (1 if shape["tie_word_embeddings"] else 2) + shape["num_hidden_layers"] * layer + h


class Clock:
    def __init__(self, label: str):
        self.label, self.t0 = label, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s {self.label}] {msg}", flush=True)


def gb(n: float | None) -> float | None:
    return None if n is None else round(n / 1e9, 3)


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


# ================================================================================== planning
def gpu_total_bytes() -> int | None:
    """The first GPU's memory from nvidia-smi (the parent never touches CUDA itself)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
        return int(out.split()[0]) << 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding `path`."""
    best = ("/", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and (str(path) + "/").startswith(parts[1].rstrip("/") + "/") and len(parts[1]) >= len(best[0]):
            best = (parts[1], parts[2])
    return best


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) << 10
    return 0


def room_for(path: Path, nbytes: int) -> tuple[bool, str]:
    """Whether `nbytes` fit under `path` with headroom. A tmpfs holds its files in memory, and a
    save first stages the whole checkpoint in host memory too: there both must fit."""
    where = _existing(path)
    free = shutil.disk_usage(where).free
    mount, fstype = _mount_of(where.resolve())
    ok = nbytes <= DISK_HEADROOM * free
    why = f"{path}: {gb(free)} GB free on {mount} ({fstype or 'unknown fs'})"
    if fstype == "tmpfs":
        ram = mem_total_bytes()
        ok = ok and 2 * nbytes + (24 << 30) <= ram
        why += f", {gb(ram)} GB host memory for the file and the save's staging copy"
    return ok, why


def write_rate(path: Path, nbytes: int = 512 << 20) -> float:
    """Bytes per second of a written and fsync'd file under `path` (a checkpoint save's writers
    fsync too)."""
    path.mkdir(parents=True, exist_ok=True)
    probe, block = path / ".write-rate-probe", os.urandom(16 << 20)
    t0 = time.perf_counter()
    try:
        with open(probe, "wb") as f:
            for _ in range(nbytes // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        return nbytes / (time.perf_counter() - t0)
    finally:
        probe.unlink(missing_ok=True)


def plan_runs(args, gpu_bytes: int | None) -> tuple[list[dict], list[str]]:
    """The runs to make (shape, size, checkpoint or not, work directory) and why.

    A checkpoint goes where it fits (disk before /dev/shm) and where its save and two reloads are
    expected within CKPT_SECONDS at the measured write rate. On CUDA with --shape auto, when the
    largest shape's checkpoint goes nowhere, a second run makes the round trip at the largest
    smaller shape whose checkpoint does."""
    notes = []
    candidates = [Path(args.work_dir)] if args.work_dir else [Path("/tmp/gpu_check_work"), Path("/dev/shm/gpu_check_work")]
    rates: dict[Path, float] = {}

    def place(nbytes: int, seconds: float | None) -> Path | None:
        for c in candidates:
            ok, why = room_for(c, nbytes)
            if ok and seconds is not None:
                rates.setdefault(c, write_rate(c))
                expected = CKPT_TIME_FACTOR * nbytes / rates[c]
                ok = expected <= seconds
                why += f", writes {gb(rates[c])} GB/s: save + reloads about {expected:.0f} s (limit {seconds:.0f} s)"
            notes.append(f"{'fits' if ok else 'does not fit'}: {gb(nbytes)} GB at {why}")
            if ok:
                return c
        return None

    def run(shape: str, size: str, checkpoint: bool, work: Path) -> dict:
        return {"shape": shape, "size": size, "checkpoint": checkpoint, "device": args.device, "work_dir": str(work)}

    def params(shape: str) -> int:
        return n_params(SHAPES[shape], SHAPES[shape]["vocab_size"])

    if args.device == "cpu":
        return [run("tiny", "tiny", True, candidates[0])], notes
    if args.shape != "auto":
        shapes = [args.shape]
    elif args.quick:
        shapes = ["0.6b"]
    else:
        if gpu_bytes is None:
            notes.append("nvidia-smi gave no GPU memory size: planning for an H200 (143771 MiB)")
            gpu_bytes = 143771 << 20
        shapes = []
        for s in GPU_SHAPES:
            need = params(s) * GPU_BYTES_PER_PARAM + GPU_FIXED_BYTES
            if need <= GPU_HEADROOM * gpu_bytes:
                shapes.append(s)
            else:
                notes.append(f"{s}: needs about {gb(need)} GB of GPU memory, over {GPU_HEADROOM:.0%} of {gb(gpu_bytes)} GB")
        if not shapes:
            raise SystemExit(f"check.py: not even the smallest shape fits {gb(gpu_bytes)} GB of GPU memory")
    size = "quick" if args.quick else "full"
    main = shapes[0]
    ckpt_dir = place(params(main) * CKPT_BYTES_PER_PARAM, CKPT_SECONDS)
    if ckpt_dir is not None:
        return [run(main, size, True, ckpt_dir)], notes
    hf_dir = place(params(main) * 2, None)  # the random HF weights (bf16) that the model is built from
    if hf_dir is None:
        raise SystemExit(f"check.py: no room for the {main} model's {gb(params(main) * 2)} GB of HF weights: {'; '.join(notes)}")
    runs = [run(main, size, False, hf_dir)]
    for s in shapes[1:] if args.shape == "auto" and not args.quick else []:
        work = place(params(s) * CKPT_BYTES_PER_PARAM, CKPT_SECONDS)
        if work is not None:
            notes.append(f"the {main} checkpoint does not fit: the checkpoint round trip runs at {s}")
            runs.append(run(s, "checkpoint_only", True, work))
            break
    else:
        notes.append(f"checkpoint not run: no place for the {main} checkpoint (--work-dir DIR names another place)")
    return runs, notes


# ================================================================================== the parent
def parent(args) -> int:
    clock = Clock("check")
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    gpu_bytes = gpu_total_bytes() if args.device == "cuda" else None
    runs, notes = plan_runs(args, gpu_bytes)
    for note in notes:
        clock.log(f"plan: {note}")
    clock.log("plan: " + "; ".join(f"run {i + 1}: {r['shape']} ({r['size']}, checkpoint {'yes' if r['checkpoint'] else 'no'})"
                                   for i, r in enumerate(runs)))  # fmt: skip
    result = {"budget_s": args.budget_s, "plan": {"runs": runs, "notes": notes, "gpu_total_gb": gb(gpu_bytes)}, "runs": []}
    for i, spec in enumerate(runs):
        left = args.budget_s - clock.elapsed()
        # the first of two runs leaves the second about 40% of what is left
        timeout = max(60.0, (0.6 if i + 1 < len(runs) else 1.0) * left - 5)
        part = out / f"part-{i + 1}-{spec['shape']}.json"
        part.unlink(missing_ok=True)
        # the log-prob kernel is measured once, in the first run (on a GPU still empty)
        spec = spec | {"label": f"run {i + 1} {spec['shape']}", "timeout_s": round(timeout), "logprob_kernel": i == 0}
        clock.log(f"{spec['label']}: starting (time limit {timeout:.0f} s)")
        rc = _run_child(spec, part, timeout)
        data = json.loads(part.read_text()) if part.is_file() else {"spec": spec}
        data["exit_code"] = rc
        data.setdefault("checks", {})["finished"] = rc == 0
        result["runs"].append(data)
        clock.log(f"{spec['label']}: exit code {rc}")
    result["total_s"] = round(clock.elapsed(), 1)
    result["checks"] = {f"run{i + 1}.{k}": v for i, r in enumerate(result["runs"]) for k, v in r.get("checks", {}).items()}
    result["checks"]["within_budget"] = result["total_s"] <= args.budget_s
    result["checks"]["checkpoint_round_trip_ran"] = any(r.get("checkpoint", {}).get("ran") for r in result["runs"])
    result["targets"] = {f"run{i + 1}.{k}": v for i, r in enumerate(result["runs"]) for k, v in r.get("targets", {}).items()}
    result["ok"] = all(result["checks"].values())
    write_json(out / "gpu_check.json", result)
    text = render_text(result)
    (out / "gpu_check.txt").write_text(text)
    print(text, flush=True)
    return 0 if result["ok"] else 1


def _run_child(spec: dict, part: Path, timeout: float) -> int:
    """Run one model size in its own process (and process group, so a timeout also ends the
    checkpoint writers and reward workers it started)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--part", str(part)],
                            env=env, start_new_session=True)  # fmt: skip
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{spec['label']}: stopped at its time limit ({timeout:.0f} s)", flush=True)
        rc = 124
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left
        pass
    proc.wait()
    return rc


# ================================================================================== the report
def render_text(result: dict) -> str:
    lines = []
    checks = result["checks"]
    failed = [k for k, v in checks.items() if not v]
    lines.append(f"megatron_rlsd GPU check: {'PASS' if result['ok'] else 'FAIL'} "
                 f"({len(checks) - len(failed)}/{len(checks)} checks), {result['total_s']} s of a "
                 f"{result['budget_s']} s budget")  # fmt: skip
    for r in result["runs"]:
        spec, env = r.get("spec", {}), r.get("environment", {})
        lines.append("")
        params = f"{r['params']:,} params" if "params" in r else "not built"
        lines.append(f"== {spec.get('label', '?')}: Qwen3 {spec.get('shape')} shape ({params}), {spec.get('size')} size, "
                     f"exit code {r.get('exit_code')}")  # fmt: skip
        if env:
            lines.append(f"   {env.get('device_name')} | {env.get('backend')} | {env.get('dtype')} | torch {env.get('torch')} "
                         f"(CUDA {env.get('cuda')}, NCCL {env.get('nccl')}) | megatron-core {env.get('megatron_core')} | "
                         f"transformers {env.get('transformers')}")  # fmt: skip
        if "run_size" in r:
            s = r["run_size"]
            lines.append(f"   {s['steps']} step(s) x {s['prompts']} prompts x {s['group']} samples, <= {s['max_new_tokens']} "
                         f"new tokens, micro-batch {s['micro_batch_size']} rows")  # fmt: skip
        lines.append("   phase times (s): " + ", ".join(f"{k} {v}" for k, v in r.get("phases", {}).items()))
        if r.get("phases_over_budget"):
            lines.append("   phases over their budget (s): " + ", ".join(f"{k} {v}" for k, v in r["phases_over_budget"].items()))
        if r.get("memory"):
            lines.append("   memory (GiB): " + ", ".join(f"{k} {v}" for k, v in r["memory"].items()))
        if r.get("logprob_kernel"):
            lines.append("   " + logprob_kernel_line(r["logprob_kernel"]))
        if r.get("stages"):
            lines.append(f"   {'step':>4} {'stage':<8} {'time s':>8} {'peak alloc GiB':>14} {'peak resv GiB':>13} {'tokens':>8} "
                         f"{'tokens/s':>10} {'MFU':>7}")  # fmt: skip
            for st in r["stages"]:
                mfu = f"{st['mfu']:.2%}" if st.get("mfu") is not None else ""
                tps = f"{st['tokens_per_s']:.0f}" if st.get("tokens_per_s") is not None else ""
                lines.append(f"   {st['step']:>4} {st['stage']:<8} {st['time_s']:>8.3f} "
                             f"{_num(st.get('peak_allocated_gib')):>14} {_num(st.get('peak_reserved_gib')):>13} "
                             f"{st.get('tokens') or '':>8} {tps:>10} {mfu:>7}")  # fmt: skip
        if r.get("summary"):
            lines.append("   " + ", ".join(f"{k} {v}" for k, v in r["summary"].items()))
        for m in r.get("metrics", []):
            lines.append(f"   step {m.get('step')}: reward {m.get('reward'):.3f}, loss {m.get('loss'):+.5f}, grad norm "
                         f"{m.get('grad_norm'):.4f}, train/rollout |dlogp| mean {m.get('train_rollout_logp_diff'):.2e} "
                         f"max {m.get('train_rollout_logp_maxdiff'):.2e}")  # fmt: skip
        if r.get("export"):
            lines.append("   weight export (last sync): " + ", ".join(f"{k} {v}" for k, v in r["export"].items()))
        if r.get("checkpoint"):
            lines.append("   checkpoint: " + ", ".join(f"{k} {v}" for k, v in r["checkpoint"].items()))
        if r.get("error"):
            lines.append(f"   ERROR: {r['error']}")
    lines.append("")
    lines.append("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    if result.get("targets"):
        lines.append("targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in result["targets"].items()))
    for note in result["plan"]["notes"]:
        lines.append(f"plan: {note}")
    lines.append("")
    lines.append(
        "MFU = 6 x params x tokens / update time / 989e12 (update: forward + backward, 2 + 4 FLOPs per parameter and "
        "token; teacher: 2 x params x tokens, forward only). Tokens are the real prompt + response tokens (no padding); "
        "attention's sequence-squared FLOPs and the optimizer step's are not counted, while the stage time includes the "
        "optimizer step, the gradient norm and the loss's log-softmax; 989e12 is the dense bf16 peak of an H100/H200 SXM "
        "(datasheet, no sparsity). Layers are Megatron-Core's local spec (unfused attention), not Transformer Engine."
    )
    lines.append("")
    lines.append(
        "Log-prob kernel: forward + backward of vocab_parallel_logprobs (TP group of one, temperature 1) over [N, V] "
        "bf16 logits vs plain log_softmax(logits.float()).gather; GB/s = the minimum bytes (3 x N x V x 2: the logits "
        "read by the forward and again by the backward, their bf16 gradient written once; plus 40 bytes a row) / the "
        "median time; peak: the device's datasheet DRAM bandwidth; extra memory: peak allocated during forward + "
        "backward above what was allocated before (the gradient included)."
    )
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "" if x is None else f"{x:.3f}"


# ================================================================================== the child
def child(spec: dict, part: Path) -> int:
    clock = Clock(spec["label"])
    report = {"spec": spec, "phases": {}, "checks": {}, "stages": [], "metrics": []}
    if spec["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: the CPU layer refuses to run where CUDA is visible
    try:
        run_one(spec, report, clock, lambda: write_json(part, report))
    except (Exception, SystemExit) as e:  # recorded for the report, then re-raised with its traceback
        report["error"] = f"{type(e).__name__}: {e}"
        write_json(part, report)
        raise
    write_json(part, report)
    return 0  # finished; the parent judges the checks


def _tree_digest(package_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(package_dir.rglob("*.py")):
        h.update(str(f.relative_to(package_dir)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def check_package_is_the_tree() -> str:
    """The megatron_rlsd that imports must be this working tree's (a wheel in .whl/ built from
    older code would silently check that code instead)."""
    import megatron_rlsd

    installed, tree = Path(megatron_rlsd.__file__).resolve().parent, REPO / "megatron_rlsd"
    if tree.is_dir() and installed != tree and _tree_digest(installed) != _tree_digest(tree):
        raise SystemExit(f"check.py: {installed} differs from {tree}: the megatron_rlsd wheel is stale; "
                         f"rerun bash benchmarks/gpu/fetch_wheels.sh")  # fmt: skip
    return str(installed)


def phase_timer(report: dict, clock: Clock, flush, sync):
    """`with phase(name):` times a phase of a run (device work finished first) and writes the
    report as it ends."""

    @contextmanager
    def phase(name: str):
        budget = PHASE_BUDGET_S["step" if name.startswith("step_") else name]
        clock.log(f"{name} ... (budget {budget} s)")
        t0 = time.perf_counter()
        yield
        sync()
        took = report["phases"][name] = round(time.perf_counter() - t0, 3)
        if took > budget:
            report.setdefault("phases_over_budget", {})[name] = budget
        clock.log(f"{name}: {took} s" + (f", OVER its {budget} s budget" if took > budget else ""))
        flush()

    return phase


def run_one(spec: dict, report: dict, clock: Clock, flush) -> None:
    import torch

    cuda = spec["device"] == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("check.py: --device cuda but torch sees no GPU; use --device cpu --shape tiny on a CPU machine")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phase = phase_timer(report, clock, flush, sync)
    size = SIZES[spec["size"]]
    report["run_size"] = asdict(size)
    work = Path(spec["work_dir"]) / spec["shape"]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _run_in(work, spec, size, report, clock, phase, flush, torch, cuda, sync)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        clock.log("done")


def _run_in(work: Path, spec, size: RunSize, report, clock, phase, flush, torch, cuda: bool, sync) -> None:
    with phase("import"):
        package = check_package_is_the_tree()
        import megatron.core
        import transformers

        from megatron_rlsd.build import build
        from megatron_rlsd.config import check_model_fits, load_config
        from megatron_rlsd.parallel import ParallelConfig, destroy_distributed, init_distributed
        from megatron_rlsd.trainer import Trainer

    with phase("distributed_init"):
        platform = init_distributed(ParallelConfig())
        import torch.distributed as dist

        # a collective on the device first: NCCL's communicator is made here, not inside a stage
        dist.all_reduce(torch.ones(1, device=platform.device(torch.cuda.current_device() if cuda else 0)))
    report["environment"] = {
        "device_name": torch.cuda.get_device_name() if cuda else "cpu", "backend": dist.get_backend(),
        "gpu_total_gib": gib(torch.cuda.mem_get_info()[1]) if cuda else None,
        "dtype": "bfloat16" if cuda else "float32", "torch": torch.__version__, "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "megatron_core": megatron.core.package_info.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "megatron_rlsd": package,
    }  # fmt: skip
    if platform.device_type != spec["device"]:
        raise SystemExit(f"check.py: asked for {spec['device']} but the platform is {platform.device_type}")
    if spec.get("logprob_kernel"):  # first, while nothing else holds GPU memory
        logprob_kernel_phase(report, phase, flush, torch, cuda, platform)

    dtype = torch.bfloat16 if cuda else torch.float32
    with phase("write_model_and_data"):
        hf_dir, rows_file, vocab = write_inputs(work, spec["shape"], size, dtype, platform.device(), torch)
    cfg = load_config(RECIPE, [
        f"model.hf_dir={hf_dir}", f"model.params_dtype={'bfloat16' if cuda else 'float32'}", "model.transformer_impl=local",
        "parallel.tensor_model_parallel_size=1", f"data.train_file={rows_file}",
        f"rollout.group_size={size.group}", f"rollout.max_new_tokens={size.max_new_tokens}",
        "algorithm.teacher_refresh_interval=2",  # a snapshot teacher (swapped in), refreshed after step 2
        f"trainer.steps={size.steps}", f"trainer.prompts_per_step={size.prompts}",
        f"trainer.micro_batch_size={size.micro_batch_size}", f"trainer.output_dir={work / 'out'}",
        "trainer.save_interval=0", "trainer.keep_checkpoints=1", "trainer.tensorboard=false",
    ])  # fmt: skip
    check_model_fits(cfg, 1)
    report["config"] = {"recipe": str(RECIPE.relative_to(REPO)), "loss_mode": cfg.algorithm.loss_mode,
                        "temperature": cfg.rollout.temperature, "lr": cfg.optim.lr,
                        "teacher_refresh_interval": cfg.algorithm.teacher_refresh_interval}  # fmt: skip
    memory = report.setdefault("memory", {})

    def mem(name: str) -> None:
        if cuda:
            memory[f"{name}_allocated"] = gib(torch.cuda.memory_allocated())

    with phase("build"):
        components = build(cfg, platform, with_engine=False)
    mem("after_build")
    n = sum(p.numel() for p in components.model.module.parameters())  # a tied LM head is the embedding
    report["params"] = n
    report["checks"]["param_count_as_planned"] = n == n_params(SHAPES[spec["shape"]], vocab)
    gc.collect()  # the build's memory maps of the weight files
    for f in hf_dir.glob("*.safetensors*"):  # loaded into the model: give the disk back for the checkpoint
        f.unlink()

    with phase("rollout_stand_in_init"):
        engine = HFRolloutStandIn(hf_dir, components, dtype, platform.device(), torch)
        components.engine = engine
    with phase("trainer_init"):
        trainer = Trainer(cfg, components)
    mem("after_trainer_init")
    probe = StageProbe(cuda, torch, n)
    probe.instrument(trainer)
    report["stages"] = probe.records  # filled in as the stages run
    try:
        with phase("start_and_first_sync"):
            trainer.start()  # fresh output directory, then the engine receives the policy's weights
        before = fingerprints(policy_tensors(trainer), torch)
        for _ in range(size.steps):
            with phase(f"step_{trainer.step + 1}"):
                probe.step = trainer.step + 1
                m = trainer.train_step()
                trainer.metrics.log(m)
            report["metrics"].append({k: v for k, v in m.items() if isinstance(v, (int, float, bool))})
            mem(f"after_step_{trainer.step}")
        after = fingerprints(policy_tensors(trainer), torch)
        report["placement"] = placements(trainer, engine)
        last_sync = next(r for r in reversed(probe.records) if r["stage"] == "sync")
        report["export"] = engine.exports[-1] | {"syncs": len(engine.exports),
                                                 "gb_per_s": _sig(engine.exports[-1]["bytes"] / 1e9 / last_sync["time_s"])}  # fmt: skip
        record_step_checks(report, probe, before, after, cuda)
        report["summary"] = probe.summary()
        flush()
        report["checkpoint"] = {"ran": False}
        if spec["checkpoint"]:
            checkpoint_round_trip(trainer, engine, report, phase, torch, cuda)
        else:
            report["checkpoint"]["why_not"] = "no room for this size's checkpoint (see the plan's notes)"
    finally:
        t0 = time.perf_counter()
        trainer.close()
        engine.close()
        destroy_distributed()
        report["phases"]["teardown"] = round(time.perf_counter() - t0, 3)


def write_inputs(work: Path, shape_name: str, size: RunSize, dtype, device, torch):
    """The HF folder the trainer builds from (tiny tokenizer, config.json from Qwen3Config, random
    weights) and the synthetic rows. Returns (hf_dir, rows_file, vocab_size)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_rlsd.checkpoint.safetensors_io import PlannedSafetensorsWriter
    from megatron_rlsd.data.synthetic import make_synthetic_rows, write_jsonl
    from megatron_rlsd.models.tiny import IM_END, PAD_TOKEN, VOCAB_MULTIPLE, build_tiny_tokenizer

    hf_dir = work / "hf"
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(hf_dir)
    shape = dict(SHAPES[shape_name])
    rope_theta = shape.pop("rope_theta")
    vocab = shape.pop("vocab_size") or -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    pad, eos = tokenizer.convert_tokens_to_ids(PAD_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen3Config(
        architectures=["Qwen3ForCausalLM"], vocab_size=vocab, **shape, hidden_act="silu", attention_bias=False,
        attention_dropout=0.0, initializer_range=0.02, use_sliding_window=False, use_cache=True,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip
    config.save_pretrained(hf_dir)
    with torch.device("meta"):
        names = {name: tuple(p.shape) for name, p in Qwen3ForCausalLM(config).named_parameters()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    groups = [[(name, dtype, shp)] for name, shp in names.items()]
    gen = torch.Generator(device=device).manual_seed(1234)
    with PlannedSafetensorsWriter(hf_dir, groups, max_shard_bytes=2 << 30) as writer:
        for name, shp in names.items():
            if len(shp) == 1:  # RMSNorm weights
                t = torch.ones(shp, dtype=dtype, device=device)
            else:
                t = torch.randn(shp, generator=gen, device=device).mul_(config.initializer_range).to(dtype)
            writer.tensor(name).copy_(t.cpu())
    rows = make_synthetic_rows(size.prompts * size.steps, seed=7, task="add")
    rows_file = write_jsonl(rows, work / "add.jsonl")
    return hf_dir, rows_file, vocab


# ================================================================================== rollouts
class HFRolloutStandIn:
    """The rollout engine's interface (rollout/vllm_engine.py: generate, sleep, update_weights,
    close) over a transformers Qwen3ForCausalLM on the training device; used by this check only.

    Weights arrive only through `update_weights` (the trainer's HF bucket export); `sleep` frees
    them as vLLM's level-2 sleep does. `generate` samples with HF at the given temperature and
    top-p (one generator for the batch: vLLM's per-sample seeds are not reproduced), then every
    second request's response is cut and ends with its row's reference solution, so rewards vary
    within each group. The log-probs returned are an HF forward's over the final tokens, at the
    sampling temperature: what vLLM reports at top_p = 1."""

    def __init__(self, hf_dir: Path, components, dtype, device, torch):
        from transformers import AutoConfig, Qwen3ForCausalLM

        self.torch, self.device = torch, device
        tok = components.tokenizer
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        # the oracle: a prompt's reference solution, keyed by its token ids as the trainer encodes them
        self.solutions = {
            tuple(components.encoder.encode(components.templates.student_messages(row), [])[0]):
            tok(row.solution, add_special_tokens=False)["input_ids"] for row in components.rows
        }  # fmt: skip
        with torch.device(device):
            self.model = Qwen3ForCausalLM._from_config(AutoConfig.from_pretrained(hf_dir), dtype=dtype).eval()
        self.params = dict(self.model.named_parameters(remove_duplicate=False))  # a tied LM head under both names
        self.exports: list[dict] = []
        self.sleep()

    def _unique_params(self):
        return list(dict.fromkeys(self.params.values()))

    def sleep(self) -> None:
        for p in self._unique_params():
            p.data = self.torch.empty(0, dtype=p.dtype, device=self.device)

    def update_weights(self, buckets) -> None:
        got, nbytes, n_buckets = set(), 0, 0
        with self.torch.no_grad():
            for bucket in buckets:
                n_buckets += 1
                for name, tensor in bucket:
                    p = self.params.get(name)
                    if p is None:
                        raise ValueError(f"weight export: {name} is not a parameter of Qwen3ForCausalLM")
                    if name in got:
                        raise ValueError(f"weight export: {name} arrived twice")
                    if p.numel() == 0:  # asleep: the weight gets its memory back
                        p.data = self.torch.empty(tensor.shape, dtype=p.dtype, device=self.device)
                    if p.shape != tensor.shape:
                        raise ValueError(f"weight export: {name} has shape {tuple(tensor.shape)}, HF expects {tuple(p.shape)}")
                    p.copy_(tensor)
                    got.add(name)
                    nbytes += tensor.numel() * tensor.element_size()
        missing = sorted(set(self.params) - got)
        if missing:
            raise ValueError(f"weight export: {len(missing)} HF weights never arrived, e.g. {missing[0]}")
        self.exports.append({"tensors": len(got), "bytes": nbytes, "buckets": n_buckets})

    def fingerprint(self) -> dict:
        return fingerprints({n: p for n, p in self.params.items()}, self.torch)

    def generate(self, prompts, seeds, *, temperature, top_p, max_new_tokens, stop_token_ids, images=None):
        from megatron_rlsd.rollout.vllm_engine import Generation

        torch = self.torch
        if any(p.numel() == 0 for p in self._unique_params()):
            raise RuntimeError("HFRolloutStandIn.generate: asleep; update_weights() first")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        torch.manual_seed(seeds[0])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=True, temperature=temperature,
                top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids, pad_token_id=self.pad,
            )[:, width:].tolist()  # fmt: skip
        responses, reasons = [], []
        for i, (prompt, new) in enumerate(zip(prompts, out)):
            stop = next((j for j, t in enumerate(new) if t in stop_token_ids), None)
            new = new[: stop + 1] if stop is not None else new
            if i % 2:
                sol = self.solutions[tuple(prompt)] + [self.eos]
                new = [t for t in new if t != self.eos][: max(0, max_new_tokens - len(sol))] + sol
            responses.append(new)
            reasons.append("stop" if new and new[-1] in stop_token_ids else "length")
        logps = self._logprobs(prompts, responses, temperature)
        return [Generation(r, lp, why) for r, lp, why in zip(responses, logps, reasons)]

    def _logprobs(self, prompts, responses, temperature, rows: int = 8) -> list[list[float]]:
        torch = self.torch
        result = []
        for start in range(0, len(prompts), rows):
            chunk = list(zip(prompts[start:start + rows], responses[start:start + rows]))
            width = max(len(p) + len(r) for p, r in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, r) in enumerate(chunk):  # right-padded: causal attention never sees the padding
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for i, (p, r) in enumerate(chunk):
                    rl = logits[i, len(p) - 1: len(p) - 1 + len(r)].float() / temperature
                    target = torch.tensor(r, device=rl.device).unsqueeze(1)
                    result.append(torch.log_softmax(rl, dim=-1).gather(1, target).squeeze(1).tolist())
        return result

    def close(self) -> None:
        self.sleep()


# ================================================================================== measuring
class StageProbe:
    """Wraps the trainer's stage methods (on the instance): each call is timed with the device
    finished before and after, and on CUDA the peak memory since the stage began is read."""

    STAGES = {  # trainer method -> stage name (the two reward methods make one stage)
        "generate_rollouts": "rollout", "score_rewards": "reward", "compute_advantages": "reward",
        "score_teacher": "teacher", "policy_update": "update", "sync_weights": "sync",
    }  # fmt: skip

    def __init__(self, cuda: bool, torch, n_params: int):
        self.cuda, self.torch, self.n = cuda, torch, n_params
        self.step = 0  # 0: the sync before the first step
        self.records: list[dict] = []

    def instrument(self, trainer) -> None:
        for method, stage in self.STAGES.items():
            setattr(trainer, method, self._wrap(stage, getattr(trainer, method)))

    def _wrap(self, stage: str, fn):
        torch = self.torch

        def measured(*args, **kwargs):
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rec = self._record(stage)
            rec["time_s"] = round(rec["time_s"] + dt, 4)
            if self.cuda:
                for key, value in (("peak_allocated_gib", torch.cuda.max_memory_allocated()),
                                   ("peak_reserved_gib", torch.cuda.max_memory_reserved())):  # fmt: skip
                    rec[key] = max(rec[key] or 0.0, gib(value))
            tokens = _tokens(stage, args, result)
            if tokens is not None:
                rec["tokens"] = tokens
                rec["tokens_per_s"] = _sig(tokens / rec["time_s"])
                flops_per_token = {"update": 6, "teacher": 2}.get(stage)
                if flops_per_token:
                    rec["mfu"] = _sig(flops_per_token * self.n * tokens / rec["time_s"] / PEAK_BF16_FLOPS)
            return result

        return measured

    def _record(self, stage: str) -> dict:
        for rec in self.records:
            if rec["step"] == self.step and rec["stage"] == stage:
                return rec
        rec = {"step": self.step, "stage": stage, "time_s": 0.0, "peak_allocated_gib": None, "peak_reserved_gib": None,
               "tokens": None, "tokens_per_s": None, "mfu": None}  # fmt: skip
        self.records.append(rec)
        return rec

    def summary(self) -> dict:
        """The last step's update and teacher rates (the first step also pays one-time costs)."""
        last = max(r["step"] for r in self.records)
        out = {}
        for rec in self.records:
            if rec["step"] == last and rec["stage"] in ("update", "teacher"):
                out[f"{rec['stage']}_tokens_per_s"] = rec["tokens_per_s"]
                out[f"{rec['stage']}_mfu"] = rec["mfu"]
        peaks = [r["peak_allocated_gib"] for r in self.records if r["peak_allocated_gib"] is not None]
        out["peak_allocated_gib"] = max(peaks) if peaks else None
        peaks = [r["peak_reserved_gib"] for r in self.records if r["peak_reserved_gib"] is not None]
        out["peak_reserved_gib"] = max(peaks) if peaks else None
        return out


def _tokens(stage: str, args, result) -> int | None:
    """Real tokens a stage processed: prompts + responses through the model (update: the student
    prompt; teacher: the teacher prompt), or the responses generated (rollout)."""
    if stage == "update":
        return sum(len(s.student_prompt) + len(s.response) for s in args[0])
    if stage == "teacher":
        return sum(len(s.teacher_prompt) + len(s.response) for s in args[0])
    if stage == "rollout":
        return sum(len(s.response) for s in result[0])
    return None


_INT_VIEW = {2: "int16", 4: "int32", 8: "int64"}


def fingerprint(t, torch, chunk: int = 1 << 24) -> list[int]:
    """Two integer sums of a tensor's bits (plain, and weighted by position): equal tensors give
    equal fingerprints, and integer sums (wrapping at 64 bits) do not depend on summation order."""
    flat = t.detach().reshape(-1)
    bits = flat.view(getattr(torch, _INT_VIEW[flat.element_size()]))
    plain = weighted = 0
    for start in range(0, bits.numel(), chunk):
        c = bits[start:start + chunk].to(torch.int64)
        w = torch.arange(start + 1, start + 1 + c.numel(), device=c.device, dtype=torch.int64)
        plain += int(c.sum())
        weighted += int((c * w).sum())
    return [plain, weighted]


def fingerprints(tensors: dict, torch) -> dict:
    return {name: fingerprint(t, torch) for name, t in tensors.items()}


def policy_tensors(trainer) -> dict:
    return {f"model/{n}": p for n, p in trainer.module.named_parameters()}


def training_state_tensors(trainer) -> dict:
    """Everything a checkpoint must restore: the policy, the optimizer's main weights and moments
    (every part of a chained optimizer), the teacher snapshot."""
    import torch

    out = policy_tensors(trainer)
    optimizer = trainer.c.optimizer
    for i, part in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        opt = part.optimizer  # the torch optimizer inside Megatron's wrapper
        for g, group in enumerate(opt.param_groups):
            for j, p in enumerate(group["params"]):
                out[f"optimizer{i}/group{g}/{j}/main"] = p
                for k, v in opt.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        out[f"optimizer{i}/group{g}/{j}/{k}"] = v
    for i, t in enumerate(trainer.teacher.weights or []):
        out[f"teacher/{i}"] = t
    return out


def placements(trainer, engine) -> dict:
    def devices(tensors) -> list[str]:
        return sorted({str(t.device) for t in tensors})

    return {"model": devices(trainer.module.parameters()),
            "optimizer": devices(v for k, v in training_state_tensors(trainer).items() if k.startswith("optimizer") and v.dim()),
            "teacher": devices(trainer.teacher.weights or []),
            "rollout_stand_in": devices(engine.model.parameters())}  # fmt: skip


def record_step_checks(report: dict, probe: StageProbe, before: dict, after: dict, cuda: bool) -> None:
    import math

    metrics, checks = report["metrics"], report["checks"]
    checks["losses_and_grad_norms_finite"] = all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    checks["every_update_applied"] = all(m["update_ok"] for m in metrics)
    # some rewards 1, some 0 (the stand-in's every second response ends with the solution): the
    # advantages, hence the gradients, are not all zero
    checks["rewards_mixed"] = all(0 < m["reward"] < 1 for m in metrics)
    checks["policy_changed"] = before != after
    # Megatron's mean |log-prob| gap to the stand-in, whose weights came through the export: a
    # wrong layout or a missing tensor gives gaps of order 1. fp32 on the CPU: measured 1.5e-7
    # (max 9.5e-7) at the tiny size. bf16 keeps 8 bits of mantissa, so activations drift by ~1e-2
    # relative through the layers and a gap of ~1e-2 is expected on a GPU; 0.1 leaves 10x.
    bound = 0.1 if cuda else 1e-5
    checks["rollout_logprobs_match_megatron"] = all(m["train_rollout_logp_diff"] < bound for m in metrics)
    report["rollout_logp_bound"] = bound
    device = "cuda" if cuda else "cpu"
    checks["training_state_on_device"] = all(all(d.startswith(device) for d in ds) for ds in report["placement"].values())
    stages = {r["stage"] for r in probe.records if r["step"] >= 1}
    checks["every_stage_ran"] = stages == {"rollout", "reward", "teacher", "update", "sync"}


def checkpoint_round_trip(trainer, engine, report: dict, phase, torch, cuda: bool) -> None:
    """Save; overwrite every saved tensor with zeros, reload and compare bitwise; export the
    reloaded weights and compare them with the export before the save. Last, reload into an
    optimizer without state, as a resumed job's fresh process has (Adam's state is created by
    the first step), and compare again."""
    from megatron_rlsd.optimizer import reset_moments

    ck, checks = report["checkpoint"], report["checks"]
    state_before = trainer.state_dict()
    saved = fingerprints(training_state_tensors(trainer), torch)
    exported = engine.fingerprint()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with phase("checkpoint_save"):
        step_dir = trainer.checkpointer.save(trainer.step, state_before)  # what Trainer.save_checkpoint does
    ck["ran"] = True
    ck["tensors_by_kind"] = {kind: sum(k.startswith(kind) for k in saved) for kind in ("model/", "optimizer", "teacher/")}
    ck["bytes"] = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
    ck["gb"] = gb(ck["bytes"])
    ck["save_s"] = report["phases"]["checkpoint_save"]
    ck["save_gb_per_s"] = round(ck["bytes"] / 1e9 / ck["save_s"], 3)

    def reload(name: str, fresh_optimizer: bool) -> tuple[bool, bool]:
        """(every tensor restored, trainer state restored)"""
        with torch.no_grad():
            for t in training_state_tensors(trainer).values():
                t.zero_()
        if fresh_optimizer:
            reset_moments(trainer.c.optimizer)
        try:
            with phase(name):
                state = trainer.checkpointer.load()
                trainer.load_state_dict(state)
        except Exception as e:  # recorded: the check fails and the run goes on
            where = traceback.extract_tb(e.__traceback__)[-1]
            ck[f"{name}_error"] = f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno}, in {where.name})"
            return False, False
        loaded = fingerprints(training_state_tensors(trainer), torch)
        differ = sorted(k for k in saved.keys() | loaded.keys() if loaded.get(k) != saved.get(k))
        ck[f"{name}_tensors_compared"] = len(saved)
        ck[f"{name}_tensors_differing"] = differ[:5]
        ck[f"{name}_s"] = report["phases"][name]
        ck[f"{name}_gb_per_s"] = round(ck["bytes"] / 1e9 / ck[f"{name}_s"], 3)
        return not differ, state == state_before | {"layout": state.get("layout")}

    restored, trainer_state = reload("load", fresh_optimizer=False)
    if cuda:
        ck["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
    checks["checkpoint_restores_every_tensor"] = restored
    checks["checkpoint_restores_trainer_state"] = trainer_state
    with phase("export_after_reload"):
        trainer.sync_weights()
    checks["export_after_reload_equals_export_before_save"] = restored and engine.fingerprint() == exported
    restored, trainer_state = reload("load_into_fresh_optimizer", fresh_optimizer=True)
    checks["checkpoint_restores_into_fresh_optimizer"] = restored and trainer_state
    shutil.rmtree(trainer.checkpointer.root, ignore_errors=True)


# ================================================================================== the log-prob kernel
# What is timed: forward + backward of the project's kernel (vocab_parallel_logprobs, which is
# _LogprobEntropyFn chunked by CHUNK_BYTES, over Megatron's tensor-parallel group: a group of one
# here), of the same with the entropy (vocab_parallel_logprobs_and_entropy, as the trainer's update
# calls it), and of plain log_softmax(logits.float()).gather, over [N, V] bf16 logits. On the CPU a
# tiny N and V (the smoke run: seconds).
LOGPROB_RUNS = {
    "cuda": {"tokens": (4096, 16384), "vocab": QWEN3_COMMON["vocab_size"], "warmup": 2, "reps": 5},
    "cpu": {"tokens": (64, 256), "vocab": 2048, "warmup": 1, "reps": 3},
}
# Bytes a log-prob forward + backward must move at the least, per token row: the logits read once
# by the forward and once more by the backward, and their gradient (the logits' dtype) written once,
# 3 x V x 2 bytes in bf16; plus the row's own terms: its target id (int64) read by the forward and
# by the backward (16), its log-prob written (4) and upstream gradient read (4), and the two fp32
# statistics the forward saves for the backward (max and log-normaliser) written and read back (16):
# LOGPROB_ROW_BYTES = 40, under 0.01% of the total at V = 151,936. Every other byte (fp32
# temporaries, a chunk re-read by several passes) is traffic over this minimum. The naive version
# is charged the same bytes (it computes the same outputs), so both GB/s figures compare.
LOGPROB_ROW_BYTES = 40
LOGPROB_MIN_BANDWIDTH_RATIO = 0.5  # achieved GB/s at least half the device's peak
LOGPROB_MAX_TIME_RATIO = 1.0  # no slower than the naive version
# Agreement with the naive version (both do fp32 math on the same bf16 logits): log-probs differ by
# fp32 rounding only (~1e-5 at |log p| ~ 12); gradient entries (<= 1 in size) are rounded to bf16
# by both, so they differ by at most one bf16 ulp (2^-8 just below 1).
LOGPROB_LOGP_BOUND = 1e-3
LOGPROB_GRAD_BOUND = 1e-2


def logprob_min_bytes(tokens: int, vocab: int, elem_bytes: int = 2) -> int:
    """The bytes a log-prob forward + backward over [tokens, vocab] logits must move at the least
    (see LOGPROB_ROW_BYTES)."""
    return tokens * (3 * vocab * elem_bytes + LOGPROB_ROW_BYTES)


def peak_dram(device_name: str) -> tuple[str | None, float | None]:
    """(table label, peak bytes/s) of a device by its name; (None, None) if not in the table."""
    for pattern, (label, peak) in PEAK_DRAM_BYTES_PER_S.items():
        if re.search(pattern, device_name, re.IGNORECASE):
            return label, peak
    return None, None


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def measure_logprob_kernel(lk: dict, torch, cuda: bool, device, tp_group, flush) -> None:
    """Fills `lk` (the report's "logprob_kernel") size by size: per N a record in lk["sizes"], and
    the largest N's record also at the top level (the headline). Times are medians of `reps` timed
    calls (cuda Events around forward + backward), after `warmup` calls; memory: peak allocated
    during one call above what was allocated before it (logits and targets), the returned
    gradient included."""
    from megatron_rlsd.algorithms.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_logprobs_and_entropy

    run = LOGPROB_RUNS["cuda" if cuda else "cpu"]
    vocab, peak = run["vocab"], lk["peak_bytes_per_s"]

    def kernel(x, t):
        return (vocab_parallel_logprobs(x, t, tp_group=tp_group),)

    def kernel_with_entropy(x, t):
        return vocab_parallel_logprobs_and_entropy(x, t, tp_group=tp_group)

    def naive(x, t):
        return (torch.log_softmax(x.float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1),)

    def fwd_bwd(fn, x, t):
        outs = fn(x, t)
        (grad,) = torch.autograd.grad(outs, x, grad_outputs=[torch.ones_like(o) for o in outs])
        return outs[0].detach(), grad

    def with_memory(fn, x, t):
        """(log-probs, gradient, extra bytes or None on the CPU)"""
        if not cuda:
            return (*fwd_bwd(fn, x, t), None)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logp, grad = fwd_bwd(fn, x, t)
        torch.cuda.synchronize()
        return logp, grad, torch.cuda.max_memory_allocated() - base

    def timed(fn, x, t) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fwd_bwd(fn, x, t)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fwd_bwd(fn, x, t)
        return time.perf_counter() - t0

    def max_abs_diff(a, b, rows: int = 1024) -> float:  # row blocks: no full-size fp32 copies
        return max(float((a[i:i + rows].float() - b[i:i + rows].float()).abs().max()) for i in range(0, a.shape[0], rows))

    fns = {"kernel": kernel, "kernel_with_entropy": kernel_with_entropy, "naive": naive}
    for n in run["tokens"]:
        gen = torch.Generator(device=device).manual_seed(1234 + n)
        x = torch.randn(n, vocab, generator=gen, device=device, dtype=torch.bfloat16).mul_(3).requires_grad_()
        t = torch.randint(0, vocab, (n,), generator=gen, device=device)
        extra = {}
        # the first call of each is also its warm-up; the kernel's results are compared with the naive's
        logp_k, grad_k, extra["kernel"] = with_memory(kernel, x, t)
        logp_n, grad_n, extra["naive"] = with_memory(naive, x, t)
        logp_diff, grad_diff = float((logp_k - logp_n).abs().max()), max_abs_diff(grad_k, grad_n)
        del logp_k, grad_k, logp_n, grad_n
        extra["kernel_with_entropy"] = with_memory(kernel_with_entropy, x, t)[2]
        for _ in range(run["warmup"] - 1):
            for fn in fns.values():
                fwd_bwd(fn, x, t)
        times = {name: [] for name in fns}
        for _ in range(run["reps"]):  # interleaved: the three see the same clocks and temperature
            for name, fn in fns.items():
                times[name].append(timed(fn, x, t))
        del x, t
        sec = {name: statistics.median(ts) for name, ts in times.items()}
        nbytes = logprob_min_bytes(n, vocab)
        rec = {
            "tokens": n, "vocab": vocab, "bytes": nbytes,
            "kernel_s": _sig(sec["kernel"]), "naive_s": _sig(sec["naive"]),
            "kernel_with_entropy_s": _sig(sec["kernel_with_entropy"]),
            "achieved_gbps": _sig(nbytes / sec["kernel"] / 1e9), "naive_gbps": _sig(nbytes / sec["naive"] / 1e9),
            "peak_gbps": lk["peak_gbps"],
            "bandwidth_ratio": _sig(nbytes / sec["kernel"] / peak) if peak else None,
            "time_ratio": _sig(sec["kernel"] / sec["naive"]),
            "kernel_with_entropy_time_ratio": _sig(sec["kernel_with_entropy"] / sec["naive"]),
            "extra_mib": _mib(extra["kernel"]), "naive_extra_mib": _mib(extra["naive"]),
            "kernel_with_entropy_extra_mib": _mib(extra["kernel_with_entropy"]),
            "grad_mib": _mib(n * vocab * 2),
            "max_logp_diff": _sig(logp_diff), "max_grad_diff": _sig(grad_diff),
            "kernel_times_s": [_sig(s) for s in times["kernel"]], "naive_times_s": [_sig(s) for s in times["naive"]],
        }  # fmt: skip
        lk["sizes"].append(rec)
        lk.update({k: v for k, v in rec.items() if not k.endswith("times_s")})  # the headline: the largest N so far
        flush()
        if cuda:
            torch.cuda.empty_cache()


def logprob_kernel_phase(report: dict, phase, flush, torch, cuda: bool, platform) -> None:
    """The log-prob kernel's phase: measured, then checked. An error (out of memory, say) is
    recorded, its checks fail, and the run goes on to its other phases."""
    import math

    from megatron.core import parallel_state

    from megatron_rlsd.algorithms.vocab_parallel import CHUNK_BYTES

    run = LOGPROB_RUNS["cuda" if cuda else "cpu"]
    name = report["environment"]["device_name"]
    label, peak = peak_dram(name) if cuda else (None, None)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    lk = report["logprob_kernel"] = {
        "device_name": name, "peak_device": label, "peak_bytes_per_s": peak,
        "peak_gbps": round(peak / 1e9) if peak else None, "vocab": run["vocab"], "dtype": "bfloat16", "temperature": 1.0,
        "tp_world_size": torch.distributed.get_world_size(tp_group),
        "chunk_rows": max(1, CHUNK_BYTES // (4 * run["vocab"])), "warmup": run["warmup"], "reps": run["reps"],
        "bytes_counted": f"3 x N x V x 2 + {LOGPROB_ROW_BYTES} x N", "sizes": [],
    }  # fmt: skip
    device = platform.device(torch.cuda.current_device() if cuda else 0)
    try:
        with phase("logprob_kernel"):
            measure_logprob_kernel(lk, torch, cuda, device, tp_group, flush)
    except Exception as e:  # recorded: the checks below fail and the run goes on
        where = traceback.extract_tb(e.__traceback__)[-1]
        lk["error"] = f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno}, in {where.name})"
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    sizes, checks = lk["sizes"], report["checks"]
    ok = "error" not in lk and len(sizes) == len(run["tokens"])
    figures = ["kernel_s", "naive_s", "kernel_with_entropy_s", "achieved_gbps", "naive_gbps", "time_ratio"]
    figures += ["extra_mib", "naive_extra_mib"] if cuda else []
    checks["logprob_kernel_figures_finite_positive"] = ok and all(
        isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0 for r in sizes for k in figures)  # fmt: skip
    checks["logprob_kernel_matches_naive"] = ok and all(
        r["max_logp_diff"] <= LOGPROB_LOGP_BOUND and r["max_grad_diff"] <= LOGPROB_GRAD_BOUND for r in sizes)  # fmt: skip
    if cuda:  # the CPU smoke run's times say nothing about a GPU: figures only
        # performance targets, reported beside the checks: they say how fast, not whether the
        # trainer's path works, so they do not decide the exit code (benchmarks/run.py gpu does)
        targets = report.setdefault("targets", {})
        if peak is not None:
            targets["logprob_kernel_bandwidth_at_least_half_peak"] = ok and all(
                r["bandwidth_ratio"] >= LOGPROB_MIN_BANDWIDTH_RATIO for r in sizes)  # fmt: skip
        targets["logprob_kernel_not_slower_than_naive"] = ok and all(r["time_ratio"] <= LOGPROB_MAX_TIME_RATIO for r in sizes)
    flush()


def logprob_kernel_line(lk: dict) -> str:
    """One line of gpu_check.txt."""

    def ms(s: float) -> str:
        return f"{s * 1e3:.3g} ms"

    peak = f"{lk['peak_device']} peak {lk['peak_gbps']} GB/s" if lk.get("peak_gbps") else "device peak unknown"
    parts = []
    for r in lk.get("sizes", []):
        ratio = f" = {r['bandwidth_ratio']:.3g} of peak" if r.get("bandwidth_ratio") is not None else ""
        mem = (f", extra memory {r['extra_mib']:.0f} MiB vs naive {r['naive_extra_mib']:.0f} MiB"
               if r.get("extra_mib") is not None else "")  # fmt: skip
        parts.append(f"N {r['tokens']}: kernel {ms(r['kernel_s'])}, {r['achieved_gbps']:.4g} GB/s{ratio}; naive "
                     f"{ms(r['naive_s'])} ({r['naive_gbps']:.4g} GB/s), kernel/naive {r['time_ratio']:.3f}; "
                     f"kernel with entropy (the update's call) {ms(r['kernel_with_entropy_s'])}{mem}")  # fmt: skip
    line = (f"log-prob kernel (fwd+bwd, {lk.get('dtype')}, vocab {lk.get('vocab', '?')}, {peak}): "
            + ("; ".join(parts) or "no size measured"))  # fmt: skip
    if lk.get("error"):
        line += f"; ERROR: {lk['error']}"
    return line


# ================================================================================== entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shape", choices=("auto", *GPU_SHAPES, "tiny"), default="auto",
                   help="auto: the largest Qwen3 shape that fits the GPU (cuda), tiny (cpu)")
    p.add_argument("--quick", action="store_true", help="a smoke run: the 0.6b shape, 2 short steps")
    p.add_argument("--out", default="", help="where results go (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--work-dir", default="", help="model files and the checkpoint (default: /tmp, else /dev/shm, by room)")
    p.add_argument("--budget-s", type=float, default=480.0, help="time for all runs together")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        rc = child(json.loads(args.child), Path(args.part))
        sys.stdout.flush()
        sys.stderr.flush()
        # skip the interpreter's teardown of torch, Megatron and transformers (20 s and more on a
        # busy CPU); the parent ends whatever is left in this process group
        os._exit(rc)
    if args.device == "cpu" and args.shape not in ("auto", "tiny"):
        p.error("--device cpu runs the tiny shape only (--shape tiny)")
    if args.device == "cuda" and args.shape == "tiny":
        p.error("--shape tiny is the CPU smoke size (--device cpu)")
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
