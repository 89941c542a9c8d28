"""Pytest helpers: run real RADICAL-Pilot sessions with a local pilot.

RADICAL-Pilot (RP) lives in its own venv, ``.rp-venv`` in the checkout,
without envcrate, made once by the test command::

    python3 -m venv .rp-venv && .rp-venv/bin/pip install -q radical.pilot

The test process never imports RP: :func:`run_rp` writes a JSON spec, runs
``.rp-venv/bin/python tests/cluster/rp_client.py SPEC RESULT`` (see that
file for the spec and result formats) and returns the result as a dict.

What :func:`run_rp` does around the client:

- a clean environment: none of pytest's variables (PYTHONPATH, VIRTUAL_ENV,
  coverage, ...); PATH is the system one; HOME is an empty directory in the
  sandbox, because RP starts the pilot with ``bash -l``, which reads
  ``$HOME/.profile`` (root's here puts pyenv's shims, whose python3 has
  envcrate installed, first on PATH);
- offline for sure: when possible (root, ``unshare`` and ``ip`` present) the
  client runs in a new network namespace that has only loopback, so RP's
  bootstrap cannot reach the network (it would ``dig``/``ping`` an NTP host
  where those tools exist);
- a time limit, after which the client gets SIGTERM (it then closes the
  session), then its whole process tree SIGKILL; afterwards any process left
  with its working directory in the sandbox is ended too.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]
RP_VENV = Path(os.environ.get("ENVCRATE_RP_VENV") or ROOT / ".rp-venv")
RP_CLIENT = Path(__file__).resolve().with_name("rp_client.py")
SETUP_COMMAND = "python3 -m venv .rp-venv && .rp-venv/bin/pip install -q radical.pilot"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TIMEOUT = 240  # seconds the client may take to run a spec
CLOSE_MARGIN = 90  # more seconds for session close and cleanup

_counter = itertools.count()


class RPRunError(AssertionError):
    """The client failed: no session, pilot not active, timeout, RP error."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def _base_env(home: Path) -> dict:
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": str(home),
        "LANG": "C.UTF-8",
        # RP advertises ZMQ endpoints on this interface's address.
        "RADICAL_DEFAULT_IFACE": "lo",
    }
    for key in ("USER", "LOGNAME", "TZ"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


@functools.cache
def rp_python() -> tuple[Path | None, str | None]:
    """``(path, None)`` for RP's python, or ``(None, reason)`` to skip with.

    The venv must import radical.pilot and must not import envcrate.
    """
    py = RP_VENV / "bin" / "python"
    if not py.is_file():
        return None, (f"no RADICAL-Pilot venv at {RP_VENV}: run `{SETUP_COMMAND}` in {ROOT} once")
    probe = (
        "import importlib.util, radical.pilot as rp; "
        "print(rp.version, importlib.util.find_spec('envcrate') is not None)"
    )
    try:
        # Importing radical.utils creates $RADICAL_BASE/.radical (default
        # $HOME): keep it in a temporary directory.
        with tempfile.TemporaryDirectory(prefix="rp-probe-") as home:
            env = {**_base_env(Path(home)), "RADICAL_BASE": home}
            out = subprocess.run(
                [str(py), "-c", probe],
                capture_output=True,
                text=True,
                env=env,
                cwd=home,
                timeout=60,
            )
    except (OSError, subprocess.TimeoutExpired) as e:
        return (
            None,
            f"RADICAL-Pilot venv at {RP_VENV} does not run ({e}): recreate it with `{SETUP_COMMAND}`",
        )
    if out.returncode != 0:
        return None, (
            f"RADICAL-Pilot venv at {RP_VENV} cannot import radical.pilot "
            f"({out.stderr.strip().splitlines()[-1:]}): recreate it with `{SETUP_COMMAND}`"
        )
    if out.stdout.split()[-1] == "True":
        # Not a skip: the harness would silently test the wrong thing.
        pytest.fail(
            f"envcrate is importable in the RADICAL-Pilot venv {RP_VENV}: recreate it with `{SETUP_COMMAND}`"
        )
    return py, None


def require_rp() -> Path:
    """RP's python, or skip the calling test with the reason."""
    py, reason = rp_python()
    if py is None:
        pytest.skip(reason)
    return py


@functools.cache
def netns_prefix() -> tuple[str, ...]:
    """Command prefix running a command in a fresh network namespace.

    ``ENVCRATE_RP_NETNS=0`` turns it off, ``=1`` makes its absence an error;
    by default it is used where it works (as root with unshare and ip).
    """
    want = os.environ.get("ENVCRATE_RP_NETNS", "auto")
    if want == "0":
        return ()
    prefix = ("unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "rp-netns")
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        if want == "1":
            pytest.fail(
                "ENVCRATE_RP_NETNS=1 but `unshare --net` + `ip link set lo up` does not work here"
            )
        return ()
    return prefix


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kill(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _procs_in(directory: Path) -> list[int]:
    """Pids (not ours) whose working directory is inside ``directory``."""
    top = os.path.realpath(directory)
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{d}/cwd")
        except OSError:
            continue
        if cwd == top or cwd.startswith(top + os.sep):
            found.append(int(d))
    return found


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def run_rp(
    spec: dict,
    tmp_path: Path,
    *,
    env: dict | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> dict:
    """Run ``spec`` in one RP session; return the client's result dict.

    ``spec["sandbox"]`` defaults to ``tmp_path / "rp"``; give several runs
    the same sandbox to share the ``resource://`` sandbox between sessions.
    ``env`` adds to (``None`` values remove from) the clean environment that
    the client, and through the pilot every task, starts with.  ``timeout``
    (default ``spec["timeout"]``, else 240 s) bounds the run.  With
    ``check`` (default) a failed run raises :class:`RPRunError`.

    Added to the result: ``returncode``, ``client_stdout``, ``client_stderr``
    (tails), ``netns`` (ran without network), ``swept_by_harness`` (pids
    still working in the sandbox after the client, killed), ``wall``
    (seconds).
    """
    py = require_rp()
    tmp_path = Path(tmp_path)
    spec = dict(spec)
    spec.setdefault("sandbox", str(tmp_path / "rp"))
    timeout = float(timeout or spec.get("timeout") or DEFAULT_TIMEOUT)
    spec["timeout"] = timeout
    sandbox = Path(spec["sandbox"])
    home = sandbox / "home"
    home.mkdir(parents=True, exist_ok=True)

    n = next(_counter)
    tag = f"rp-{os.getpid()}-{n}"
    spec_file = tmp_path / f"{tag}.spec.json"
    result_file = tmp_path / f"{tag}.result.json"
    out_file = tmp_path / f"{tag}.stdout"
    err_file = tmp_path / f"{tag}.stderr"
    spec_file.write_text(json.dumps(spec, indent=1))

    cenv = _base_env(home)
    for k, v in (env or {}).items():
        if v is None:
            cenv.pop(k, None)
        else:
            cenv[k] = str(v)
    prefix = netns_prefix()
    cmd = [*prefix, str(py), str(RP_CLIENT), str(spec_file), str(result_file)]

    t0 = time.time()
    with open(out_file, "wb") as out, open(err_file, "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=cenv,
            cwd=str(tmp_path),
            start_new_session=True,
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout + CLOSE_MARGIN)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGTERM)  # the client closes its session
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(_tree(proc.pid))
                rc = proc.wait()
    swept = _procs_in(sandbox)
    _kill(swept)

    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError) as e:
        result = {"ok": False, "error": f"no result from rp_client ({e})", "tasks": []}
    if timed_out:
        result["ok"] = False
        result["error"] = (
            f"rp_client still running after {timeout + CLOSE_MARGIN:.0f}s; killed ({result.get('error')})"
        )
    result["returncode"] = rc
    result["client_stdout"] = _tail(out_file)
    result["client_stderr"] = _tail(err_file)
    result["netns"] = bool(prefix)
    result["swept_by_harness"] = swept
    result["wall"] = time.time() - t0

    if check and (rc != 0 or not result.get("ok")):
        raise RPRunError(describe_failure(result, spec_file), result)
    return result


def describe_failure(result: dict, spec_file: Path | None = None) -> str:
    lines = [f"RADICAL-Pilot run failed (rc={result.get('returncode')}): {result.get('error')}"]
    if spec_file:
        lines.append(f"spec: {spec_file}")
    sess = result.get("session") or {}
    if sess:
        lines.append(f"client sandbox: {sess.get('client_sandbox')}")
    pilot = result.get("pilot") or {}
    if pilot:
        lines.append(
            f"pilot {pilot.get('uid')}: {pilot.get('state')} in {pilot.get('pilot_sandbox')}"
        )
    if result.get("client_stderr"):
        lines.append("client stderr (tail):\n" + result["client_stderr"][-2000:])
    if pilot.get("bootstrap_out") and pilot.get("state") != "PMGR_ACTIVE":
        lines.append("bootstrap_0.out (tail):\n" + pilot["bootstrap_out"][-2000:])
    return "\n".join(lines)


def run_rp_once(
    key: str,
    make_spec: Callable[[Path], dict],
    tmp_path_factory: pytest.TempPathFactory,
    **kw,
) -> dict:
    """:func:`run_rp` once per test run, shared by all pytest-xdist workers.

    For module-scoped fixtures: under ``-n 2`` the tests of one module may be
    split over both workers, and each would start its own session.  Here the
    first worker runs it (``make_spec(directory)`` builds the spec, with its
    files in ``directory``) and the others wait for and reuse its result.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        d = tmp_path_factory.mktemp(key)
        return run_rp(make_spec(d), d, **kw)
    require_rp()
    # The parent of a worker's basetemp is shared by the workers of one run.
    d = tmp_path_factory.getbasetemp().parent / f"rp-once-{key}"
    d.mkdir(exist_ok=True)
    check = kw.pop("check", True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = d / "shared-result.json"
        if done.exists():
            result = json.loads(done.read_text())
        else:
            result = run_rp(make_spec(d), d, check=False, **kw)
            done.write_text(json.dumps(result))
    if check and (result.get("returncode") != 0 or not result.get("ok")):
        raise RPRunError(describe_failure(result), result)
    return result


def task(result: dict, name: str) -> dict:
    """The result entry of the task named ``name``."""
    found = [t for t in result.get("tasks", []) if t.get("name") == name]
    if len(found) != 1:
        names = [t.get("name") for t in result.get("tasks", [])]
        raise KeyError(f"{len(found)} tasks named {name!r} in {names}")
    return found[0]
