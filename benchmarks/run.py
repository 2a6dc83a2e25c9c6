"""The benchmark suite: every benchmark measures side by side in one run and prints ratios.

    python benchmarks/run.py [--quick] [NAME ...] [--record] [--work DIR] [-v]

Each benchmark prints one line `NAME: <figures> | ratio <x> (target <y>) MET|NOT MET` (details it
has, e.g. per-stage breakdowns, above it). `--quick`: smaller sizes (meant to finish all of
them within 10 minutes on an idle 2-core CPU machine; measured so far only under load, at 20).
`--record`: append the table with date, machine and command to benchmarks/RESULTS.md. What
each measures and why its target is what it is: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, Context, Result, record, rmtree  # noqa: E402

BENCHMARKS = ("teacher_overhead", "logprob_kernel", "weight_sync", "conversion", "padding", "rollout", "gpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (meant for under 10 minutes on 2 idle cores)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--work", default=None, help="scratch directory (default: a fresh one under /tmp, removed after)")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress lines")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in BENCHMARKS if n in args.names] if args.names else list(BENCHMARKS)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rlsd_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(quick=args.quick, work=work, verbose=args.verbose)
    print(f"benchmarks ({'quick' if args.quick else 'full'}): {', '.join(names)}; scratch {work}", flush=True)
    t_start, results = time.perf_counter(), []
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                module = importlib.import_module(f"benchmarks.bench_{name}")
                result = module.run(ctx)
            except Exception as e:  # one failing benchmark does not hide the others
                traceback.print_exc()
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                result = Result(name, f"FAILED: {type(e).__name__}: {msg}")
            result.seconds = time.perf_counter() - t0
            for d in result.details:
                print(d)
            print(result.line() if result.checks or result.skipped else f"{name}: {result.figures} | ratio n/a (target n/a) NOT MET",
                  flush=True)  # fmt: skip
            results.append(result)
    finally:
        if not args.work:
            rmtree(work)
    wall = time.perf_counter() - t_start
    print(f"done: {len(results)} benchmark(s) in {wall / 60:.1f} min", flush=True)
    if args.record:
        command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        record(REPO / "benchmarks" / "RESULTS.md", results, command.strip(), wall, args.quick)
        print("recorded in benchmarks/RESULTS.md")
    return 0 if all(r.met or r.skipped for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
