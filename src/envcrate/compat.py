"""Which hosts and interpreters a crate can run on.

The check runs before anything is extracted: operating system, machine,
Python implementation, major.minor and ABI flags, and glibc (the host's must
be at least the highest ``GLIBC_x.y`` the env's ELF files reference).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass

from .errors import IncompatibleError


def host_platform() -> dict:
    u = os.uname()  # what platform.system() and platform.machine() return on POSIX
    return {"os": u.sysname.lower(), "machine": u.machine}


def host_glibc() -> tuple[int, ...] | None:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    name, _, version = text.partition(" ")
    if name != "glibc":
        return None
    return tuple(int(x) for x in version.split(".") if x.isdigit())


def libc_record(needs: set[tuple[int, ...]]) -> dict:
    """The manifest's libc field for the versions an env's binaries need."""
    if not needs:
        return {"family": "glibc" if host_glibc() else "unknown", "version": None}
    return {"family": "glibc", "version": ".".join(map(str, max(needs)))}


def require_supported_os() -> None:
    if not sys.platform.startswith("linux"):
        import platform

        raise IncompatibleError(
            f"envcrate supports Linux only for now; this is {platform.system()}"
        )


def check_host(manifest_platform: dict) -> None:
    require_supported_os()
    host = host_platform()
    if manifest_platform.get("os") != host["os"]:
        raise IncompatibleError(
            f"the crate was built for {manifest_platform.get('os')}, this host runs {host['os']}"
        )
    if manifest_platform.get("machine") != host["machine"]:
        raise IncompatibleError(
            f"the crate was built for {manifest_platform.get('machine')} machines, this host is {host['machine']}; "
            "pack the env on a machine of the target's kind"
        )
    libc = manifest_platform.get("libc") or {}
    needed = libc.get("version")
    if needed:
        have = host_glibc()
        want = tuple(int(x) for x in needed.split("."))
        if have is None:
            raise IncompatibleError(
                f"the crate needs glibc {needed} and this host has no glibc (musl?)"
            )
        if have < want:
            raise IncompatibleError(
                f"the crate's binaries need glibc {needed}, this host has glibc {'.'.join(map(str, have))}; "
                "build the env with packages for an older glibc (e.g. manylinux2014 wheels)"
            )


@dataclass(frozen=True)
class Interpreter:
    executable: str  # the base interpreter (never another venv's python)
    implementation: str
    version: str  # major.minor.micro
    abiflags: str
    base_prefix: str
    base_exec_prefix: str

    @property
    def major_minor(self) -> str:
        return ".".join(self.version.split(".")[:2])

    def describe(self) -> str:
        return describe(self.implementation, self.major_minor, self.abiflags)


def describe(implementation: str, version: str, abiflags: str) -> str:
    names = {"cpython": "CPython", "pypy": "PyPy"}
    return f"{names.get(implementation, implementation)} {version}{abiflags}"


_PROBE = (
    "import json, sys;"
    "exe = getattr(sys, '_base_executable', None) or sys.executable;"
    "print(json.dumps([exe, sys.implementation.name, '%d.%d.%d' % sys.version_info[:3],"
    "getattr(sys, 'abiflags', ''), sys.base_prefix, sys.base_exec_prefix]))"
)


def probe_memo() -> str:
    """Where interpreter probes are remembered: the user's cache directory,
    shared by unpack and all of this user's caches (an entry is keyed by the
    interpreter's path, device, inode, size and mtime)."""
    from platformdirs import user_cache_dir

    return os.path.join(user_cache_dir("envcrate", appauthor=False), "pythons")


def probe(path: str, memo: str | None = None) -> Interpreter | None:
    """What the interpreter at ``path`` is (by running it), or None if it
    does not run. With ``memo`` (a directory), the answer is kept there and
    reused while the interpreter's file is unchanged: the cache's fillers
    skip starting a Python."""
    if memo is not None:
        return _memo_probe(path, memo)
    import subprocess

    try:
        out = subprocess.run([path, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        exe, impl, version, abiflags, base, base_exec = json.loads(out.stdout)
    except ValueError:
        return None
    return Interpreter(exe, impl, version, abiflags, base, base_exec)


def _memo_probe(path: str, memo: str) -> Interpreter | None:
    import hashlib

    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    sig = [real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    spot = os.path.join(
        memo, hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    )
    try:
        with open(spot) as f:
            kept = json.load(f)
        if kept["sig"] == sig:
            return Interpreter(*kept["it"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    it = probe(path)
    if it is not None:
        tmp = f"{spot}.{os.getpid()}"
        try:
            os.makedirs(memo, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            with open(fd, "w") as f:
                json.dump({"sig": sig, "it": list(dataclasses.astuple(it))}, f)
            os.replace(tmp, spot)
        except OSError:  # a full disk, a read-only home: only a memo is lost
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return it


def find_interpreter(
    python: dict, explicit: str | None, hints: list[str], memo: str | None = None
) -> Interpreter:
    """A base interpreter matching the crate's ``python`` record: ``explicit``
    (``--python``) if given, else the original paths in ``hints``, then
    ``python3.X``, ``python3`` and ``python`` on PATH."""
    impl = python.get("implementation", "cpython")
    want = ".".join(python.get("version", "").split(".")[:2])
    abiflags = python.get("abiflags", "")
    needed = describe(impl, want, abiflags)

    def fits(it: Interpreter | None) -> bool:
        return (
            it is not None
            and it.implementation == impl
            and it.major_minor == want
            and it.abiflags == abiflags
        )

    if explicit:
        it = probe(explicit, memo)
        if it is None:
            raise IncompatibleError(
                f"--python {explicit} does not run; pass a working {needed} interpreter"
            )
        if not fits(it):
            raise IncompatibleError(
                f"--python {explicit} is {it.describe()}, the crate needs {needed}"
            )
        return it
    tried, passed = [], []
    candidates = [(h, True) for h in hints]
    for name in (f"python{want}{abiflags}", f"python{want}", "python3", "python"):
        found = shutil.which(name)
        if found:
            candidates.append((found, False))
    seen = set()
    for cand, hinted in candidates:
        if not cand or cand in seen or not os.path.exists(cand):
            continue
        seen.add(cand)
        if hinted:
            why = untrusted_interpreter(cand)
            if why:
                passed.append(f"{cand} ({why})")
                continue
        tried.append(cand)
        it = probe(cand, memo)
        if fits(it):
            return it
    raise IncompatibleError(
        f"the crate needs a {needed} interpreter and none was found"
        + (f" (tried {', '.join(tried)})" if tried else "")
        + (f"; not run: {', '.join(passed)}" if passed else "")
        + "; pass one with --python PATH"
    )


_INTERPRETER = re.compile(r"(python|pypy|\U0001d70bthon)(\d+(\.\d+)*)?[a-z]?")


def untrusted_interpreter(path: str) -> str | None:
    """Why the interpreter a crate names (where it was built) is not run
    here, or None. A manifest is untrusted input, so only what looks like an
    installed interpreter is started: an absolute path named like one, a
    regular executable ELF file (not a script), owned by root or this user
    and not writable by others, in a directory of which the same holds."""
    if not os.path.isabs(path) or not _INTERPRETER.fullmatch(os.path.basename(path)):
        return "not named like a Python interpreter"
    real = os.path.realpath(path)
    try:
        st, up = os.stat(real), os.stat(os.path.dirname(real))
        with open(real, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return e.strerror or "unreadable"
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111 or magic != b"\x7fELF":
        return "not an executable ELF file"
    me = os.getuid()
    for what, s in (("it", st), ("its directory", up)):
        if s.st_uid not in (0, me):
            return f"{what} belongs to uid {s.st_uid}, not to root or you"
        if s.st_mode & 0o002:
            return f"{what} is writable by anyone"
    return None
