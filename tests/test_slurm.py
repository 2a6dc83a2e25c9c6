"""The Slurm launch layer (slurm/*.sh) on a real Slurm cluster started by tests/slurm_cluster.py.

- launcher logic with a stand-in trainer (seconds per job; the real trainer's stop on a signal
  and its resume are tests/test_train.py's): `scancel --signal=USR1 --batch` reaches the workers
  through the batch shell, srun and the per-node wrapper, also while they still start (the
  wrapper repeats it until they handle it); they checkpoint and stop, the launcher requeues the
  job (Restarts=1) and the requeued run completes; `scancel` checkpoints and ends the job
  without a requeue;
- bad submissions (missing config, a world size TP*PP does not divide) fail within seconds with
  the trainer's one-line config error in the job log; the converter job runs;
- two nodes, each slurmd in its own network namespace: `sbatch slurm/rlsd_qwen3vl.sh` with the
  tiny CPU config, TP2 x PP2 over 2 nodes x 2 processes under srun + torchrun, logs its training
  steps and completes, with the c10d rendezvous and gloo traffic crossing the veth pairs.

Nothing is skipped: if Slurm cannot be installed or started the tests fail with the reason.
"""

from __future__ import annotations

import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO
from slurm_cluster import SlurmCluster, SlurmUnavailable

TRAIN_SCRIPT = "slurm/rlsd_qwen3vl.sh"
JOB_TIMEOUT = 600  # s; a 4-process launch is 30-50 s on 2 idle cores, much more on a busy machine
FAIL_FAST_S = 120  # s a bad submission may run (the config error itself comes ~10-25 s after start)


def _cluster(nodes: int):
    try:
        cluster = SlurmCluster(nodes=nodes)
        cluster.__enter__()
    except SlurmUnavailable as e:
        pytest.fail(f"no Slurm cluster ({nodes} node(s)) could be started: {e}", pytrace=False)
    return cluster


@pytest.fixture(scope="module")
def one_node():
    cluster = _cluster(1)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def two_nodes():
    cluster = _cluster(2)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Shared by the jobs of this module: the tiny model and data are built by the first job."""
    return tmp_path_factory.mktemp("slurm")


def job_env(**extra: str) -> dict[str, str]:
    """Variables for a job (sbatch --export=ALL takes them from the submitting environment)."""
    venv = Path(sys.prefix)
    env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "VENV": str(venv) if (venv / "bin" / "activate").is_file() else ""}  # fmt: skip
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def tiny_overrides(work: Path, *extra: str) -> list[str]:
    return [
        f"model.hf_dir={work / 'tiny'}", f"data.train_file={work / 'add.jsonl'}", "demo.synthetic_rows=64",
        "trainer.warmup_sft_steps=0", "trainer.steps=2", "trainer.prompts_per_step=4", "rollout.group_size=4",
        "rollout.max_new_tokens=8", "trainer.micro_batch_size=8", *extra,
    ]  # fmt: skip


def submit(
    cluster: SlurmCluster,
    work: Path,
    name: str,
    *overrides: str,
    nodes: int = 1,
    script: str = TRAIN_SCRIPT,
    sbatch_args: tuple[str, ...] = (),
    **env: str,
) -> tuple[str, Path]:
    """sbatch the real script from the repository root with CPU-friendly flags; returns (job id, log)."""
    log = work / f"{name}.log"
    job = cluster.sbatch(
        f"--nodes={nodes}", "--gpus-per-node=0", f"--output={log}", f"--job-name=test-{name}", *sbatch_args,
        script, *overrides, cwd=REPO, env=job_env(**env),
    )  # fmt: skip
    return job, log


def wait_for_log(log: Path, pattern: str, timeout: float, cluster: SlurmCluster, job: str) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text, re.MULTILINE):
            return text
        state = cluster.job_info(job).get("JobState")
        if state in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"):
            break
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in the log of job {job} ({cluster.job_info(job).get('JobState')}):\n"
                         f"{log.read_text(errors='replace')[-6000:] if log.exists() else '(no log)'}")  # fmt: skip


def run_seconds(info: dict[str, str]) -> float:
    start, end = (datetime.fromisoformat(info[k]) for k in ("StartTime", "EndTime"))
    return (end - start).total_seconds()


# ----------------------------------------------------------------------------------------- one node
# ----------------------------------------------------------------------------------------- launcher logic
# A stand-in for `python -m torch.distributed.run ... -m megatron_rlsd.train ...` (given to the
# launcher as PYTHON): an "agent" that starts two "workers" and waits, like torchrun. The workers
# take FAKE_STARTUP_S to "start" (the inherited dispositions apply until then, as in the trainer),
# then handle USR1/TERM the trainer's way: rank 0 writes OUTPUT_DIR/STOPPED, all exit 0. Without a
# signal they run FAKE_RUN_S and rank 0 writes COMPLETED. Seconds per job instead of a minute.
FAKE_WORKER = """\
import os, signal, sys, time
rank, out = int(sys.argv[1]), os.environ["OUTPUT_DIR"]
time.sleep(float(os.environ.get("FAKE_STARTUP_S", "0")))
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: got.append(signum))
print(f"fake worker {rank} ready", flush=True)
deadline = time.time() + float(os.environ.get("FAKE_RUN_S", "120"))
while time.time() < deadline and not got:
    time.sleep(0.1)
if got and rank == 0:
    open(os.path.join(out, "STOPPED"), "w").close()
    print(f"stopping on signal {signal.Signals(got[0]).name}: checkpoint saved at step 1", flush=True)
elif rank == 0:
    open(os.path.join(out, "COMPLETED"), "w").close()
"""
FAKE_AGENT = """\
import subprocess, sys
print("fake agent started:", " ".join(sys.argv[1:]), flush=True)
workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(r)]) for r in range(2)]
sys.exit(max(w.wait() for w in workers))
"""


@pytest.fixture(scope="module")
def fake_python(work):
    path = work / "fake_python"
    path.write_text(f"#!{sys.executable}\nWORKER = {FAKE_WORKER!r}\n{FAKE_AGENT}")
    path.chmod(0o755)
    return str(path)


def test_scancel_ends_the_job_without_requeue(one_node, work, fake_python):
    """scancel: TERM reaches the workers (the agent survives it), they checkpoint, and the launcher
    does not requeue a cancelled job (`scontrol requeue` would revive it)."""
    job, log = submit(one_node, work, "scancel", CONFIG="examples/tiny_cpu.yaml", OUTPUT_DIR=str(work / "scancel"),
                      PYTHON=fake_python, FAKE_STARTUP_S="0")  # fmt: skip
    wait_for_log(log, r"fake worker 1 ready", JOB_TIMEOUT, one_node, job)
    one_node.run("scancel", job)
    one_node.wait_for(job, {"CANCELLED"}, timeout=120, log=log)
    text = wait_for_log(log, r"not requeueing", 60, one_node, job)
    assert "stopping on signal SIGTERM" in text and "torchrun exited with status 0" in text, text
    assert re.search(r"job state (CANCELLED|COMPLETING): not requeueing", text), text
    time.sleep(3)
    info = one_node.job_info(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info


def test_signal_during_worker_startup_is_repeated(one_node, work, fake_python):
    """USR1 while the workers still start (their handlers not installed) is not lost: the wrapper
    repeats it; the job then requeues and the second run completes."""
    out = work / "early_signal"
    job, log = submit(one_node, work, "early_signal", CONFIG="examples/tiny_cpu.yaml", OUTPUT_DIR=str(out),
                      PYTHON=fake_python, FAKE_STARTUP_S="3", FAKE_RUN_S="1", RLSD_SIGNAL_REPEAT_S="1")  # fmt: skip
    wait_for_log(log, r"fake agent started", JOB_TIMEOUT, one_node, job)
    one_node.run("scancel", "--signal=USR1", "--batch", job)
    info = one_node.wait_for(job, {"COMPLETED"}, timeout=JOB_TIMEOUT, log=log)
    text = log.read_text()
    assert info["Restarts"] == "1", info
    assert "stopping on signal SIGUSR1" in text and f"requeueing job {job}" in text, text
    assert text.index("got SIGUSR1, forwarding to workers") < text.index("fake worker 0 ready"), text
    assert (out / "COMPLETED").is_file()


# ----------------------------------------------------------------------------------------- failures
def test_bad_submissions_fail_fast_with_the_config_error(two_nodes, work, request):
    """Three one-node jobs at once on the two-node cluster: two bad launches, one converter run."""
    missing, bad_split = "examples/no_such_config.yaml", "examples/tiny_cpu.yaml"
    # the tiny model an earlier job of this module built, else conftest's (costs a torch import here)
    hf_dir = (
        work / "tiny" if (work / "tiny" / "config.json").is_file() else request.getfixturevalue("tiny_qwen3")["untied"]
    )
    jobs = {
        "missing": submit(two_nodes, work, "missing_config", CONFIG=missing, OUTPUT_DIR=str(work / "missing")),
        "split": submit(two_nodes, work, "bad_split", CONFIG=bad_split, NPROC_PER_NODE="3",
                        OUTPUT_DIR=str(work / "bad_split")),
        "convert": submit(two_nodes, work, "convert", script="slurm/convert_hf_to_megatron.sh",
                          sbatch_args=("--cpus-per-task=1", "--mem=1G"), HF_DIR=str(hf_dir),
                          OUT=str(work / "mcore")),
    }  # fmt: skip
    infos = {name: two_nodes.wait_for(job, {"FAILED", "COMPLETED"}, timeout=JOB_TIMEOUT, log=log)
             for name, (job, log) in jobs.items()}  # fmt: skip
    for name, pattern in (("missing", rf"config error: config file {re.escape(missing)} not found"),
                          ("split", r"config error: world size 3 is not divisible by TP\*PP = ")):  # fmt: skip
        info, text = infos[name], jobs[name][1].read_text()
        assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
        errors = [line for line in text.splitlines() if "megatron_rlsd.train: config error" in line]
        assert len(errors) == 1 and re.search(pattern, errors[0]), text[-4000:]
        assert run_seconds(info) < FAIL_FAST_S, (run_seconds(info), info)
        assert "training failed" in text
    assert infos["convert"]["JobState"] == "COMPLETED", jobs["convert"][1].read_text()[-4000:]
    assert (work / "mcore" / "latest").exists()


# ----------------------------------------------------------------------------------------- two nodes
def test_two_node_job_spans_both_namespaces(two_nodes, work):
    out = work / "two_nodes"
    before = two_nodes.link_bytes()
    job, log = submit(two_nodes, work, "two_nodes", *tiny_overrides(work), nodes=2, CONFIG="examples/tiny_cpu.yaml",
                      NPROC_PER_NODE="2", OUTPUT_DIR=str(out))  # fmt: skip
    info = two_nodes.wait_for(job, {"COMPLETED"}, timeout=JOB_TIMEOUT, log=log)
    text = log.read_text()
    assert info["NodeList"] == "node[1-2]", info
    assert re.search(r"node 0/2: node1 addr 10\.77\.\d+\.11 .*rendezvous host", text), text[-4000:]
    assert re.search(r"node 1/2: node2 addr 10\.77\.\d+\.12 ", text), text[-4000:]
    assert text.count("torchrun exited with status 0") == 2
    assert "step    1 |" in text and "step    2 |" in text and "--rdzv-backend=c10d" in text
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
    assert (out / "COMPLETED").is_file() and (out / "checkpoints" / "latest").exists()
    # the completion record Slurm keeps (no slurmdbd here, so no sacct): jobcomp/filetxt
    record = (two_nodes.root / "log" / "jobcomp.txt").read_text()
    assert re.search(rf"JobId={job} .*JobState=COMPLETED", record), record
    # TP2 x PP2 on 2 x 2 processes: pipeline traffic between the nodes crossed both veth pairs
    after = two_nodes.link_bytes()
    moved = {node: after[node] - before[node] for node in after}
    assert all(n > 1_000_000 for n in moved.values()), moved


def test_time_limit_warning_covers_a_step_and_a_save():
    """The default warning before the time limit leaves room for the rest of a paper-recipe step
    (about 4 minutes) plus an 8B checkpoint save (1-3 minutes), and the scripts say how to change it."""
    for script in ("slurm/rlsd_qwen3vl.sh", "slurm/rlsd_grpo_baseline.sh"):
        text = (REPO / script).read_text()
        (seconds,) = re.findall(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M)
        assert int(seconds) >= 600, (script, seconds)
    assert "--signal=B:USR1@SECONDS" in (REPO / "slurm/README.md").read_text()
