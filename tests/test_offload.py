"""offload.grads frees Megatron's gradient buffer while vLLM generates and brings it back: on CPU
the freed memory shows in the process's RSS (tests/workers/offload_rss.py)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_offloaded_gradient_buffer_leaves_and_returns():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "tests/workers/offload_rss.py"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(r)  # measured: 1761 -> 1121 -> 1761 MiB for a 640 MiB buffer
    assert r["grad_buffer"] > 500
    assert r["before"] - r["offloaded"] > 0.9 * r["grad_buffer"], r
    assert r["restored"] - r["offloaded"] > 0.9 * r["grad_buffer"], r
