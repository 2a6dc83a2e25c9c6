"""Shared fixtures: tiny Qwen3 checkpoints and a torchrun launcher for distributed workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_rlsd.parallel import free_port  # noqa: E402  (after the path: the checkout's package)


def run_tool(tool: str, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python tools/<tool>.py args...` as a user would; returns the finished process."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{tool}.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


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


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """HF folders of two tiny GQA Qwen3 models (8 heads, 4 KV heads so TP4 divides them)."""
    from megatron_rlsd.models.tiny import build_tiny_qwen3

    root = tmp_path_factory.mktemp("tiny_qwen3")
    return {
        name: build_tiny_qwen3(root / name, tie_word_embeddings=tied, num_heads=8, num_kv_heads=4, seed=3)
        for name, tied in (("untied", False), ("tied", True))
    }
