"""A real Slurm cluster on this machine, started and stopped by the tests.

Debian's ``slurm-wlm`` runs one ``slurmctld`` and N ``slurmd -N nodeK`` daemons on one host: each
node is declared in its own temp ``slurm.conf`` with its own port, spool dir and pid file. Where
``ip netns`` works (root + iproute2), every node lives in its own network namespace joined to a
bridge by a veth pair, so rendezvous and collectives between nodes cross a real network interface;
otherwise all nodes share loopback. ``SlurmCluster.netns`` says which.

Everything (state, spool, logs, pid files) lives in a temp dir; every daemon and job process is
found by PID (pid files + an environment marker only this cluster's processes carry) and stopped
at teardown, so nothing keeps running after the test.

Use the fixtures ``slurm_cluster`` (1 node, CPUs=2) and ``slurm_cluster_2n`` (2 nodes, CPUs=1 each)
via ``pytest_plugins = ["tests.slurm_cluster"]`` or ``from tests.slurm_cluster import ...``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import JOB_CFG, REPO, assert_losses_close, free_port, losses_by_step, read_metrics

INSTALL_SCRIPT = REPO / "launch" / "slurm" / "install-slurm.sh"
SBIN_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def ensure_slurm() -> None:
    """Install slurm-wlm when missing (root + apt-get), else ``pytest.skip`` with the reason."""
    if all(_which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0:
        pytest.skip("slurm-wlm is not installed and installing it needs root (launch/slurm/install-slurm.sh)")
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0 or not all(_which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        reason = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        pytest.skip(f"slurm-wlm could not be installed: {reason}")


def _netns_works() -> bool:
    if os.geteuid() != 0 or not _which("ip"):
        return False
    probe = f"lmfp{os.getpid() % 100000}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return ok


def _pids_with_env(key: str, value: str) -> list[int]:
    """PIDs of processes whose environment holds ``key=value`` (how we find our own processes)."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            pids.append(int(entry.name))
    return pids


def _kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class SlurmCluster:
    """slurmctld + ``n_nodes`` slurmd daemons (``node1..nodeN``) configured in ``root``."""

    def __init__(self, root: Path, n_nodes: int = 1, cpus_per_node: int = 2, netns: bool | None = None):
        self.root = root
        self.n_nodes = n_nodes
        self.cpus_per_node = cpus_per_node
        self.nodes = [f"node{k + 1}" for k in range(n_nodes)]
        self.conf = root / "slurm.conf"
        self.marker = uuid.uuid4().hex[:12]  # env marker on every daemon we start
        # separate network namespaces only matter between nodes; one node stays on loopback
        self.netns = (n_nodes > 1 and _netns_works()) if netns is None else netns
        tag = self.marker[:6]
        self._ns = {n: f"lmf{tag}{k}" for k, n in enumerate(self.nodes, 1)}
        self._bridge = f"lmfbr{tag}"
        # 10.<a>.<b>.0/24, unlikely to collide with anything on the host
        a, b = 100 + int(tag[:2], 16) % 100, int(tag[2:4], 16)
        self.ctl_addr = f"10.{a}.{b}.1" if self.netns else "127.0.0.1"
        self.node_addr = {n: (f"10.{a}.{b}.{10 + k}" if self.netns else "127.0.0.1")
                          for k, n in enumerate(self.nodes, 1)}
        self._ctl_pid: int | None = None
        self._slurmd_pid: dict[str, int] = {}
        self._links: list[str] = []
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(self.conf)
        self.env["PATH"] = self.env.get("PATH", "") + ":" + SBIN_PATH
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":
                del self.env[k]

    # ---------- set-up ----------
    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctl_port = free_port()
        host = socket.gethostname()
        lines = [
            "ClusterName=lmforge",
            f"SlurmctldHost={host}({self.ctl_addr})",
            f"SlurmctldPort={ctl_port}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "MailProg=/bin/true",
            # fast reaction to a lost node in tests (production defaults are minutes)
            "SlurmdTimeout=10",
            "MessageTimeout=5",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=300",
        ]
        for n in self.nodes:
            lines.append(f"NodeName={n} NodeHostname={host} NodeAddr={self.node_addr[n]} Port={free_port()} "
                         f"CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO")
        self.conf.write_text("\n".join(lines) + "\n")

    def _ip(self, *args: str, ns: str | None = None) -> None:
        cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
        subprocess.run(cmd, check=True, capture_output=True)

    def _setup_netns(self) -> None:
        self._ip("link", "add", self._bridge, "type", "bridge")
        self._links.append(self._bridge)
        self._ip("addr", "add", f"{self.ctl_addr}/24", "dev", self._bridge)
        self._ip("link", "set", self._bridge, "up")
        for k, n in enumerate(self.nodes, 1):
            ns, host_if = self._ns[n], f"lmfv{self.marker[:6]}{k}"
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            self._ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._links.append(host_if)
            self._ip("link", "set", host_if, "master", self._bridge)
            self._ip("link", "set", host_if, "up")
            self._ip("link", "set", "lo", "up", ns=ns)
            self._ip("addr", "add", f"{self.node_addr[n]}/24", "dev", "eth0", ns=ns)
            self._ip("link", "set", "eth0", "up", ns=ns)
            self._ip("route", "add", "default", "via", self.ctl_addr, ns=ns)

    def _teardown_netns(self) -> None:
        for ns in self._ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        for link in reversed(self._links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)

    def _daemon_env(self, node: str | None) -> dict[str, str]:
        env = dict(self.env)
        env["LMFORGE_SLURM_CLUSTER"] = self.marker
        if node:
            env["LMFORGE_SLURM_NODE"] = f"{self.marker}:{node}"
        return env

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        self._write_conf()
        if self.netns:
            self._setup_netns()
        # -i: ignore saved state (fresh cluster); -D is avoided so the daemon writes its pid file
        subprocess.run([_which("slurmctld"), "-i", "-f", str(self.conf)], env=self._daemon_env(None), check=True,
                       capture_output=True, timeout=30)
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
            self.start_node(n)
        self._ctl_pid = self._read_pid(self.root / "run" / "slurmctld.pid")
        self.wait_nodes_idle(timeout)
        return self

    def start_node(self, node: str) -> None:
        cmd = [_which("slurmd"), "-N", node, "-f", str(self.conf)]
        if self.netns:
            # A node of its own: network namespace, hostname = node name (UTS namespace), and a private
            # mount namespace whose /etc/hosts names every node (so a node's hostname resolves to its
            # own interface, as on a real cluster) and whose resolv.conf fails fast (the host's DNS
            # server is unreachable from the node).
            etc = self.root / "etc" / node
            etc.mkdir(parents=True, exist_ok=True)
            hosts = ["127.0.0.1 localhost", f"{self.ctl_addr} {socket.gethostname()}"]
            hosts += [f"{self.node_addr[n]} {n}" for n in self.nodes]
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            inner = (f"mount --bind {etc}/hosts /etc/hosts && mount --bind {etc}/resolv.conf /etc/resolv.conf"
                     f" && hostname {node} && exec {' '.join(cmd)}")
            cmd = ["nsenter", f"--net=/var/run/netns/{self._ns[node]}", "--",
                   "unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", inner]
        subprocess.run(cmd, env=self._daemon_env(node), check=True, capture_output=True, timeout=30)
        self._slurmd_pid[node] = self._read_pid(self.root / "run" / f"{node}.pid")

    @staticmethod
    def _read_pid(path: Path, timeout: float = 15.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"slurm daemon wrote no pid file at {path}")

    def wait_nodes_idle(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        out = ""
        while time.monotonic() < end:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"slurm nodes not idle after {timeout}s: {out!r}; logs in {self.root / 'log'}")

    # ---------- helpers ----------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    def sbatch(self, script: str | Path | None, *args: str, sbatch_args: tuple[str, ...] = (),
               wrap: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
        """Submit ``script`` (or ``--wrap``); returns the job id."""
        cmd = [_which("sbatch"), "--parsable", *sbatch_args]
        cmd += ["--wrap", wrap] if wrap is not None else [str(script), *args]
        full_env = dict(self.env, **(env or {}))
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, cwd=cwd, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_state(self, job_id: int, states: set[str] | str, timeout: float = 300.0) -> str:
        states = {states} if isinstance(states, str) else set(states)
        end = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < end:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} is {state}, not {sorted(states)}, after {timeout}s")

    def wait_done(self, job_id: int, timeout: float = 300.0) -> str:
        return self.wait_state(job_id, TERMINAL_STATES, timeout)

    def requeue(self, job_id: int) -> None:
        self.run("scontrol", "requeue", str(job_id))

    def release_requeued(self, job_id: int, timeout: float = 300.0) -> None:
        """Start a requeued job early. slurmctld holds every requeued job for 120 s (its BeginTime) so the
        old allocation is cleaned up first: slurmd revokes the old run's credential with a timestamp of
        one-second resolution, and a relaunch within that second is killed ("Job credential revoked").
        The tests lift the hold with ``scontrol update StartTime=now`` once the job is back in the
        queue, every node is idle again and two seconds have passed, instead of waiting two minutes.
        Returns without touching the job once it runs again or has ended."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job_info(job_id)
            state, restarts = info.get("JobState", "UNKNOWN"), int(info.get("Restarts", "0") or 0)
            if state == "PENDING" and info.get("Reason") == "BeginTime":
                self.wait_nodes_idle(max(1.0, end - time.monotonic()))
                time.sleep(2.0)
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                return
            if state in TERMINAL_STATES or (restarts > 0 and state == "RUNNING"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} was not requeued within {timeout}s ({self.job_state(job_id)})")

    def node_pids(self, node: str) -> list[int]:
        """The node's slurmd, its slurmstepd's and every job process running on it."""
        pids = set(_pids_with_env("LMFORGE_SLURM_NODE", f"{self.marker}:{node}"))
        job_pids = set(_pids_with_env("SLURMD_NODENAME", node)) & set(_pids_with_env("SLURM_CONF", str(self.conf)))
        return sorted(pids | job_pids)

    def stop_node(self, node: str) -> None:
        """Simulate losing ``node``: SIGKILL its slurmd, step daemons and job processes."""
        for _ in range(3):  # job processes may fork while we kill; sweep until none remain
            pids = self.node_pids(node)
            if not pids:
                break
            _kill(pids)
            time.sleep(0.2)
        self._slurmd_pid.pop(node, None)

    def stop(self) -> None:
        if self.conf.exists():
            self.run("scancel", "--full", "--quiet", "-u", "root", check=False, timeout=20)
        for pid in list(self._slurmd_pid.values()) + ([self._ctl_pid] if self._ctl_pid else []):
            _kill([pid], signal.SIGTERM)
        end = time.monotonic() + 10
        while time.monotonic() < end and self._alive():
            time.sleep(0.2)
        # anything still alive (stuck daemons, orphaned job processes) is killed by PID
        for _ in range(3):
            left = self._alive()
            if not left:
                break
            _kill(left)
            time.sleep(0.2)
        if self.netns:
            self._teardown_netns()

    def _alive(self) -> list[int]:
        ours = set(_pids_with_env("LMFORGE_SLURM_CLUSTER", self.marker))
        ours |= set(_pids_with_env("SLURM_CONF", str(self.conf)))
        return sorted(ours)

    def log(self, name: str = "slurmctld") -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _cluster(tmp_path_factory: pytest.TempPathFactory, n_nodes: int, cpus: int) -> Iterator[SlurmCluster]:
    ensure_slurm()
    root = tmp_path_factory.mktemp(f"slurm{n_nodes}n")
    cluster = SlurmCluster(root, n_nodes=n_nodes, cpus_per_node=cpus)
    try:
        cluster.start()
    except Exception as e:
        cluster.stop()
        raise RuntimeError(f"could not start the slurm cluster: {e}\n{cluster.log()[-3000:]}") from e
    # a SIGTERM to pytest (e.g. a CI timeout) must still stop the daemons: make it an interrupt,
    # which runs fixture teardown
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield cluster
    finally:
        signal.signal(signal.SIGTERM, previous)
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node cluster (CPUs=2)."""
    yield from _cluster(tmp_path_factory, n_nodes=1, cpus=2)


@pytest.fixture(scope="module")
def slurm_cluster_2n(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A two-node cluster (CPUs=1 each); each node in its own network namespace where possible."""
    yield from _cluster(tmp_path_factory, n_nodes=2, cpus=1)


# ---------------------------------------------------------------- launching lmforge for the tests

LAUNCH = REPO / "launch"
def launch_env(nproc: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a launch script or job: one thread per rank, CPU DeepSpeed, offline W&B."""
    env = {"NPROC_PER_NODE": str(nproc), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra or {})
    return env


def run_launch_script(script: str, run_dir: Path, *overrides: str, nproc: int = 2,
                      env: dict[str, str] | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """``launch/<script> run.dir=<run_dir> <overrides>`` on this machine (no Slurm)."""
    full = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "HOSTFILE"):
        full.pop(k, None)
    full.update(launch_env(nproc, env))
    if "MASTER_PORT" not in (env or {}):
        full["MASTER_PORT"] = str(free_port())
    return subprocess.run(["bash", str(LAUNCH / script), f"run.dir={run_dir}", *overrides], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout, check=False)


def train_steps(run_dir: Path) -> list[int]:
    return [int(e["step"]) for e in read_metrics(run_dir) if "loss" in e]


def latest_checkpoint(run_dir: Path) -> Path | None:
    latest = run_dir / "checkpoints" / "latest"
    return run_dir / "checkpoints" / latest.read_text().strip() if latest.is_file() else None


def assert_same_losses(got: dict[int, float], want: dict[int, float], tol: float) -> None:
    """The same steps, each loss within ``tol``."""
    assert sorted(got) == sorted(want), f"steps differ: {sorted(got)} vs {sorted(want)}"
    assert_losses_close(got, want, sorted(want), tol)


def reference_losses(run_dir: Path, script: str, *overrides: str, nproc: int = 2) -> dict[int, float]:
    """Losses of ``launch/<script>`` on one node (no Slurm) on JOB_CFG + overrides, uninterrupted: steps 1..8."""
    proc = run_launch_script(script, run_dir, *JOB_CFG, *overrides, nproc=nproc)
    assert proc.returncode == 0, f"launch/{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    got = losses_by_step(run_dir)
    assert sorted(got) == list(range(1, 9)), got
    return got


@pytest.fixture(scope="session")
def zero3_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses of ``launch/deepspeed.sh`` (ZeRO-3, 2 CPU ranks, one node) on JOB_CFG."""
    return reference_losses(tmp_path_factory.mktemp("ref") / "zero3", "deepspeed.sh", "strategy=zero3")


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses of ``launch/torchrun.sh`` (DDP, 2 CPU ranks, one node) on JOB_CFG, uninterrupted."""
    return reference_losses(tmp_path_factory.mktemp("ref") / "ddp", "torchrun.sh", "strategy=ddp")
