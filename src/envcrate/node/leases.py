"""Leases: which processes use an unpacked crate, so ``gc`` and ``rm`` leave
it alone (design.md, Cache); and the per-entry use lock that keeps ``gc``
from removing an entry between a process finding it and leasing it.

A lease is an empty file ``leases/<entry key>/<host>.<boot>.<pid>`` whose
mtime is its creation time. On its own host (same host name and boot id) it
lives while process ``pid`` runs and started no later than the lease was
made (a reused pid started later). From another host it is trusted until
``LEASE_TTL`` after its creation. ``activate`` has the evaluating shell create
its lease itself (its ``$$`` is known only there); until then a lease named
``<host>.<boot>.ttl-<pid>`` of its own covers the entry for ``SHORT_TTL``
seconds from its mtime, and the shell removes it.

The use lock ``locks/<key>.use`` (fcntl.lockf): a process that leases takes
it shared, creates its lease, checks the entry is still the ready one, and
lets go; ``gc``/``rm`` take it exclusive (without waiting: busy means in
use), look at the leases, rename the entry away and let go. So an entry is
never removed between a hit and its lease.

Plain strings (no pathlib): ``run`` and ``ensure --lease`` import this on
their warm path.
"""

import errno
import os
import time

LEASE_TTL = 3 * 24 * 3600  # seconds a lease from another host is trusted
SHORT_TTL = 60.0  # seconds an activate's own lease covers the entry, until the shell's exists
TTL_MARK = "ttl-"


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:12]
    except OSError:
        return "noboot"


def this_host() -> str:
    return os.uname().nodename.split(".")[0].replace("/", "_") or "host"


def lease_name(pid: "int | str") -> str:
    return f"{this_host()}.{boot_id()}.{pid}"


def lease_dir(cache: "str | os.PathLike", key: str) -> str:
    return os.path.join(os.fspath(cache), "leases", key)


def add(cache: "str | os.PathLike", key: str, pid: "int | str") -> str:
    """Create the lease of ``pid`` (or of a name such as ``ttl-<pid>``) on the
    entry ``key``; its path. Lease directories are group-writable in a shared
    cache (every member leases there); lease files ``0644``. The lease
    directory is opened without following a symlink (another member's, to a
    directory of ours, would get our lease file), the file created in it
    without following one either."""
    from ..fsutil import create_file, make_dirs_under, open_dir

    cache = os.fspath(cache)
    d = lease_dir(cache, key)
    if not os.path.isdir(d):
        make_dirs_under(cache, d)
    name = lease_name(pid)
    dfd = open_dir(d)
    try:
        fd = create_file(name, 0o644, os.O_WRONLY, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        os.utime(fd)  # an existing file (a pid reused since): made now
    except OSError:
        pass
    os.close(fd)
    return os.path.join(d, name)


def drop(path: "str | os.PathLike") -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already, or a shared cache we may not write


def _started(pid: int) -> "float | None":
    """The process's start time (Unix seconds), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def alive(path: "str | os.PathLike", now: "float | None" = None) -> bool:
    path = os.fspath(path)
    try:
        made = os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    return _alive(os.path.basename(path), made, now)


def _alive(name: str, made: float, now: "float | None" = None) -> bool:
    now = now or time.time()
    host, _, rest = name.partition(".")
    boot, _, pid = rest.partition(".")
    if pid.startswith(TTL_MARK):  # activate's own, until the shell's lease exists
        return now < made + SHORT_TTL
    if host == this_host() and boot == boot_id():
        if not pid.isdigit():
            return False
        started = _started(int(pid))
        return started is not None and started <= made + 2  # clock tick slack
    return now < made + LEASE_TTL


def is_lease_name(name: str) -> bool:
    """Whether ``name`` has the form of a lease: ``<host>.<boot>.<pid>`` or
    ``<host>.<boot>.ttl-<pid>`` (a host name without dots, a boot id of up
    to 12 hex digits or ``noboot``)."""
    parts = name.split(".")
    if len(parts) != 3 or not parts[0]:
        return False
    boot, pid = parts[1], parts[2]
    if boot != "noboot" and not (
        0 < len(boot) <= 12 and all(c in "0123456789abcdef" for c in boot)
    ):
        return False
    if pid.startswith(TTL_MARK):
        pid = pid[len(TTL_MARK) :]
    return pid.isdigit()


REMOVING = ".removing"  # in leases/<key>/ while gc or rm decides on the entry


def mark_removing(cache: "str | os.PathLike", key: str) -> None:
    """Say, in the lease directory, that the entry may be removed now (under
    its exclusive use lock, before the leases are looked at). A bootstrap
    script's warm path, which cannot take the use lock from sh, creates its
    lease and then looks for this name: there, it leaves the entry to the
    Python path, which takes the lock; not there, and the entry still ready,
    and its lease was seen (or the entry was gone before it looked)."""
    from ..fsutil import create_file, make_dirs_under, open_dir, shared_mode

    cache = os.fspath(cache)
    d = lease_dir(cache, key)
    try:
        if not os.path.isdir(d):
            make_dirs_under(cache, d)
        dfd = open_dir(d)
    except OSError:
        return  # no lease directory: no lease either (holders() is empty)
    try:
        os.close(create_file(REMOVING, shared_mode(cache), dir_fd=dfd))
    except OSError:
        pass  # a planted non-file under the name: it exists, which is all it says
    finally:
        os.close(dfd)


def unmark_removing(cache: "str | os.PathLike", key: str) -> None:
    try:
        os.unlink(os.path.join(lease_dir(cache, key), REMOVING))
    except OSError:
        pass


def holders(cache: "str | os.PathLike", key: str) -> "list[str]":
    """Names of the live leases on an entry (dead ones are removed). Only
    regular files named as leases count, and only those are removed; the
    lease directory is opened without following a symlink and every look
    and removal is relative to it, so a member who makes ``leases/<key>``
    a symlink to another's directory gets nothing removed there."""
    from ..fsutil import open_dir

    try:
        dfd = open_dir(lease_dir(cache, key))
    except OSError:
        return []
    live = []
    try:
        try:
            names = os.listdir(dfd)
        except OSError:
            return []
        now = time.time()
        for name in names:
            if not is_lease_name(name):
                continue
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                continue
            if st.st_mode & 0o170000 != 0o100000:
                continue  # not a lease envcrate made: neither counted nor removed
            if _alive(name, st.st_mtime, now):
                live.append(name)
            else:
                try:
                    os.unlink(name, dir_fd=dfd)
                except OSError:
                    pass  # gone already, or a shared cache we may not write
    finally:
        os.close(dfd)
    return sorted(live)


# ------------------------------------------------------------------- the use lock


def use_lock_path(cache: "str | os.PathLike", key: str) -> str:
    return os.path.join(os.fspath(cache), "locks", f"{key}.use")


class Busy(Exception):
    """The use lock is held by a process about to lease the entry."""


def lock_use(cache: "str | os.PathLike", key: str, exclusive: bool) -> "int | None":
    """Take the entry's use lock; its descriptor (give it to :func:`unlock`),
    or None where this process cannot have one (a cache it may not write:
    it cannot lease there either). Exclusive: without waiting, :class:`Busy`
    if it is held. The descriptor is checked to be the file now at the path
    (``gc`` removes old use locks), else the lock is taken again."""
    import fcntl

    from ..fsutil import create_file, make_dirs_under, open_regular, shared_mode

    cache = os.fspath(cache)
    path = use_lock_path(cache, key)
    for _ in range(10):
        try:
            if not os.path.isdir(os.path.join(cache, "locks")):
                make_dirs_under(cache, os.path.join(cache, "locks"), sticky=True)
            fd = create_file(path, shared_mode(cache), os.O_RDWR)
        except OSError:
            if exclusive:
                raise
            try:  # a shared lock needs only read access
                fd = open_regular(path)
            except OSError:
                return None
        try:
            if exclusive:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EACCES, errno.EAGAIN):
                        raise Busy from None
                    raise
            else:
                fcntl.lockf(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass  # removed meanwhile: take the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    return None


def unlock(fd: "int | None") -> None:
    if fd is not None:
        os.close(fd)  # closing releases the record lock
