"""Run one RADICAL-Pilot session with a local pilot, described by a JSON spec.

Usage: ``.rp-venv/bin/python tests/cluster/rp_client.py SPEC.json RESULT.json``

Standalone on purpose: it imports only the standard library and
``radical.pilot``, and runs in RP's own venv (``.rp-venv``), which does not
have envcrate.  The test process (tests/cluster/radical.py) writes the spec,
runs this script and reads the result.

Spec (JSON object; only "sandbox" is required)::

    {
      "sandbox": "/tmp/.../rp",   # everything RP writes lives under here: the
                                  # resource sandbox ("resource://") is
                                  # SANDBOX/radical.pilot.sandbox, reused by
                                  # every session given the same sandbox
      "cores": 2,                 # pilot cores
      "runtime_min": 10,          # pilot walltime, minutes
      "timeout": 120,             # seconds for session start .. last task
      "named_envs": [{"name": "e", "type": "shell", "pre_exec": ["..."]}],
      "named_env_errors": "fail", # or "record": see run() below
      "pilot_input_staging": [{"source": "/abs/file",
                               "target": "resource:///f",  # three slashes
                               "action": "Transfer",       # default
                               "if_missing": true}],       # harness extra
      "tasks": [{"executable": "/bin/echo", "arguments": ["hi"],
                 # or "script": "shell text", "shell": "/bin/sh"
                 "pre_exec": [], "named_env": "e", "input_staging": [],
                 "environment": {}, "name": "optional"}]
    }

Result (JSON object)::

    {"ok": bool, "error": str | None, "traceback": str (on error),
     "rp_version": "1.103.2",
     "session": {"uid", "client_sandbox", "resource_sandbox",
                 "session_sandbox"},
     "pilot": {"uid", "state", "pilot_sandbox", "staged", "staging_skipped",
               "bootstrap_out"},
     "named_envs": {NAME: {"ok", "error", "seconds"}},
     "tasks": [{"index", "uid", "name", "state", "exit_code", "stdout",
                "stderr", "sandbox", "exception", "exception_detail"}],
                # spec order; stdout/stderr: tails of the task sandbox's
                # <uid>.out / <uid>.err files
     "sandbox": "/abs/sandbox",
     "reaped": [pids of child processes left after close, then ended],
     "swept": ["pid cmdline" of processes left in the sandbox, then ended],
     "timings": {"session_start", "managers", "pilot_staging", "pilot_bootstrap",
                 "prepare_env", "tasks", "close", "total"}}  # seconds

Exit status: 0 when the session ran and every task reached a final state
(DONE or FAILED: a task's own failure is data, not an error), 1 on any error
(pilot not active, timeout, bad spec, RP exception; the message is on stderr
and in "error"), 2 on bad usage.  The session is always closed
(``session.close(download=False)``) and leftover child processes are ended.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

# This file sits next to tests/cluster/radical.py, which would shadow the
# `radical` namespace package: drop the script's directory from sys.path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

RESOURCE = "local.localhost"
DEFAULT_CORES = 2
DEFAULT_RUNTIME_MIN = 10
DEFAULT_TIMEOUT = 120.0
TAIL = 64 * 1024  # bytes kept of each stdout/stderr file


def _tail(path: str, limit: int = TAIL) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def _path(url) -> str | None:
    """A local path from an RP url (``file://localhost/x/y/``) or ``None``."""
    if url is None:
        return None
    s = str(url)
    for prefix in ("file://localhost", "file://"):
        if s.startswith(prefix):
            s = s[len(prefix) :]
            break
    return s.rstrip("/") or "/"


def _prepare_process_env(sandbox: str, client_dir: str) -> None:
    """Point RP's state, configs, logs and temp files into ``sandbox``.

    Must run before ``import radical.pilot``.  The pilot inherits this
    environment (it is started as ``/bin/bash -l bootstrap_0.sh``, so a login
    shell's profile then resets PATH), and so do the tasks.
    """
    # ~/.radical state (ids, counters) and user configs ($X/.radical/...).
    os.environ["RADICAL_BASE"] = sandbox
    os.environ["RADICAL_CONFIG_USER_DIR"] = sandbox
    # The client session dir (logs, profiles) goes to $RADICAL_PILOT_BASE,
    # which defaults to $PWD (the variable, not os.getcwd()).
    os.environ["RADICAL_PILOT_BASE"] = client_dir
    os.environ["RADICAL_PILOT_SESSION_BASE"] = client_dir
    os.environ["PWD"] = client_dir
    # tempfile (agent cfg, psij nodefile) and the agent's $TMPDIR/<sid>.
    tmp = os.path.join(sandbox, "tmp")
    os.makedirs(tmp, exist_ok=True)
    os.environ["TMPDIR"] = tmp
    # Advertise loopback addresses for RP's ZMQ endpoints.
    os.environ.setdefault("RADICAL_DEFAULT_IFACE", "lo")
    # No progress bars/banners on stderr; logs go to files in the session dir.
    os.environ["RADICAL_REPORT"] = "FALSE"
    os.environ.setdefault("RADICAL_LOG_LVL", "WARNING")
    # virtenv_mode "local" (the local.localhost default) makes the pilot
    # activate $VIRTUAL_ENV and use the RP installed there (rp_version
    # "installed"): no virtualenv creation, no pip.  Running
    # .rp-venv/bin/python directly does not set VIRTUAL_ENV, so set it:
    # without it RP falls back to virtenv_mode "none" and whatever python3
    # the login shell finds.
    os.environ["VIRTUAL_ENV"] = sys.prefix
    # RP starts its helpers (radical-pilot-bridge, -component, ...) by name.
    venv_bin = os.path.join(sys.prefix, "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    os.environ["PATH"] = os.pathsep.join([venv_bin] + path)


def _resource_path(resource_sandbox: str, target: str) -> str | None:
    """Local path of a ``resource://`` target, else ``None``."""
    if not isinstance(target, str) or not target.startswith("resource://"):
        return None
    return os.path.join(resource_sandbox, target[len("resource://") :].lstrip("/"))


def _load_spec(path: str) -> dict:
    with open(path) as f:
        spec = json.load(f)
    if not isinstance(spec, dict):
        raise ValueError("spec must be a JSON object")
    if not spec.get("sandbox"):
        raise ValueError("spec needs 'sandbox'")
    tasks = spec.get("tasks") or []
    if not isinstance(tasks, list):
        raise ValueError("'tasks' must be a list")
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not (t.get("executable") or t.get("script") is not None):
            raise ValueError("task %d needs 'executable' or 'script'" % i)
    for e in spec.get("named_envs") or []:
        if not e.get("name"):
            raise ValueError("named env needs 'name': %r" % (e,))
    return spec


def run(spec: dict, result: dict) -> None:
    t0 = time.time()
    timings = result["timings"]
    sandbox = result["sandbox"] = os.path.abspath(spec["sandbox"])
    client_dir = os.path.join(sandbox, "client")
    os.makedirs(client_dir, exist_ok=True)
    _prepare_process_env(sandbox, client_dir)
    os.chdir(client_dir)

    deadline = t0 + float(spec.get("timeout") or DEFAULT_TIMEOUT)

    def left(doing: str) -> float:
        rest = deadline - time.time()
        if rest <= 0:
            raise TimeoutError("timeout of %ss exceeded before %s" % (spec.get("timeout"), doing))
        return rest

    import radical.pilot as rp

    result["rp_version"] = rp.version
    session = rp.Session()
    result["session"] = {
        "uid": session.uid,
        "client_sandbox": os.path.join(client_dir, session.uid),
    }
    try:
        timings["session_start"] = time.time() - t0
        t_mgr = time.time()
        pmgr = rp.PilotManager(session=session)
        tmgr = rp.TaskManager(session=session)
        timings["managers"] = time.time() - t_mgr

        pd = rp.PilotDescription(
            {
                "resource": RESOURCE,
                "cores": int(spec.get("cores") or DEFAULT_CORES),
                "runtime": int(spec.get("runtime_min") or DEFAULT_RUNTIME_MIN),
                "sandbox": sandbox,
                "exit_on_error": True,
            }
        )
        t_pilot = time.time()
        pilot = pmgr.submit_pilots(pd)
        presult = result["pilot"] = {"uid": pilot.uid}
        rsbox = _path(pilot.resource_sandbox)
        result["session"]["resource_sandbox"] = rsbox
        result["session"]["session_sandbox"] = _path(pilot.session_sandbox)
        presult["pilot_sandbox"] = _path(pilot.pilot_sandbox)

        # Pilot staging: pilot.stage_in() expands resource:// (and pilot://,
        # session://) and copies synchronously, on the client side.  (The
        # description's input_staging does not: it tars dict targets as
        # literal paths, so "resource:///f" never lands in the resource
        # sandbox.)  "if_missing": true skips a directive whose resource://
        # target exists already, e.g. staged by an earlier session.
        t_stage = time.time()
        staged, skipped = [], []
        for sd in spec.get("pilot_input_staging") or []:
            sd = dict(sd)
            if_missing = sd.pop("if_missing", False)
            local = _resource_path(rsbox, sd.get("target"))
            if if_missing and local and os.path.exists(local):
                skipped.append(sd["target"])
                continue
            sd.setdefault("action", rp.TRANSFER)
            staged.extend(str(t) for t in pilot.stage_in([sd]))
        presult["staged"] = staged
        presult["staging_skipped"] = skipped
        # "stage_once": {"module": path of a standalone module with a
        # stage_once(pilot, script, archives) function (envcrate's RP
        # integration, loaded from its file: envcrate itself stays out of
        # this venv and so out of the tasks), "script", "archives",
        # "times"}: called that many times, the targets of each call kept.
        once = spec.get("stage_once")
        if once:
            import importlib.util

            loaded = importlib.util.spec_from_file_location("_stage_once", once["module"])
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
            presult["stage_once"] = [
                module.stage_once(pilot, once["script"], once.get("archives", []))
                for _ in range(int(once.get("times", 1)))
            ]
        timings["pilot_staging"] = time.time() - t_stage

        pilot.wait(state=[rp.PMGR_ACTIVE] + list(rp.FINAL), timeout=left("waiting for the pilot"))
        presult["state"] = pilot.state
        timings["pilot_bootstrap"] = time.time() - t_pilot
        if pilot.state != rp.PMGR_ACTIVE:
            if pilot.state in rp.FINAL:
                raise RuntimeError("pilot %s ended as %s" % (pilot.uid, pilot.state))
            raise TimeoutError(
                "pilot %s still %s after the timeout of %ss"
                % (pilot.uid, pilot.state, spec.get("timeout"))
            )

        # Named envs: pilot.prepare_env() blocks until the agent has run the
        # env's pre_exec (radical-pilot-create-static-ve) and raises if that
        # failed.  With "named_env_errors": "record" a failure is reported in
        # result["named_envs"] and the tasks that use the env are not
        # submitted (they would wait for it forever); the default "fail"
        # makes it an error of the run.
        t_env = time.time()
        failed_envs = {}
        for env in spec.get("named_envs") or []:
            env_spec = {k: v for k, v in env.items() if k != "name"}
            env_spec.setdefault("type", "shell")
            t1 = time.time()
            try:
                pilot.prepare_env(env["name"], env_spec)
                err = None
            except Exception as e:  # noqa: BLE001 - RP raises RuntimeError
                err = "%s: %s" % (type(e).__name__, e)
                if spec.get("named_env_errors", "fail") != "record":
                    raise RuntimeError("prepare_env %r failed: %s" % (env["name"], err)) from None
                failed_envs[env["name"]] = err
            result["named_envs"][env["name"]] = {
                "ok": err is None,
                "error": err,
                "seconds": time.time() - t1,
            }
        timings["prepare_env"] = time.time() - t_env
        left("submitting tasks")

        tmgr.add_pilots(pilot)
        tds = []
        script_dir = os.path.join(sandbox, "scripts", session.uid)
        for i, t in enumerate(spec.get("tasks") or []):
            td = rp.TaskDescription()
            if t.get("script") is not None:
                # RP puts arguments in double quotes into the task's exec
                # script, so $VAR, $(...) and `...` in them are expanded
                # there and a literal "$" cannot be passed: a script file
                # keeps shell text intact.
                os.makedirs(script_dir, exist_ok=True)
                script = os.path.join(script_dir, "task.%04d.sh" % i)
                with open(script, "w") as f:
                    f.write(t["script"])
                td.executable = t.get("shell") or "/bin/sh"
                td.arguments = [script]
            else:
                td.executable = t["executable"]
                td.arguments = [str(a) for a in t.get("arguments") or []]
            td.pre_exec = list(t.get("pre_exec") or [])
            if t.get("name"):
                td.name = t["name"]
            if t.get("named_env"):
                td.named_env = t["named_env"]
            if t.get("input_staging"):
                td.input_staging = list(t["input_staging"])
            if t.get("environment"):
                td.environment = {str(k): str(v) for k, v in t["environment"].items()}
            tds.append((i, t, td))

        t_tasks = time.time()
        to_submit = [td for _, t, td in tds if t.get("named_env") not in failed_envs]
        submitted = iter(tmgr.submit_tasks(to_submit) if to_submit else [])
        tasks = []
        for i, t, _ in tds:
            if t.get("named_env") in failed_envs:
                tasks.append((i, t, None))
            else:
                tasks.append((i, t, next(submitted)))
        uids = [task.uid for _, _, task in tasks if task is not None]
        if uids:
            tmgr.wait_tasks(uids=uids, timeout=left("waiting for tasks"))
        timings["tasks"] = time.time() - t_tasks

        for i, t, task in tasks:
            if task is None:
                result["tasks"].append(
                    {
                        "index": i,
                        "uid": None,
                        "name": t.get("name") or "",
                        "state": "NOT_SUBMITTED",
                        "exit_code": None,
                        "stdout": None,
                        "stderr": None,
                        "sandbox": None,
                        "exception": "named env %r failed" % t["named_env"],
                        "exception_detail": failed_envs[t["named_env"]],
                    }
                )
                continue
            sbox = _path(task.sandbox)
            result["tasks"].append(
                {
                    "index": i,
                    "uid": task.uid,
                    "name": task.name,
                    "state": task.state,
                    "exit_code": task.exit_code,
                    "stdout": _tail(os.path.join(sbox, task.uid + ".out")) if sbox else None,
                    "stderr": _tail(os.path.join(sbox, task.uid + ".err")) if sbox else None,
                    "sandbox": sbox,
                    "exception": task.exception,
                    "exception_detail": task.exception_detail,
                }
            )
        presult["state"] = pilot.state
        pending = [t["uid"] for t in result["tasks"] if t["uid"] and t["state"] not in rp.FINAL]
        if pending:
            raise TimeoutError("tasks not final after timeout: %s" % ", ".join(pending))
    finally:
        t_close = time.time()
        try:
            # NOTE: close() first stops the managers' components, then waits
            # 1 + 10 s for the pilot to report a final state; when the agent
            # was not quicker than that race, the wait runs out (close: ~4 s,
            # sometimes ~14 s).  Cancelling the pilot before close() avoids
            # that but costs ~7 s every time, so this does not.
            session.close(download=False)
        finally:
            timings["close"] = time.time() - t_close
            psbox = (result.get("pilot") or {}).get("pilot_sandbox")
            if psbox:
                # bootstrap_0.sh sends its stderr to bootstrap_0.out
                result["pilot"]["bootstrap_out"] = _tail(
                    os.path.join(psbox, "bootstrap_0.out"), 8192
                )


def _reap_children(grace: float = 3.0) -> list[int]:
    """Terminate whatever this process started and left running.

    session.close() normally stops RP's bridges, components and the pilot;
    this catches leftovers (a Session() that failed half-way, a hung close).
    Returns the pids that had to be ended.
    """
    try:
        import psutil  # a dependency of radical.utils
    except ImportError:
        return []
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    left = []
    for c in children:
        try:
            c.terminate()
            left.append(c)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace)
    for c in alive:
        try:
            c.kill()
        except psutil.Error:
            pass
    return [c.pid for c in left]


def _sweep_sandbox(sandbox: str, wait: float = 5.0, grace: float = 3.0) -> list[str]:
    """End processes still working in ``sandbox`` after the session closed.

    The pilot is not a child of this process (psij detaches it), and after a
    timeout its agent, its bootstrap_0.sh (which waits up to 5 s for profiles
    after the agent) and running tasks can outlive the client.  Give them
    ``wait`` seconds to go by themselves, then SIGTERM, then SIGKILL.
    Returns "pid cmdline" of those that had to be ended.
    """
    try:
        import psutil
    except ImportError:
        return []
    top = os.path.realpath(sandbox)
    me = os.getpid()

    def inside():
        found = []
        for p in psutil.process_iter():
            if p.pid == me:
                continue
            try:
                cwd = p.cwd()
            except psutil.Error:
                continue
            if cwd == top or cwd.startswith(top + os.sep):
                found.append(p)
        return found

    end = time.time() + wait
    procs = inside()
    while procs and time.time() < end:
        time.sleep(0.2)
        procs = inside()
    ended = []
    for p in procs:
        try:
            ended.append("%d %s" % (p.pid, " ".join(p.cmdline())[:200]))
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return ended


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: rp_client.py SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec_path, result_path = argv[1], os.path.abspath(argv[2])
    t0 = time.time()
    result: dict = {
        "ok": False,
        "error": None,
        "session": {},
        "pilot": {},
        "named_envs": {},
        "tasks": [],
        "timings": {},
    }
    code = 1

    def on_term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        spec = _load_spec(spec_path)
        run(spec, result)
        result["ok"] = True
        code = 0
    except BaseException as e:  # noqa: B902 - report everything, then fail
        result["error"] = "%s: %s" % (type(e).__name__, e)
        result["traceback"] = traceback.format_exc()
        print("rp_client: error: %s" % result["error"], file=sys.stderr)
        boot = (result.get("pilot") or {}).get("bootstrap_out")
        if boot and (result.get("pilot") or {}).get("state") != "PMGR_ACTIVE":
            print("rp_client: pilot bootstrap_0.out (tail):\n%s" % boot[-2000:], file=sys.stderr)
    result["reaped"] = _reap_children()
    if result.get("sandbox"):
        result["swept"] = _sweep_sandbox(result["sandbox"])
    result["timings"]["total"] = time.time() - t0
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    os.replace(tmp, result_path)
    return code


if __name__ == "__main__":
    rc = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # RP leaves non-daemon threads behind (ZMQ pollers, watchers) that can
    # keep the interpreter from exiting: the result is written, so leave.
    os._exit(rc)
