"""Training curves of one or more runs, from their metrics.jsonl, as one PNG.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --out curves.png [--metrics reward,accuracy,...] [--smooth 0.6]

RUN_DIR is a run's output directory (its metrics.jsonl is read) or a metrics.jsonl file; name a
run in the legend with NAME=RUN_DIR (default: the directory's name). One subplot per metric,
steps on the x axis, one colour per run. Default metrics: reward, accuracy, entropy, clip_low,
clip_high, leakage, lambda, train_rollout_logp_diff, response_len, format_ok, truncated; any key
of metrics.jsonl works (e.g. eval/<benchmark>/accuracy). A metric that no run logged is left out
with a note; non-finite values (a NaN) are not drawn.

--smooth S (0 <= S < 1) draws an exponential moving average (weight S on the past, as
TensorBoard's slider) over the raw curve, which stays faint behind it.

Rows are keyed by step; a step logged twice (a resumed run) keeps its last row. Unreadable lines
are skipped and counted. Bad input (no metrics.jsonl, no readable row, no metric to draw) stops
with one `plot_metrics: error:` line and exit code 2.
"""

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_METRICS = ("reward", "accuracy", "entropy", "clip_low", "clip_high", "leakage", "lambda",
                   "train_rollout_logp_diff", "response_len", "format_ok", "truncated")  # fmt: skip


class UsageError(Exception):
    pass


def read_run(spec: str) -> tuple[str, dict[int, dict], int]:
    """(run name, {step: row}, unreadable lines) of NAME=PATH or PATH."""
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).exists():
        name, path = "", spec
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{path}: no metrics.jsonl (give a run's output directory or its metrics.jsonl)")
    rows, bad = {}, 0
    with open(file, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = row["step"]
                if isinstance(step, bool) or not isinstance(step, (int, float)):
                    raise TypeError(step)
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            rows[int(step)] = row
    if not rows:
        raise UsageError(f"{file}: no readable metrics rows")
    return name or (path.name if path.is_dir() else path.parent.name), rows, bad


def series(rows: dict[int, dict], metric: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of `metric`, in step order."""
    xs, ys = [], []
    for step in sorted(rows):
        v = rows[step].get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(step)
            ys.append(float(v))
    return xs, ys


def ema(values: list[float], weight: float) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot(runs: list[tuple[str, dict]], metrics: list[str], out: Path, smooth: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.1 * nrows + 0.6), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    handles = {}
    for ax, metric in zip(axes.flat, metrics):
        for i, (name, rows) in enumerate(runs):
            xs, ys = series(rows, metric)
            if not xs:
                continue
            color = colors[i % len(colors)]
            marker = "o" if len(xs) <= 30 else None
            if smooth > 0:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
                ys = ema(ys, smooth)
            (line,) = ax.plot(xs, ys, color=color, linewidth=1.8, marker=marker, markersize=3.5)
            handles.setdefault(name, line)
        ax.set_title(metric, fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 5), frameon=False,
               fontsize=10, bbox_to_anchor=(0.5, 1.0))  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="[NAME=]RUN_DIR")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metrics.jsonl keys")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) (0: raw curves only)")
    args = p.parse_args(argv)
    try:
        if not 0 <= args.smooth < 1:
            raise UsageError(f"--smooth {args.smooth}: must be in [0, 1)")
        runs = []
        for spec in args.runs:
            name, rows, bad = read_run(spec)
            if bad:
                print(f"plot_metrics: note: {spec}: skipped {bad} unreadable line(s)", file=sys.stderr)
            runs.append((name, rows))
        names = [n for n, _ in runs]
        if len(set(names)) != len(names):
            raise UsageError(f"two runs are both named {max(names, key=names.count)!r}; name them: NAME=RUN_DIR")
        wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
        metrics = [m for m in wanted if any(series(rows, m)[0] for _, rows in runs)]
        for m in wanted:
            if m not in metrics:
                print(f"plot_metrics: note: no run logged {m!r}; left out", file=sys.stderr)
        if not metrics:
            raise UsageError(f"none of the metrics {wanted} is in any run")
    except UsageError as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    plot(runs, metrics, Path(args.out), args.smooth)
    print(f"wrote {args.out} ({len(metrics)} metrics, {len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
