"""Using an unpacked crate: the environment of a process that runs in it, as
shell code (``activate``) or for a command (``run``)."""

import json
import os
from pathlib import Path

SHELLS = ("sh", "bash", "zsh", "fish")
_UNSET = ("PYTHONHOME", "PYTHONPATH")
_SAVED = "_envcrate_before_"  # + a variable's name: its value before activate


class Activation:
    """What running in an env takes: variables to set and to unset, and (for
    conda envs) the ``etc/conda/activate.d`` scripts to source, by shell,
    and the ``deactivate.d`` scripts that undo them."""

    def __init__(
        self,
        set: "dict[str, str]",
        unset: "list[str]",
        scripts: "dict[str, list[str]] | None" = None,
        undo_scripts: "dict[str, list[str]] | None" = None,
    ) -> None:
        self.set = set
        self.unset = unset
        self.scripts = scripts or {}  # "sh"/"fish" -> paths
        self.undo_scripts = undo_scripts or {}


def environment(prefix: Path, kind: str, environ: "dict[str, str]") -> "Activation":
    """How to run in ``prefix``: its bin/ first on PATH, without the bin/ of an
    env that is active now (whether or not its ``deactivate`` exists). Conda
    envs also get CONDA_PREFIX, the variables of ``conda-meta/state`` and
    their activate.d scripts."""
    drop = {str(prefix / "bin")}
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        if environ.get(var):
            drop.add(os.path.join(environ[var], "bin"))
    path = [p for p in environ.get("PATH", "").split(os.pathsep) if p and p not in drop]
    new = {"PATH": os.pathsep.join([str(prefix / "bin"), *path])}
    unset = list(_UNSET)
    scripts: dict[str, list[str]] = {}
    undo: dict[str, list[str]] = {}
    if kind == "conda":
        new["CONDA_PREFIX"] = str(prefix)
        new["CONDA_DEFAULT_ENV"] = str(prefix)
        unset.append("VIRTUAL_ENV")
        new.update(_state_vars(prefix))
        scripts = _activate_scripts(prefix, "activate.d")
        undo = _activate_scripts(prefix, "deactivate.d")
    else:
        new["VIRTUAL_ENV"] = str(prefix)
    return Activation(new, [k for k in unset if k not in new], scripts, undo)


def _state_vars(prefix: Path) -> "dict[str, str]":
    """The variables ``conda env config vars set`` recorded in
    ``conda-meta/state``."""
    from ..fsutil import read_bounded

    try:  # a regular file of a sane size (a FIFO or /dev/zero there neither hangs nor floods)
        state = json.loads(read_bounded(prefix / "conda-meta" / "state", 1 << 20))
    except (OSError, ValueError, RecursionError):
        return {}
    env_vars = state.get("env_vars") if isinstance(state, dict) else None
    if not isinstance(env_vars, dict):
        return {}
    return {str(k): str(v) for k, v in env_vars.items() if _shell_name(str(k))}


_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def _shell_name(name: str) -> bool:
    """A name every shell takes for a variable (``str.isidentifier`` also
    allows non-ASCII letters, which would break the whole ``eval``)."""
    return bool(name) and _NAME_CHARS.issuperset(name) and not name[0].isdigit()


def _activate_scripts(prefix: Path, which: str) -> "dict[str, list[str]]":
    """``etc/conda/activate.d`` (or ``deactivate.d``) scripts, sorted as conda
    sources them."""
    d = prefix / "etc" / "conda" / which
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return {}
    out: dict[str, list[str]] = {}
    for name in names:
        kind = {".sh": "sh", ".fish": "fish"}.get(os.path.splitext(name)[1])
        if kind and (d / name).is_file():
            out.setdefault(kind, []).append(str(d / name))
    return out


def detect_shell(explicit: "str | None") -> str:
    if explicit:
        return explicit
    name = os.path.basename(os.environ.get("SHELL", "sh"))
    return name if name in SHELLS else "sh"


def _sq(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _fish_q(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shell_code(shell: str, act: "Activation", lease: "tuple[str, str, str | None]") -> str:
    """Code for ``eval``; the evaluating shell registers its own lease (its
    pid is known only there) under umask 022, then removes the short-lived
    lease ``activate`` held for it meanwhile (``lease`` is the lease
    directory, the name of a lease without its pid, and that short lease).
    It defines ``deactivate``, which undoes it; it replaces the
    ``deactivate`` of an env active before (deactivating then returns to
    that env's variables, without its function)."""
    new, unset = act.set, act.unset
    lease_dir, lease_stem, short = lease
    mine = os.path.join(lease_dir, lease_stem)
    if shell == "fish":
        lines = [
            f"if set -q {k}; set -g {_SAVED}{k} ${k}; else; set -e {_SAVED}{k}; end"
            for k in [*new, *unset]
        ]
        for k, v in new.items():
            if k == "PATH":
                parts = " ".join(_fish_q(p) for p in v.split(os.pathsep))
                lines.append(f"set -gx PATH {parts}")
            else:
                lines.append(f"set -gx {k} {_fish_q(v)}")
        lines += [f"set -e {k}" for k in unset]
        lines.append("functions -e deactivate 2>/dev/null")
        # A new file (`>?` fails on an existing name, symlinks included), in a
        # lease directory that is no symlink: see the sh version below.
        lines.append(
            "set -l __envcrate_umask (umask); umask 022; "
            f"mkdir -p {_fish_q(lease_dir)} 2>/dev/null; and test ! -L {_fish_q(lease_dir)}; "
            f"and rm -f {_fish_q(mine)}$fish_pid 2>/dev/null; "
            f"and true >?{_fish_q(mine)}$fish_pid 2>/dev/null; umask $__envcrate_umask"
        )
        if short:
            lines.append(f"rm -f {_fish_q(short)} 2>/dev/null")
        lines += [f"source {_fish_q(script)}" for script in act.scripts.get("fish", [])]
        lines += _fish_deactivate(act, mine)
        return "\n".join(lines) + "\n"
    # What ``deactivate`` gives back: each variable as this shell has it now.
    lines = [
        f'if [ -n "${{{k}+x}}" ]; then {_SAVED}{k}=${k}; else unset {_SAVED}{k}; fi'
        for k in [*new, *unset]
    ]
    lines += [f"{k}={_sq(v)}; export {k}" for k, v in new.items()]
    lines.append("unset " + " ".join(unset))
    lines.append("unset -f deactivate 2>/dev/null || true")
    # In a subshell, for its umask and variable; $$ is still the evaluating
    # shell's pid. In a shared cache the lease directory is group-writable: a
    # member may have put a symlink or FIFO there under our lease's name (or
    # made the directory a symlink), which `: >` would follow or block on,
    # even with `set -C` (noclobber opens an existing non-regular file). So:
    # no symlinked directory, and the lease made under a new name (mktemp)
    # and renamed onto its own (a rename opens nothing).
    lines.append(
        f"(umask 022 && mkdir -p {_sq(lease_dir)} && [ ! -h {_sq(lease_dir)} ] && "
        f't=$(mktemp {_sq(lease_dir)}/.lease.XXXXXXXX) && chmod 644 "$t" && '
        f'{{ mv -f "$t" {_sq(mine)}"$$" || {{ rm -f "$t"; false; }}; }}) 2>/dev/null'
    )
    if short:
        lines.append(f"rm -f {_sq(short)} 2>/dev/null")
    lines.append("hash -r 2>/dev/null || true")
    lines += [f". {_sq(script)}" for script in act.scripts.get("sh", [])]
    lines += _sh_deactivate(act, mine)
    return "\n".join(lines) + "\n"


PROFILE = ".envcrate/activate.sh"  # in an entry, for bootstrap scripts (node.fill writes it)


def profile_sh(prefix: str, kind: str, root: "str | None" = None) -> str:
    """What a bootstrap script's warm path sources from a ready entry
    (:data:`PROFILE`): :func:`shell_code` for sh, with two differences. The
    shell computes PATH itself (``prefix``/bin first, without the bin/ of
    the env active then), as :func:`environment` does in Python; and the
    lease is the script's (``deactivate`` removes the file named by
    ``$_envcrate_lease``, which the script sets after sourcing this).
    ``root``: where the env is now, if not yet at ``prefix`` (a fill)."""
    act = environment(Path(root or prefix), kind, {})
    if root and root != prefix:

        def moved(value: str) -> str:
            return prefix + value[len(root) :] if value.startswith(root) else value

        act.set = {k: moved(v) for k, v in act.set.items()}
        act.scripts = {k: [moved(p) for p in v] for k, v in act.scripts.items()}
        act.undo_scripts = {k: [moved(p) for p in v] for k, v in act.undo_scripts.items()}
    bin_dir = _sq(os.path.join(prefix, "bin"))
    del act.set["PATH"]
    # Split by hand, not by IFS: zsh does not split an unquoted $PATH.
    path_code = [
        '_envcrate_p=; _envcrate_r="${PATH:-}:"; while [ -n "$_envcrate_r" ]; do '
        '_envcrate_d=${_envcrate_r%%:*}; _envcrate_r=${_envcrate_r#*:}; case "$_envcrate_d" in '
        f'""|{bin_dir}|"${{VIRTUAL_ENV:-/-}}/bin"|"${{CONDA_PREFIX:-/-}}/bin") ;; '
        '*) _envcrate_p="$_envcrate_p:$_envcrate_d";; esac; done',
        f"PATH={bin_dir}$_envcrate_p; export PATH; unset _envcrate_p _envcrate_d _envcrate_r",
    ]
    lines = [
        f'if [ -n "${{{k}+x}}" ]; then {_SAVED}{k}=${k}; else unset {_SAVED}{k}; fi'
        for k in ["PATH", *act.set, *act.unset]
    ]
    lines += path_code
    lines += [f"{k}={_sq(v)}; export {k}" for k, v in act.set.items()]
    lines.append("unset " + " ".join(act.unset))
    lines.append("unset -f deactivate 2>/dev/null || true")
    lines.append("hash -r 2>/dev/null || true")
    lines += [f". {_sq(script)}" for script in act.scripts.get("sh", [])]
    act.set = {"PATH": "", **act.set}
    lines += _sh_deactivate(act, None)
    return "\n".join(lines) + "\n"


def _sh_deactivate(act: "Activation", mine: "str | None") -> "list[str]":
    """A ``deactivate`` function, as venv's and conda's: it sources the
    deactivate.d scripts, gives every variable activation touched the value
    it had before, releases the shell's lease and removes itself."""
    body = [f"    . {_sq(script)}" for script in act.undo_scripts.get("sh", [])]
    for k in [*act.set, *act.unset]:
        saved = f"{_SAVED}{k}"
        body.append(
            f'    if [ -n "${{{saved}+x}}" ]; then {k}=${saved}; export {k}; else unset {k}; fi; '
            f"unset {saved}"
        )
    if mine is None:  # a bootstrap script's lease
        body.append('    [ -z "${_envcrate_lease:-}" ] || rm -f "$_envcrate_lease" 2>/dev/null')
        body.append("    unset _envcrate_lease")
    else:
        body.append(f'    rm -f {_sq(mine)}"$$" 2>/dev/null')
    body += ["    unset -f deactivate", "    hash -r 2>/dev/null || true"]
    return ["deactivate() {", *body, "}"]


def _fish_deactivate(act: "Activation", mine: str) -> "list[str]":
    body = [f"    source {_fish_q(script)}" for script in act.undo_scripts.get("fish", [])]
    for k in [*act.set, *act.unset]:
        saved = f"{_SAVED}{k}"
        body.append(
            f"    if set -q {saved}; set -gx {k} ${saved}; else; set -e {k}; end; set -e {saved}"
        )
    body += [f"    rm -f {_fish_q(mine)}$fish_pid 2>/dev/null", "    functions -e deactivate"]
    return ["function deactivate", *body, "end"]


def exec_in(act: "Activation", argv: "list[str]") -> None:
    """Replace this process with ``argv`` running in the env: its exit status
    is the command's, and a lease on this pid lasts exactly as long. A conda
    env's activate.d scripts are sourced by ``/bin/sh``, which then execs
    the command (same pid)."""
    env = dict(os.environ)
    env.update(act.set)
    for k in act.unset:
        env.pop(k, None)
    scripts = act.scripts.get("sh")
    if scripts:
        code = "".join(f". {_sq(s)} || exit $?\n" for s in scripts) + 'exec "$@"\n'
        argv = ["/bin/sh", "-c", code, "sh", *argv]
    os.execvpe(argv[0], argv, env)
