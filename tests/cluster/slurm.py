"""A real Slurm cluster on this machine for tests: one ``slurmctld``, one
``slurmd`` per node (``n1`` and ``n2``), and a private ``munged``, all in the
foreground under a temporary directory, on free ports of 127.0.0.1.

Debian packages (as root): ``apt-get install -y -qq --no-install-recommends
slurmd slurmctld slurm-client munge``.

Each node has its own "local disk", ``<root>/nodes/<node>``
(``Slurm.node_local(node)``): a task prolog creates it and exports it as
``$NODE_LOCAL_DIR`` to every task (the batch script and each ``srun`` task).
Without the prolog a step can compute it as ``$NODE_LOCAL_BASE/$SLURMD_NODENAME``:
``NODE_LOCAL_BASE`` is in ``Slurm.env()`` (sbatch exports the submitter's
environment), and Slurm sets ``SLURMD_NODENAME`` to the name of the node a task
runs on (``hostname`` is the same machine's name on every node).

Several clusters coexist on one machine (one per pytest-xdist worker, as the
``slurm`` fixture is session-scoped): each has its own ports, cluster name,
munge key and socket, and directories; node names are ``n1`` and ``n2`` in all.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# Terminal job states (``scontrol show job``); a job stays listed MinJobAge seconds after.
DONE = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}
# Variables that would steer the clients elsewhere (or into an enclosing job).
_CLIENT_ENV = re.compile(r"^(SLURM|SBATCH|SRUN|SALLOC|SQUEUE|SINFO|SCONTROL|SCANCEL)_")


def which(name: str) -> str | None:
    """``name`` on PATH, or in the sbin directories (a non-login PATH may lack them)."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def missing_tools() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if which(name) is None]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({e})"
    return "\n".join(text[-lines:])


class SlurmJob(NamedTuple):
    job_id: int
    output: str  # the contents of the job's stdout file (stderr too, unless -e was given)
    exit_code: int  # the batch script's exit status; -N if killed by signal N
    state: str  # COMPLETED, FAILED, TIMEOUT, CANCELLED, ...


class Slurm:
    """A Slurm cluster of ``nodes`` (each a ``slurmd`` on this machine) under
    ``workdir``. ``start()``, ``env()`` for the clients, ``sbatch()``, ``stop()``."""

    def __init__(self, workdir: Path, nodes=("n1", "n2"), cpus: int = 2):
        self.workdir = Path(workdir)
        self.nodes = tuple(nodes)
        self.cpus = cpus
        self.cluster = f"t{uuid.uuid4().hex[:10]}"  # unique per instance (xdist workers)
        # slurmstepd and munged make Unix sockets under these directories, and a
        # socket path has at most 107 bytes: keep the tree short.
        self._own_root = len(str(self.workdir)) > 60
        self.root = (
            Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp")) if self._own_root else self.workdir
        )
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.munge_dir: Path | None = None  # made by start()
        self.ctld_port = 0
        self.node_ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._started = False
        self._stopped = False

    # -- paths and environment --------------------------------------------------

    @property
    def munge_socket(self) -> Path:
        assert self.munge_dir is not None, "start() first"
        return self.munge_dir / "socket"

    def node_local(self, node: str) -> Path:
        """The node's own "local disk" directory (``$NODE_LOCAL_DIR`` in its tasks)."""
        return self.root / "nodes" / node

    def env(self, **extra) -> dict[str, str]:
        """The environment for sbatch, srun, squeue, scontrol... against this cluster:
        this process's, less any SLURM_*/SBATCH_*/... variables, plus ``SLURM_CONF``
        and ``NODE_LOCAL_BASE``, plus ``extra``."""
        env = {k: v for k, v in os.environ.items() if not _CLIENT_ENV.match(k)}
        env["SLURM_CONF"] = str(self.conf)
        env["NODE_LOCAL_BASE"] = str(self.root / "nodes")
        path = env.get("PATH", os.defpath).split(":")
        for d in ("/usr/sbin", "/sbin"):
            if d not in path:
                path.append(d)
        env["PATH"] = ":".join(path)
        env.update(extra)
        return env

    def run(self, *argv, check: bool = True, timeout: float = 30, **kw):
        """Run a client command (``"sinfo", "-N"``) against this cluster."""
        kw.setdefault("env", self.env())
        out = subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, argv))} failed ({out.returncode}):\n{out.stdout}{out.stderr}"
            )
        return out

    # -- start and stop ---------------------------------------------------------

    def start(self, timeout: float = 30.0, attempts: int = 3) -> None:
        """Start munged, slurmctld and the slurmds, and wait until every node is
        idle. A port taken between choosing and binding it means a new try with
        other ports; any other failure raises with the tail of the daemons' logs."""
        if self._started:
            raise RuntimeError("this cluster was started already")
        self._started = True
        atexit.register(self.stop)
        # munged wants every directory above its socket searchable by all
        # (pytest's temporary directories are 0700): the socket lives apart.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="slurm-munge-", dir="/tmp"))
        self.munge_dir.chmod(0o755)
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout)
                return
            except RuntimeError as e:
                report = f"{e}\n{self.diagnostics()}"
                self._kill_all()
                self._procs.clear()
                if attempt < attempts and "Address already in use" in report:
                    # Start afresh, keeping this try's logs aside.
                    self.logs.rename(self.root / f"log.try{attempt}")
                    for d in ("state", "spool"):
                        shutil.rmtree(self.root / d, ignore_errors=True)
                    self.munge_socket.unlink(missing_ok=True)
                    continue
                raise RuntimeError(f"the Slurm cluster did not start: {report}") from None

    def _start_once(self, timeout: float) -> None:
        ports = free_ports(1 + len(self.nodes))
        self.ctld_port = ports[0]
        self.node_ports = dict(zip(self.nodes, ports[1:]))
        for d in ("state", "spool", "log", "jobs", "nodes"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
            self.node_local(node).mkdir(exist_ok=True)
        munge_dir = self.munge_dir
        key = munge_dir / "key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(128))  # what `mungekey --create` writes: 1024 random bits
        prolog = self.root / "task_prolog.sh"
        prolog.write_text(
            "#!/bin/sh\n"
            "# Runs before every task; 'export NAME=VALUE' lines go into the task's environment.\n"
            f'd="{self.root}/nodes/$SLURMD_NODENAME"\n'
            'mkdir -p "$d" && echo "export NODE_LOCAL_DIR=$d"\n'
        )
        prolog.chmod(0o755)
        self.conf.write_text(self._config(prolog))

        self._spawn(
            "munged",
            which("munged"),
            "--foreground",
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={munge_dir / 'munged.pid'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
            f"--log-file={self.logs / 'munged.log'}",
        )
        self._wait(lambda: self.munge_socket.exists(), 10, "munged's socket")
        self._spawn("slurmctld", which("slurmctld"), "-D", "-i")
        for node in self.nodes:
            self._spawn(f"slurmd.{node}", which("slurmd"), "-D", "-N", node)
        self._wait(self._all_idle, timeout, f"nodes {', '.join(self.nodes)} idle")

    def _config(self, prolog: Path) -> str:
        r = self.root
        lines = [
            f"ClusterName={self.cluster}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            # Bind slurmctld and the slurmds to their addresses (127.0.0.1), not to all.
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MailProg=/bin/true",
            # Whatever the hardware says, the nodes are what this file says.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            # Batch jobs start at the scheduler's next 1 s tick, not up to 3 s later.
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job`
            "KillWait=2",  # seconds between SIGTERM and SIGKILL for cancelled/timed-out jobs
            "InactiveLimit=0",
            f"StateSaveLocation={r}/state",
            f"SlurmctldPidFile={r}/state/slurmctld.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            # %n is the node's name: one spool directory, pid file and log per slurmd.
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmdPidFile={r}/spool/%n/slurmd.pid",
            f"SlurmdLogFile={r}/log/slurmd.%n.log",
            f"TaskProlog={prolog}",
        ]
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1"
                f" Port={self.node_ports[node]} CPUs={self.cpus} RealMemory=1024 State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES"
            " MaxTime=INFINITE State=UP"
        )
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, *argv) -> None:
        with open(self.logs / f"{name}.out", "wb") as out:
            self._procs[name] = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.root,
                start_new_session=True,
            )

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} before {what}")
            if condition():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {timeout} s")
            time.sleep(0.05)

    def states(self) -> dict[str, str]:
        """Each node's state as sinfo tells it (``idle``, ``alloc``, ``down*``...)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
        if out.returncode != 0:
            return {}
        return dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())

    def _all_idle(self) -> bool:
        states = self.states()
        return all(states.get(node) == "idle" for node in self.nodes)

    def diagnostics(self, lines: int = 30) -> str:
        """The tail of every daemon's log and output, for failure messages."""
        parts = []
        for path in sorted(self.logs.glob("*")):
            text = tail(path, lines)
            if text.strip():
                parts.append(f"--- {path.name} (last {lines} lines)\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        """``scontrol shutdown``, then kill what is left of this cluster (its
        daemons, and any slurmstepd or job process that has its SLURM_CONF), then
        munged. Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        if not self._started:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)
            return
        slurm_procs = {n: p for n, p in self._procs.items() if n != "munged"}
        if any(p.poll() is None for p in slurm_procs.values()):
            try:
                self.run("scontrol", "shutdown", check=False, timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        for proc in slurm_procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_all()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_all(self) -> None:
        for pid in self._strays():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name, proc in self._procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if name == "munged" else signal.SIGKILL)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _strays(self) -> list[int]:
        """Processes other than the daemons whose environment names this
        cluster's slurm.conf: slurmstepd and the jobs' processes."""
        mine = f"SLURM_CONF={self.conf}".encode()
        spared = {os.getpid(), os.getppid()} | {p.pid for p in self._procs.values()}
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in spared:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mine in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
        return pids

    # -- jobs -------------------------------------------------------------------

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` of one job as a dict (``JobState``, ``ExitCode``,
        ``StdOut``, ``NodeList``...). Slurm 22.05's scontrol has no ``--json``."""
        out = self.run("scontrol", "show", "job", "-o", job_id, timeout=10)
        # One line of Key=Value pairs; a value may hold spaces (paths), so split
        # before each " Key=" rather than at every space.
        fields = re.split(r" (?=[A-Za-z][A-Za-z0-9_:/]*=)", out.stdout.strip())
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def sbatch(self, script, *args, timeout: float = 60.0, env: dict | None = None) -> SlurmJob:
        """Submit ``script`` (with sbatch options ``args``), wait until the job has
        finished (``timeout`` seconds at most, then it is cancelled and this
        raises TimeoutError) and return its id, stdout, exit code and state.
        Its stdout goes to ``<root>/jobs/slurm-<id>.out`` unless ``args`` say
        otherwise (``-o``/``--output``)."""
        opts = [str(a) for a in args]
        if not any(a in ("-o", "--output") or a.startswith("--output=") for a in opts):
            opts = ["--output", str(self.root / "jobs" / "slurm-%j.out"), *opts]
        out = self.run("sbatch", "--parsable", *opts, script, env=env or self.env(), timeout=30)
        job_id = int(out.stdout.strip().split(";")[0])
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state = info["JobState"]
            if state in DONE:
                break
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout} s: {info}\n{self.diagnostics()}"
                )
            time.sleep(0.1)
        # ExitCode=status:signal, the batch script's exit status or the signal that killed it.
        status, sig = (int(x) for x in info["ExitCode"].split(":"))
        stdout = Path(info["StdOut"])
        output = stdout.read_text(errors="replace") if stdout.exists() else ""
        return SlurmJob(job_id, output, -sig if sig else status, state)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running two-node Slurm cluster (nodes n1 and n2) for this test session
    (for each pytest-xdist worker, its own), stopped at the end."""
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"Slurm is not installed (no {', '.join(missing)}): apt-get install -y -qq"
            " --no-install-recommends slurmd slurmctld slurm-client munge"
        )
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its slurmd as root (SlurmdUser=root)")
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
