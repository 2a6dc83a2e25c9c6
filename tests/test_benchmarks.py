"""The benchmark suite's own plumbing (benchmarks/): the result line, recording, the dispatcher, and
the benchmarks that need no model (padding, gpu's skip). The measuring benchmarks themselves run
with `python benchmarks/run.py`, not here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from benchmarks.common import Check, Context, Result  # noqa: E402

LINE = re.compile(r"^[a-z_]+: .+ \| ratio (\d+\.\d\d|n/a) \(target (<=|>=) [\d.]+\) (MET|NOT MET)$")


def test_result_line_format_and_verdict():
    ok = Result("demo", "a 1 s vs b 2 s", [Check("a/b", 0.5, "<=", 1.0), Check("mem", 0.2, "<=", 0.25)])
    assert LINE.match(ok.line()) and ok.line().endswith("MET") and ok.met
    assert "mem 0.20 (target <= 0.25) ok" in ok.line()
    bad = Result("demo", "x", [Check("a/b", 0.5, "<=", 1.0), Check("tp", 1.8, "<=", 1.25)])
    assert bad.line().endswith("NOT MET") and not bad.met
    missing = Result("demo", "x", [Check("a/b", None, ">=", 0.9)])
    assert "ratio n/a" in missing.line() and not missing.met
    skipped = Result("gpu", "", skipped="no CUDA device")
    assert skipped.line() == "gpu: skipped: no CUDA device | ratio n/a (target n/a) SKIPPED"


def test_padding_benchmark_uses_the_trainer_grouping(tmp_path):
    from benchmarks import bench_padding

    r = bench_padding.run(Context(quick=True, work=tmp_path))
    assert r.name == "padding" and LINE.match(r.line()), r.line()
    assert all(0.0 < c.value <= 1.0 for c in r.checks)


def test_gpu_benchmark_skips_without_a_device(tmp_path):
    import torch

    from benchmarks import bench_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check itself runs with benchmarks/run.py gpu")
    r = bench_gpu.run(Context(quick=True, work=tmp_path))
    assert r.skipped and r.line().startswith("gpu: skipped")


def test_record_appends_a_table(tmp_path):
    path = tmp_path / "RESULTS.md"
    results = [Result("padding", "u 0.9", [Check("eff", 0.9, ">=", 0.85)]), Result("gpu", "", skipped="no GPU")]
    common.record(path, results, "python benchmarks/run.py padding gpu", 12.0, quick=True)
    common.record(path, results, "python benchmarks/run.py padding gpu", 12.0, quick=True)
    text = path.read_text()
    assert text.count("| benchmark | figures |") == 2 and "| padding | u 0.9 | 0.90 | >= 0.85 | MET |" in text
    assert "command: `python benchmarks/run.py padding gpu`" in text and "machine: " in text


def test_run_py_dispatches_by_name_and_refuses_unknown_names(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "padding", "gpu",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    lines = proc.stdout.splitlines()
    assert any(line.startswith("padding: ") and LINE.match(line) for line in lines), proc.stdout + proc.stderr
    assert any(line.startswith("gpu: skipped") for line in lines) or any(line.startswith("gpu: ") for line in lines)
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "nonsense"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)  # fmt: skip
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr


def test_random_checkpoint_round_trips_its_bytes(tmp_path):
    """The conversion benchmark's generator writes valid safetensors that its comparison reads."""
    from benchmarks import bench_conversion

    cfg = dict(bench_conversion.QWEN3_1P7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)  # fmt: skip
    total = bench_conversion.write_random_checkpoint(tmp_path / "a", cfg)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total and "lm_head.weight" not in index["weight_map"]
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert bench_conversion.bit_exact(tmp_path / "a", tmp_path / "b")[0]
    f = next((tmp_path / "b").glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    assert not bench_conversion.bit_exact(tmp_path / "a", tmp_path / "b")[0]
