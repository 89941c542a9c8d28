"""Using an unpacked crate: the environment of a process that runs in it, as
shell code (``activate``) or for a command (``run``)."""

from __future__ import annotations

import os
from pathlib import Path

SHELLS = ("sh", "bash", "zsh", "fish")
_UNSET = ("PYTHONHOME", "PYTHONPATH")


def environment(
    prefix: Path, kind: str, environ: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """(variables to set, variables to unset) to run in ``prefix``: its bin/
    first on PATH, without the bin/ of an env that is active now (whether or
    not its ``deactivate`` exists)."""
    drop = {str(prefix / "bin")}
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        if environ.get(var):
            drop.add(os.path.join(environ[var], "bin"))
    path = [p for p in environ.get("PATH", "").split(os.pathsep) if p and p not in drop]
    new = {"PATH": os.pathsep.join([str(prefix / "bin"), *path])}
    unset = list(_UNSET)
    if kind == "conda":
        new["CONDA_PREFIX"] = str(prefix)
        unset.append("VIRTUAL_ENV")
    else:
        new["VIRTUAL_ENV"] = str(prefix)
    return new, unset


def detect_shell(explicit: str | None) -> str:
    if explicit:
        return explicit
    name = os.path.basename(os.environ.get("SHELL", "sh"))
    return name if name in SHELLS else "sh"


def _sq(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _fish_q(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shell_code(shell: str, new: dict[str, str], unset: list[str], lease: tuple[Path, str]) -> str:
    """Code for ``eval``; the evaluating shell registers its own lease (its
    pid is known only there)."""
    lease_dir, lease_stem = lease
    if shell == "fish":
        lines = []
        for k, v in new.items():
            if k == "PATH":
                parts = " ".join(_fish_q(p) for p in v.split(os.pathsep))
                lines.append(f"set -gx PATH {parts}")
            else:
                lines.append(f"set -gx {k} {_fish_q(v)}")
        lines += [f"set -e {k}" for k in unset]
        lines.append("functions -e deactivate 2>/dev/null")
        lines.append(
            f"mkdir -p {_fish_q(str(lease_dir))} 2>/dev/null; "
            f"and touch {_fish_q(str(lease_dir / lease_stem))}$fish_pid"
        )
        return "\n".join(lines) + "\n"
    lines = [f"{k}={_sq(v)}; export {k}" for k, v in new.items()]
    lines.append("unset " + " ".join(unset))
    lines.append("unset -f deactivate 2>/dev/null || true")
    lines.append(
        f'mkdir -p {_sq(str(lease_dir))} 2>/dev/null && : > {_sq(str(lease_dir / lease_stem))}"$$"'
    )
    lines.append("hash -r 2>/dev/null || true")
    return "\n".join(lines) + "\n"


def exec_in(new: dict[str, str], unset: list[str], argv: list[str]) -> None:
    """Replace this process with ``argv`` running in the env: its exit status
    is the command's, and a lease on this pid lasts exactly as long."""
    env = dict(os.environ)
    env.update(new)
    for k in unset:
        env.pop(k, None)
    os.execvpe(argv[0], argv, env)
