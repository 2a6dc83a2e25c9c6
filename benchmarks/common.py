"""Shared pieces of the benchmark suite: the result line, recording, launching, memory probes.

Every benchmark module (`benchmarks/bench_<name>.py`) has `run(ctx: Context) -> Result`. A result
carries one or more checks; the first is the headline ratio printed as `| ratio x (target y)`, the
others are printed with the figures, and the verdict is MET only when every check holds:

    NAME: <figures> | ratio <x> (target <y>) MET|NOT MET
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GiB = float(1 << 30)
MiB = float(1 << 20)


@dataclass
class Check:
    """`value op limit`, e.g. Check("rlsd-grpo / teacher", 1.02, "<=", 1.1)."""

    label: str
    value: float | None
    op: str  # "<=" or ">="
    limit: float
    why_missing: str = ""  # when value is None: why it could not be measured

    @property
    def ok(self) -> bool:
        if self.value is None:
            return False
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def value_text(self) -> str:
        return "n/a" if self.value is None else f"{self.value:.2f}"

    def text(self) -> str:
        return f"{self.label} {self.value_text()} (target {self.op} {self.limit:g}) {'ok' if self.ok else 'NOT MET'}"


@dataclass
class Result:
    name: str
    figures: str
    checks: list[Check] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # printed above the line (tables, breakdowns)
    skipped: str = ""  # non-empty: why the benchmark did not run (e.g. no GPU)
    seconds: float = 0.0

    @property
    def met(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def verdict(self) -> str:
        return "SKIPPED" if self.skipped else ("MET" if self.met else "NOT MET")

    def line(self) -> str:
        if self.skipped:
            return f"{self.name}: skipped: {self.skipped} | ratio n/a (target n/a) SKIPPED"
        head, rest = self.checks[0], self.checks[1:]
        figures = "; ".join([self.figures] + [c.text() for c in rest]) if rest else self.figures
        return f"{self.name}: {figures} | ratio {head.value_text()} (target {head.op} {head.limit:g}) {self.verdict}"


@dataclass
class Context:
    quick: bool
    work: Path  # scratch space of this invocation (benchmarks clean up their large files)
    verbose: bool = False
    cache: dict = field(default_factory=dict)  # results shared between benchmarks of one invocation

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def dir(self, name: str) -> Path:
        d = self.work / name
        d.mkdir(parents=True, exist_ok=True)
        return d


# ----------------------------------------------------------------------------- launching
def bench_env() -> dict:
    """The environment of launched processes: one thread per process (the machine's cores are
    shared by the ranks), the checkout on the path, no warnings noise."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip


def torchrun(script: str | Path, *args: str, nproc: int, timeout: int = 1800, env: dict | None = None) -> str:
    """Launch `script` under torchrun with `nproc` gloo ranks; returns stdout (raises with the
    log tail on failure)."""
    from megatron_rlsd.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(script), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env or bench_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def python(*args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=bench_env())  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# ----------------------------------------------------------------------------- memory
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """Reset this process's VmHWM (peak resident set) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class AnonSampler:
    """Peak RssAnon (anonymous resident memory: heap, torch tensors; not the page cache of mapped
    files) of a process tree, sampled every `interval` s from another thread."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _tree(self) -> list[int]:
        try:
            import psutil

            p = psutil.Process(self.pid)
            return [self.pid] + [c.pid for c in p.children(recursive=True)]
        except Exception:
            return [self.pid]

    def _loop(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._tree():
                try:
                    total += proc_status(pid).get("RssAnon", 0)
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], timeout: int = 3600) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run `cmd`; returns (wall seconds, peak RssAnon bytes of its process tree, the process)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=bench_env())
    with AnonSampler(p.pid) as s:
        out, err = p.communicate(timeout=timeout)
    wall = time.perf_counter() - t0
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({p.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    return wall, s.peak, proc


# ----------------------------------------------------------------------------- recording
def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = proc_meminfo_total()
    import torch

    try:
        import vllm

        vllm_v = vllm.__version__
    except Exception:
        vllm_v = "n/a"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{socket.gethostname()}: {cpu}, {os.cpu_count()} cores, {mem / GiB:.0f} GiB, {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, vLLM {vllm_v}")  # fmt: skip


def proc_meminfo_total() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def record(path: Path, results: list[Result], command: str, wall: float, quick: bool) -> None:
    """Append this run's table (date, machine, command) to RESULTS.md."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "",
        f"## {now} ({'quick' if quick else 'full'} run)",
        "",
        f"- machine: {machine_line()}",
        f"- command: `{command}`",
        f"- wall time: {wall / 60:.1f} min",
        "",
        "| benchmark | figures | ratio | target | verdict | time |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped: {r.skipped} | n/a | n/a | SKIPPED | {r.seconds:.0f} s |")
            continue
        head, rest = r.checks[0], r.checks[1:]
        figures = "; ".join([r.figures] + [c.text() for c in rest]).replace("|", "/")
        lines.append(f"| {r.name} | {figures} | {head.value_text()} | {head.op} {head.limit:g} | {r.verdict} | {r.seconds:.0f} s |")
    lines += ["", "Printed lines and details:", "", "```"]
    for r in results:
        lines += [*r.details, r.line()]
    lines += ["```", ""]
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by `python benchmarks/run.py --record`; see benchmarks/README.md.\n")
    with open(path, "a") as f:
        f.write("\n".join(lines))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
