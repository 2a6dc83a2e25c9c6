"""Shared fixtures and helpers: tiny Qwen3 checkpoints, tool and torchrun launchers, the Megatron-vs-HF parity run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_rlsd.parallel import free_port  # noqa: E402  (after the path: the checkout's package)


# The converters run inside the test process through their `main(argv)`: the same code, exit code
# and output as `python tools/<tool>.py`, without a fresh interpreter's ~8 s Megatron import per call.
# Like the tools themselves, this applies the CPU layer (megatron_rlsd/platform.py) to this process.
IN_PROCESS_TOOLS = ("convert_hf_to_megatron", "convert_megatron_to_hf")


def run_tool(tool: str, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python tools/<tool>.py args...` as a user would; returns the finished process."""
    if tool in IN_PROCESS_TOOLS:
        proc = _run_tool_in_process(tool, args)
    else:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools" / f"{tool}.py"), *args],
            capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _run_tool_in_process(tool: str, args: tuple[str, ...]) -> subprocess.CompletedProcess:
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"_tool_{tool}", REPO / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "tools"))  # the tool's `import _bootstrap`
    env = dict(os.environ)  # a one-process group sets RANK, MASTER_PORT, ...: not for later launches
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        spec.loader.exec_module(module)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = module.main(list(args))
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.path.remove(str(REPO / "tools"))
        os.environ.clear()
        os.environ.update(env)
    return subprocess.CompletedProcess([tool, *args], code, stdout.getvalue(), stderr.getvalue())


def torchrun(script: str, *args: str, nproc: int = 4, timeout: int = 600) -> subprocess.CompletedProcess:
    """Launch a worker under torchrun (gloo on CPU); raises with the log tail on failure."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", str(REPO / script), *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_worst_over_ranks(rec: dict, group, rank: int, world: int, out_path: str) -> None:
    """Collective: every rank's {check: difference} merged by maximum, written by rank 0 as JSON."""
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, rec, group=group)
    if rank == 0:
        merged = {}
        for r in gathered:
            for k, v in r.items():
                merged[k] = max(merged.get(k, 0.0), v)
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1, sort_keys=True)
    dist.barrier(group=group)


def megatron_parity(tmp_path: Path, models: dict, micro_batches: list[dict], layouts, reshard_layouts) -> dict:
    """Megatron vs HF through our converter, in one launch of tests/workers/qwen3_parity.py.

    `models`: name -> (HF folder, HF logits of `micro_batches` concatenated along the batch); the
    worker compares Megatron's logits at each (tp, pp) of `layouts`, then saves model "untied" at
    TP2PP2 into the checkpoint root tmp_path / "resharded" and reloads it at `reshard_layouts`.
    Returns the worker's report."""
    import torch

    torch.save({"micro_batches": micro_batches}, tmp_path / "inputs.pt")
    spec = {"inputs": str(tmp_path / "inputs.pt"), "layouts": layouts, "models": []}
    for name, (hf_dir, logits) in models.items():
        torch.save(logits, tmp_path / f"logits_{name}.pt")
        run_tool("convert_hf_to_megatron", "--hf-dir", str(hf_dir), "--out", str(tmp_path / f"ckpt_{name}"), "--quiet")
        spec["models"].append(
            {"name": name, "ckpt": str(tmp_path / f"ckpt_{name}"), "hf_logits": str(tmp_path / f"logits_{name}.pt")}
        )
    shutil.copytree(tmp_path / "ckpt_untied" / "hf", tmp_path / "resharded" / "hf")
    spec["reshard"] = {"ckpt": str(tmp_path / "ckpt_untied"), "save_to": str(tmp_path / "resharded"), "layouts": reshard_layouts}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun("tests/workers/qwen3_parity.py", str(tmp_path / "spec.json"), str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report, indent=1))
    return report


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """HF folders of two tiny GQA Qwen3 models (8 heads, 4 KV heads so TP4 divides them)."""
    from megatron_rlsd.models.tiny import build_tiny_qwen3

    root = tmp_path_factory.mktemp("tiny_qwen3")
    return {
        name: build_tiny_qwen3(root / name, tie_word_embeddings=tied, num_heads=8, num_kv_heads=4, seed=3)
        for name, tied in (("untied", False), ("tied", True))
    }
