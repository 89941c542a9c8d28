"""Which hosts and interpreters a crate can run on.

The check runs before anything is extracted: operating system, machine,
Python implementation, major.minor and ABI flags, and glibc (the host's must
be at least the highest ``GLIBC_x.y`` the env's ELF files reference).
"""

import json
import os
import re
import shutil
import stat
from typing import NamedTuple

from ..crate.platform import host_glibc, host_platform, require_supported_os
from ..errors import IncompatibleError


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


class Interpreter(NamedTuple):
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
    from .cache import user_cache

    return os.path.join(user_cache(), "pythons")


def probe(path: str, memo: "str | None" = None) -> "Interpreter | None":
    """What the interpreter at ``path`` is (by running it isolated, without
    ``site``: no ``.pth`` file near it runs), or None if it does not run.
    With ``memo`` (a directory), the answer is kept there and reused while
    the interpreter's file is unchanged: the cache's fillers skip starting
    a Python."""
    if memo is not None:
        return _memo_probe(path, memo)
    import subprocess

    try:
        out = subprocess.run(  # noqa: UP022 (capture_output and text are 3.7)
            [path, "-I", "-S", "-c", _PROBE],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,  # noqa: UP021
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        exe, impl, version, abiflags, base, base_exec = json.loads(out.stdout)
    except ValueError:
        return None
    return Interpreter(exe, impl, version, abiflags, base, base_exec)


def _memo_probe(path: str, memo: str) -> "Interpreter | None":
    """:func:`probe`, its answer kept in ``memo``: a directory of this user's
    own, made 0700; a memo is only believed when it and its directory are
    this user's and no one else may write them (else anyone who could
    would choose the interpreter a venv is pointed at)."""
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
    kept = _read_memo(memo, spot)
    if kept is not None and kept.get("sig") == sig:
        try:
            return Interpreter(*kept["it"])
        except (KeyError, TypeError):
            pass
    it = probe(path)
    if it is not None:
        _write_memo(memo, spot, {"sig": sig, "it": list(it)})
    return it


def _own_private(st: "os.stat_result") -> bool:
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _read_memo(memo: str, spot: str) -> "dict | None":
    try:
        if not _own_private(os.stat(memo)):
            return None
        fd = os.open(spot, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _own_private(st):
                return None
            data = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        kept = json.loads(data)
        return kept if isinstance(kept, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def _make_dirs(path: str) -> None:
    """``path`` and its missing parents, none of them writable by others
    whatever the umask (the memo's parent is the default cache)."""
    if os.path.isdir(path):
        return
    _make_dirs(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    from ..fsutil import current_umask

    os.chmod(path, 0o755 & ~current_umask())


def _write_memo(memo: str, spot: str, kept: dict) -> None:
    import tempfile

    try:
        _make_dirs(memo)
        os.chmod(memo, 0o700)  # whatever the umask made of it, or of an older one
        fd, tmp = tempfile.mkstemp(dir=memo, prefix=".memo-")  # 0600
    except OSError:  # a full disk, a read-only home: only a memo is lost
        return
    try:
        with open(fd, "w") as f:
            json.dump(kept, f)
        os.replace(tmp, spot)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def find_interpreter(
    python: dict, explicit: "str | None", hints: "list[str]", memo: "str | None" = None
) -> "Interpreter":
    """A base interpreter matching the crate's ``python`` record: ``explicit``
    (``--python``) if given, else the original paths in ``hints``, then
    ``python3.X``, ``python3`` and ``python`` on PATH."""
    impl = python.get("implementation", "cpython")
    want = ".".join(python.get("version", "").split(".")[:2])
    abiflags = python.get("abiflags", "")
    needed = describe(impl, want, abiflags)

    def fits(it: "Interpreter | None") -> bool:
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
            # The file that was checked, not a link to it: a link's own
            # directory could hold a pyvenv.cfg that makes it another Python.
            cand = os.path.realpath(cand)
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


def untrusted_interpreter(path: str) -> "str | None":
    """Why the interpreter a crate names (where it was built) is not run
    here, or None. A manifest is untrusted input, so only what looks like an
    installed interpreter is started (by its real path): an absolute path
    named like one, a regular executable ELF file (not a script), owned by
    root or this user and not writable by others, in directories of which
    the same holds up to the root (a world-writable one only if sticky)."""
    if not os.path.isabs(path) or not _INTERPRETER.fullmatch(os.path.basename(path)):
        return "not named like a Python interpreter"
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        with open(real, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return e.strerror or "unreadable"
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111 or magic != b"\x7fELF":
        return "not an executable ELF file"
    me = os.getuid()
    if st.st_uid not in (0, me):
        return f"it belongs to uid {st.st_uid}, not to root or you"
    if st.st_mode & 0o022:
        return "it is writable by others"
    d = os.path.dirname(real)
    while True:
        try:
            up = os.stat(d)
        except OSError as e:
            return e.strerror or "unreadable"
        if up.st_uid not in (0, me):
            return f"{d} belongs to uid {up.st_uid}, not to root or you"
        if up.st_mode & 0o002 and not up.st_mode & 0o1000:
            return f"{d} is writable by anyone"
        if d == os.path.dirname(d):
            return None
        d = os.path.dirname(d)
