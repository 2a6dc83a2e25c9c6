"""A real, throw-away Slurm cluster for tests (not a test module).

    with SlurmCluster(nodes=1) as cluster:          # slurmctld + one slurmd on 127.0.0.1
        job = cluster.sbatch("--export=ALL,FOO=1", "slurm/rlsd_qwen3vl.sh")
        cluster.wait_for(job, {"COMPLETED"}, timeout=300)

    with SlurmCluster(nodes=2) as cluster:          # each slurmd in its own network namespace
        ...

What it starts, all of it private to one temporary directory and a few network namespaces:
- ``munged`` as user munge with its own key, socket, seed, pid and log files (Slurm is pointed at
  the socket with ``AuthInfo=socket=...``), so it neither needs nor disturbs a system munged;
- ``slurmctld`` and one ``slurmd -N nodeK`` per node, in the foreground as children of this
  process, with ``slurm.conf``, state, spool, pid and log files in the temporary directory.
  Client commands find the cluster through ``SLURM_CONF`` (``cluster.env``) and run in the
  controller's namespace (``cluster.client(...)``, ``cluster.run(...)``, ``cluster.sbatch(...)``).

Networking: every daemon, and so every job process, runs in a network namespace without a
default route, so nothing can reach an address outside (host lookups that miss /etc/hosts fail
locally instead of querying a DNS server). One node: controller and node share one namespace and
talk over its loopback 127.0.0.1. Two or more nodes: the controller's namespace and one namespace
per node (``slurmd -N nodeK``, ``NodeAddr`` 10.77.0.(10+K)) are joined by veth pairs to a bridge
in the root namespace that has no address there; processes of a job on different nodes (srun,
torchrun's rendezvous, gloo) really talk across the veth pairs (``cluster.link_bytes()``).

Teardown (context exit, and an atexit hook for interpreter exit) cancels every job, stops the
daemons it started by pid, kills any left-over processes of this cluster (found by a marker
variable in their environment, set for the daemons and for every submitted job, and by
membership of its namespaces), then deletes the namespaces, veths and bridge and the temporary
directory, continuing past errors.

Needs root. Slurm and munge are installed with apt-get if missing; failures raise
``SlurmUnavailable`` with the reason (tests must fail with it, never skip).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from megatron_rlsd.parallel import free_port

MARKER = "RLSD_SLURM_TEST_CLUSTER"  # env var carried by every process of one test cluster
SLURM_PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailable(RuntimeError):
    """Slurm could not be installed, configured or started (the message says why)."""


def _run(cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw, check=False)
    if check and proc.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def ensure_slurm_installed() -> None:
    """apt-get install slurm-wlm and munge unless their daemons are already on PATH."""
    need = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(tool) is None]
    if not need:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{need} missing and not root: cannot apt-get install {SLURM_PACKAGES}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *SLURM_PACKAGES]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env, check=False)
    if proc.returncode != 0:  # stale package lists: refresh once and retry
        _run(["apt-get", "update", "-q"], timeout=600, env=env)
        _run(install, timeout=900, env=env)
    still = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(tool) is None]
    if still:
        raise SlurmUnavailable(f"installed {SLURM_PACKAGES} but {still} still missing from PATH")


class SlurmCluster:
    """Context manager: a running Slurm cluster of ``nodes`` nodes (see the module docstring).

    Attributes once entered: ``root`` (temporary directory), ``conf`` (slurm.conf path), ``env``
    (os.environ plus SLURM_CONF and the marker; pass it to every Slurm client call),
    ``node_names``.
    """

    def __init__(self, nodes: int = 1, cpus_per_node: int = 2, cred_expire_s: int = 5):
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        # Slurm holds a requeued job for cred_expire + 1 s before it may start again (default
        # 120 s); tests want the requeued run soon
        self.cred_expire_s = cred_expire_s
        self.node_names = [f"node{k + 1}" for k in range(nodes)]
        self.root: Path | None = None
        self.conf: Path | None = None
        self.env: dict[str, str] = {}
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._log_handles = []
        self._netns: list[str] = []
        self._links: list[str] = []
        self.node_links: dict[str, str] = {}  # node name -> root-side veth (two or more nodes)
        self._jobs: list[str] = []
        self._closed = False
        self._tag = f"{os.getpid() % 10000}{secrets.token_hex(1)}"  # short: interface names <= 15 chars
        self.ctl_ns = ""  # network namespace of slurmctld and munged (and of the node, for one node)
        self.node_ns: dict[str, str] = {}  # node name -> its network namespace

    # ------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SlurmCluster:
        atexit.register(self.close)
        try:
            self._start()
        except BaseException:
            logs = self.daemon_logs() if self.root else ""
            self.close()
            if logs:
                raise SlurmUnavailable(f"cluster did not start; daemon logs:\n{logs}") from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd/munged and network namespaces needs root")
        ensure_slurm_installed()
        for tool in ("ip", "nsenter"):
            if shutil.which(tool) is None:
                raise SlurmUnavailable(f"{tool} not found (packages iproute2, util-linux)")
        self.root = Path(tempfile.mkdtemp(prefix="rlsd-slurm-"))
        self.root.chmod(0o755)  # munged (user munge) must traverse it
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"), **{MARKER: str(self.root)})
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # we may run inside a job of another cluster: forget it
                del self.env[var]
        ctl_addr, node_addrs = self._make_network()
        self._start_munged()
        self._write_conf(ctl_addr, node_addrs)
        self._spawn("slurmctld", self._in_ns(self.ctl_ns, ["slurmctld", "-D", "-c", "-f", str(self.conf)]))
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
            cmd = ["slurmd", "-D", "-N", name, "-f", str(self.conf)]
            self._spawn(f"slurmd-{name}", self._in_ns(self.node_ns[name], cmd))
        self._wait_nodes_idle(timeout=60)

    @staticmethod
    def _in_ns(ns: str, cmd: list[str]) -> list[str]:
        # nsenter (not `ip netns exec`, which remounts /sys without the cgroup mounts slurmd
        # probes) switches only the network namespace and execs: the pid is the command's
        return ["nsenter", f"--net=/run/netns/{ns}", *cmd]

    def close(self) -> None:
        """Stop everything this cluster started; safe to call twice, never raises."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for step in (self._cancel_jobs, self._stop_daemons, self._kill_leftovers, self._delete_network):
            try:
                step()
            except Exception as e:  # keep tearing down
                errors.append(f"{step.__name__}: {e}")
        for fh in self._log_handles:
            fh.close()
        if self.root is not None and not os.environ.get("RLSD_KEEP_SLURM_DIR"):
            shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            print("slurm_cluster teardown problems:", *errors, sep="\n  ")

    # ------------------------------------------------------------------------ munge
    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o700)
        key = mdir / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o400)
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        # the socket directory must be reachable by clients (root here) but not writable by others
        mdir.chmod(0o755)
        self.munge_socket = mdir / "munge.socket"
        cmd = ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={mdir / 'munged.pid'}", f"--seed-file={mdir / 'munged.seed'}",
               f"--log-file={mdir / 'munged.log'}", "--num-threads=4"]  # fmt: skip
        # in the controller's namespace too (its host lookups must not leave the machine); the
        # unix socket is reachable from every network namespace
        self._spawn("munged", ["nsenter", f"--net=/run/netns/{self.ctl_ns}", f"--setuid={munge.pw_uid}",
                               f"--setgid={munge.pw_gid}", *cmd])  # fmt: skip
        deadline = time.time() + 20
        while time.time() < deadline:
            probe = subprocess.run(f"munge -S {self.munge_socket} -n | unmunge -S {self.munge_socket}",
                                   shell=True, capture_output=True, text=True, check=False)  # fmt: skip
            if probe.returncode == 0:
                return
            self._check_alive()
            time.sleep(0.2)
        raise SlurmUnavailable(f"munged does not answer on {self.munge_socket}: {probe.stderr.strip()}")

    # ------------------------------------------------------------------------ network namespaces
    def _add_netns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._netns.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _make_network(self) -> tuple[str, list[str]]:
        """Namespaces for the controller and the nodes; returns (controller address, node addresses).

        Every daemon (and so every job process) lives in a namespace without a default route:
        names that miss /etc/hosts make the resolver fail locally instead of querying a DNS
        server outside. One node shares the controller's namespace, on 127.0.0.1. Two or more:
        a bridge in the root namespace (no address there) joins the controller's and the nodes'
        namespaces through veth pairs, addresses 10.77.0.1 (controller), 10.77.0.11, .12, ...
        """
        self.ctl_ns = f"rlsd{self._tag}c"
        self._add_netns(self.ctl_ns)
        if self.nodes == 1:
            self.node_ns = {self.node_names[0]: self.ctl_ns}
            # getaddrinfo(AI_ADDRCONFIG), which slurmd uses to bind, finds nothing where the only
            # IPv4 address is loopback: give the namespace a veth pair of its own (both ends inside)
            _run(["ip", "-n", self.ctl_ns, "link", "add", "rlsd0", "type", "veth", "peer", "name", "rlsd1"])
            _run(["ip", "-n", self.ctl_ns, "addr", "add", "10.77.0.1/24", "dev", "rlsd0"])
            for end in ("rlsd0", "rlsd1"):
                _run(["ip", "-n", self.ctl_ns, "link", "set", end, "up"])
            return "127.0.0.1", ["127.0.0.1"]
        net = ipaddress.IPv4Network("10.77.0.0/24")  # private to this bridge: clashes with nothing
        bridge = f"rb{self._tag}"
        _run(["ip", "link", "add", bridge, "type", "bridge"])
        self._links.append(bridge)
        _run(["ip", "link", "set", bridge, "up"])

        def join(ns: str, suffix: str, addr: str) -> str:
            host_end, ns_end = f"rh{self._tag}{suffix}", f"rn{self._tag}{suffix}"
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end])
            self._links.append(host_end)  # deleting one end deletes the pair
            _run(["ip", "link", "set", ns_end, "netns", ns])
            _run(["ip", "link", "set", host_end, "master", bridge])
            _run(["ip", "link", "set", host_end, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", ns_end])
            _run(["ip", "-n", ns, "link", "set", ns_end, "up"])
            return host_end

        ctl_addr = str(net.network_address + 1)
        join(self.ctl_ns, "c", ctl_addr)
        self.node_ns, node_addrs = {}, []
        for k, name in enumerate(self.node_names):
            ns, addr = f"rlsd{self._tag}n{k + 1}", str(net.network_address + 11 + k)
            self._add_netns(ns)
            self.node_links[name] = join(ns, str(k + 1), addr)
            self.node_ns[name] = ns
            node_addrs.append(addr)
        for ns in [self.ctl_ns, *self.node_ns.values()]:  # everyone reaches everyone, nothing else
            for target in [ctl_addr, *node_addrs]:
                _run(["ip", "-n", ns, "route", "get", target])
            if _run(["ip", "-n", ns, "route", "show", "default"]).stdout.strip():
                raise SlurmUnavailable(f"namespace {ns} has a default route")
        return ctl_addr, node_addrs

    def _delete_network(self) -> None:
        for ns in self._netns:
            # whatever still runs in our namespaces is ours
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
        for link in reversed(self._links):
            subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
        self._netns, self._links = [], []

    # ------------------------------------------------------------------------ slurm.conf
    def _write_conf(self, ctl_addr: str, node_addrs: list[str]) -> None:
        r = self.root
        for sub in ("state", "log"):
            (r / sub).mkdir()
        self.conf = r / "slurm.conf"
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={name} NodeAddr={addr} NodeHostname={name} CPUs={self.cpus_per_node} "
            f"RealMemory=4000 State=UNKNOWN"
            for name, addr in zip(self.node_names, node_addrs)
        )
        self.conf.write_text(f"""\
# generated by tests/slurm_cluster.py for one test session; deleted at teardown
ClusterName=rlsdtest
SlurmctldHost={host}({ctl_addr})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}/%n
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "spool"}/%n/slurmd.pid
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log"}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# schedule every 2 s (defaults 60/30 s): a requeued job restarts soon after it becomes eligible
SchedulerParameters=sched_interval=2,bf_interval=2
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r / "log" / "jobcomp.txt"}
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=60
MessageTimeout=20
KillWait=30
InactiveLimit=0
MinJobAge=600
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    # ------------------------------------------------------------------------ processes
    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        fh = open(self.root / f"{name}.out", "w")
        self._log_handles.append(fh)
        env = dict(self.env)
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, **kw)  # fmt: skip
        self._procs.append((name, proc))

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with {proc.returncode}")

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline, last = time.time() + timeout, ""
        while time.time() < deadline:
            self._check_alive()
            proc = subprocess.run(self.client("sinfo", "-h", "-N", "-o", "%N %t"), capture_output=True, text=True,
                                  env=self.env, check=False)  # fmt: skip
            last = proc.stdout.strip() + proc.stderr.strip()
            states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s: {last!r}")

    def _cancel_jobs(self) -> None:
        if not self._procs or self.conf is None:
            return
        # only cancel when slurmctld is still up; scancel would otherwise hang for MessageTimeout
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._procs):
            cancel = (
                self.client("scancel", "--full", *self._jobs) if self._jobs else self.client("scancel", "-u", "root")
            )
            subprocess.run(cancel, capture_output=True, env=self.env, timeout=30, check=False)
            deadline = time.time() + 40
            while time.time() < deadline and self.squeue():
                time.sleep(0.5)

    def _stop_daemons(self) -> None:
        for _, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.time() + 15
        for _, proc in reversed(self._procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def _kill_leftovers(self) -> None:
        """slurmstepd and job processes outlive slurmd; they carry MARKER=<our root> in their env."""
        if self.root is None:
            return
        needle = f"{MARKER}={self.root}".encode()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            found = []
            for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if needle in environ.split(b"\0"):
                    found.append(pid)
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            if not found:
                return
            time.sleep(2)

    # ------------------------------------------------------------------------ client helpers
    def client(self, *cmd: str) -> list[str]:
        """A Slurm client command line (sbatch, scontrol, ...) that runs in the controller's
        network namespace, where the cluster is reachable (run it with ``env=cluster.env``)."""
        return self._in_ns(self.ctl_ns, list(cmd))

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, scontrol, ...) against this cluster."""
        proc = subprocess.run(
            self.client(*cmd), capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None) -> str:
        """Submit (``env``: extra variables for the job, passed with --export=ALL); returns the job id."""
        proc = subprocess.run(self.client("sbatch", "--parsable", *args), capture_output=True, text=True, timeout=60,
                              env={**self.env, **(env or {})}, cwd=cwd, check=False)  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        job = proc.stdout.strip().split(";")[0]
        self._jobs.append(job)
        return job

    def link_bytes(self) -> dict[str, int]:
        """Bytes received + sent so far on each node's root-side veth (two or more nodes)."""
        total = {}
        for node, link in self.node_links.items():
            stats = Path("/sys/class/net") / link / "statistics"
            total[node] = int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())
        return total

    def squeue(self) -> list[str]:
        proc = subprocess.run(
            self.client("squeue", "-h", "-o", "%i %T"),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
            check=False,
        )
        return proc.stdout.splitlines()

    def job_info(self, job: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, NodeList, ExitCode, StdOut...)."""
        proc = self.run("scontrol", "show", "job", "-o", job, check=False)
        info = {}
        for match in re.finditer(r"(\w[\w:/]*)=(\S*)", proc.stdout):
            info.setdefault(match.group(1), match.group(2))
        return info

    def wait_for(self, job: str, states: set[str], timeout: float, log: Path | None = None) -> dict[str, str]:
        """Wait until the job's state is one of ``states``; fails early on any other final state."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}  # fmt: skip
        deadline, info = time.time() + timeout, {}
        while time.time() < deadline:
            info = self.job_info(job)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in final:
                break
            self._check_alive()
            time.sleep(1)
        tail = log.read_text()[-6000:] if log is not None and log.exists() else "(no log)"
        raise AssertionError(f"job {job} is {info.get('JobState')!r}, wanted {states} "
                             f"(after {timeout:.0f} s or a final state)\n{info}\n--- job log ---\n{tail}\n"
                             f"--- daemon logs ---\n{self.daemon_logs(3000)}")  # fmt: skip

    def daemon_logs(self, per_file: int = 4000) -> str:
        if self.root is None:
            return ""
        parts = []
        for path in sorted([*self.root.glob("*.out"), *self.root.glob("log/*.log"), *self.root.glob("munge/*.log")]):
            text = path.read_text(errors="replace")[-per_file:]
            if text.strip():
                parts.append(f"== {path.name}\n{text}")
        return "\n".join(parts)


if __name__ == "__main__":  # manual check: python tests/slurm_cluster.py [nodes]
    import sys

    with SlurmCluster(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 1) as c:
        print(c.run("sinfo", "-N").stdout)
        print(c.run("srun", f"-N{c.nodes}", "bash", "-c", "echo $SLURMD_NODENAME $(hostname -I)").stdout)
