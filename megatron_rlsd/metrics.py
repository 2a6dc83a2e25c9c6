"""Step metrics: reduced over ranks, written as one console line, a JSONL row and TensorBoard.

Values computed on the last pipeline stage of every data-parallel rank (losses, entropy, clip
shares, ...) are combined over all of them, weighted by their token counts, so a logged metric
describes the whole global batch, never one rank's slice.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


class StageTimer:
    """Wall time per named stage of one step."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


class Accumulator:
    """Per-rank partial results: sums, maxima, and weighted means as (numerator, weight).

    Values may be tensors on the model's device: they are only read (one host transfer per step)
    when the step's metrics are reduced, so collecting them never waits for the device."""

    def __init__(self):
        self.sums: dict[str, object] = {}
        self.maxima: dict[str, object] = {}
        self.weighted: dict[str, list] = {}

    def add(self, name: str, value) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def add_max(self, name: str, value) -> None:
        self.maxima[name] = value if name not in self.maxima else _maximum(self.maxima[name], value)

    def add_mean(self, name: str, mean, weight) -> None:
        """`mean` of `weight` items (e.g. a token-mean over `weight` tokens)."""
        num, den = self.weighted.get(name, (0.0, 0.0))
        self.weighted[name] = [num + mean * weight, den + weight]

    def reduce(self) -> dict[str, float]:
        """Collective over the world: every rank's partials combined, the same dict everywhere."""
        local = (_floats(self.sums), _floats(self.maxima), {k: _floats(dict(enumerate(v))) for k, v in self.weighted.items()})
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        sums: dict[str, float] = {}
        maxima: dict[str, float] = {}
        weighted: dict[str, list[float]] = {}
        for s, mx, w in everyone:
            for k, v in s.items():
                sums[k] = sums.get(k, 0.0) + v
            for k, v in mx.items():
                maxima[k] = max(maxima.get(k, -math.inf), v)
            for k, nd in w.items():
                acc = weighted.setdefault(k, [0.0, 0.0])
                acc[0] += nd[0]
                acc[1] += nd[1]
        return sums | maxima | {k: num / den if den else 0.0 for k, (num, den) in weighted.items()}


def _maximum(a, b):
    return torch.maximum(torch.as_tensor(a), torch.as_tensor(b)) if torch.is_tensor(a) or torch.is_tensor(b) else max(a, b)


def _floats(values: dict) -> dict:
    """Python floats of possibly device-resident values, in one transfer."""
    keys = list(values)
    tensors = [values[k] for k in keys if torch.is_tensor(values[k])]
    moved = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).cpu().tolist()) if tensors else iter(())
    return {k: next(moved) if torch.is_tensor(values[k]) else float(values[k]) for k in keys}


def _metrics_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill


class MetricsLogger:
    """Rank 0 writes; other ranks' calls do nothing. A resumed run continues the files from its
    step: rows a killed run logged after its last checkpoint are dropped (they are redone), and
    TensorBoard purges them likewise."""

    def __init__(self, out_dir: str | Path, tensorboard: bool, start_step: int):
        self.file = self.tb = None
        if dist.get_rank() != 0:
            return
        path = Path(out_dir) / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _metrics_step(line) <= start_step]
            path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
            path.with_suffix(".tmp").replace(path)
        self.file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step + 1)

    def log(self, m: dict) -> None:
        if self.file is None:
            return
        print(console_line(m), flush=True)
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, m["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def console_line(m: dict) -> str:
    nan = float("nan")
    times = " ".join(f"{k[5:]}={v:.1f}s" for k, v in m.items() if k.startswith("time_"))
    return (
        f"step {m['step']:4d} | reward {m['reward']:.3f} acc {m['accuracy']:.3f} | entropy {m.get('entropy', nan):.3f} | "
        f"clip lo/hi {m.get('clip_low', 0):.3f}/{m.get('clip_high', 0):.3f} | lambda {m['lambda']:.3f} | "
        f"T-S gap {m.get('teacher_student_gap', nan):+.3f} | len {m['response_len']:.1f} | "
        f"loss {m.get('loss', nan):+.4f} gnorm {m.get('grad_norm', nan):.3f} | {times}"
    )
