"""RADICAL-Pilot: run tasks in a crate on pilots whose nodes have no envcrate.

Importable without RADICAL-Pilot: every function returns plain values to put
in RP's descriptions. The story, with ``boot`` a script from
``envcrate bootstrap`` (:func:`envcrate.bootstrap.bootstrap`)::

    import envcrate.integrations.radical as ecr
    pilot.stage_in(ecr.staging(boot))              # once per resource sandbox
    td = rp.TaskDescription({"executable": "python", "arguments": ["sim.py"],
                             "pre_exec": ecr.pre_exec(boot)})
    pilot.prepare_env("md", ecr.named_env(boot))   # or: a named env for many tasks

What RP does that this works around (seen with radical.pilot 1.103 and its
tests, tests/cluster/):

- Each ``pre_exec`` line runs as ``LINE || rp_error pre_exec``: only the
  line's last command counts, and ``eval "$(cmd)"`` hides a failing ``cmd``.
  So the script is sourced (``. FILE``), whose status is the activation's.
- A task's PATH is the login shell's, not the client's, and the pilot's own
  ``VIRTUAL_ENV`` and ``PYTHONPATH`` leak into tasks. Sourcing the script
  sets PATH and ``VIRTUAL_ENV`` (or ``CONDA_PREFIX``) and unsets
  ``PYTHONPATH``; its cold path runs Python with ``-E``.
- A ``prepare_env`` of type ``shell`` wraps each line in double quotes and
  splits it shell-style: the lines here hold no double quotes. Such an env
  is a snapshot of the variables the lines export: the lease taken while
  it is prepared ends with that shell, so ``envcrate gc`` by the cache's
  owner could remove the entry while tasks use it (give tasks
  :func:`pre_exec` as well to hold one each; a warm one costs milliseconds).
- ``pilot.stage_in`` copies on every call: :func:`staging` names the
  script by the crate, and :func:`stage_once` skips a copy the resource
  sandbox (when this host sees it) already holds.
"""

import os
from pathlib import Path

SANDBOX_DIR = "envcrate"  # in the pilot's resource:// sandbox


def _target(name: str) -> str:
    return f"resource:///{SANDBOX_DIR}/{name}"


def _in_sandbox(name: str) -> str:
    return f"$RP_RESOURCE_SANDBOX/{SANDBOX_DIR}/{name}"


def staging(script, archives=()) -> "list[dict]":
    """``pilot.stage_in`` directives that put the bootstrap script (and the
    crate's archives, for a node that cannot reach the store: ``envcrate
    bootstrap --stage`` writes them beside the script) into the resource
    sandbox, where every session of the pilot's resource finds them."""
    paths = [Path(script), *map(Path, archives)]
    return [
        {"source": str(p.resolve()), "target": _target(p.name), "action": "Transfer"} for p in paths
    ]


def stage_once(pilot, script, archives=()) -> "list[str]":
    """Stage what :func:`staging` names unless the resource sandbox already
    has a file of that name and size (on a resource this host can see, as
    ``local.localhost`` or a shared filesystem); the targets staged."""
    sandbox = _local_path(getattr(pilot, "resource_sandbox", None))
    todo = []
    for sd in staging(script, archives):
        there = sandbox and os.path.join(sandbox, sd["target"][len("resource:///") :])
        if there and os.path.isfile(there):
            if os.path.getsize(there) == os.path.getsize(sd["source"]):
                continue
        todo.append(sd)
    targets = [sd["target"] for sd in todo]
    if todo:
        pilot.stage_in(todo)  # which expands the targets it is given, in place
    return targets


def _local_path(url) -> "str | None":
    if url is None:
        return None
    text = str(url)
    for prefix in ("file://localhost", "file://"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text if text.startswith("/") else None


def pre_exec(script) -> "list[str]":
    """A task's ``pre_exec``: activate the crate from the staged script (its
    staged archives found beside it). A failure fails the task (RP's
    ``pre_exec failed``), with envcrate's one line in its stderr."""
    name = Path(script).name
    return [
        f"export ENVCRATE_BOOT_DIR={_in_sandbox('')}".rstrip("/"),
        f". {_in_sandbox(name)}",
    ]


def named_env(script) -> dict:
    """A ``pilot.prepare_env(name, spec)`` spec of type ``shell``: the
    pilot fills the cache once while it prepares the env, and tasks with
    ``named_env=name`` start in it (see the module's note on leases)."""
    return {"type": "shell", "pre_exec": pre_exec(script)}
