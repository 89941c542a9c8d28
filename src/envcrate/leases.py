"""Leases: which processes use an unpacked crate, so ``gc`` and ``rm`` leave
it alone (design.md, Cache).

A lease is an empty-or-JSON file ``leases/<entry key>/<host>.<boot>.<pid>``
whose mtime is its creation time. On its own host (same host name and boot
id) it lives while process ``pid`` runs and started no later than the lease
was made (a reused pid started later). From another host it is trusted until
``LEASE_TTL`` after its creation. ``activate`` has the evaluating shell create
its lease itself (its ``$$`` is known only there).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

LEASE_TTL = 3 * 24 * 3600  # seconds a lease from another host is trusted


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:12]
    except OSError:
        return "noboot"


def this_host() -> str:
    return os.uname().nodename.split(".")[0].replace("/", "_") or "host"


def lease_name(pid: int | str) -> str:
    return f"{this_host()}.{boot_id()}.{pid}"


def lease_dir(cache, key: str) -> Path:
    return Path(cache, "leases", key)


def add(cache: Path, key: str, pid: int) -> Path:
    d = lease_dir(cache, key)
    d.mkdir(parents=True, exist_ok=True)
    path = d / lease_name(pid)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    os.close(fd)
    return path


def drop(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already, or a shared cache we may not write


def _started(pid: int) -> float | None:
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


def alive(path: Path, now: float | None = None) -> bool:
    try:
        made = path.stat().st_mtime
    except FileNotFoundError:
        return False
    host, _, rest = path.name.partition(".")
    boot, _, pid = rest.partition(".")
    if host == this_host() and boot == boot_id():
        if not pid.isdigit():
            return False
        started = _started(int(pid))
        return started is not None and started <= made + 2  # clock tick slack
    return (now or time.time()) < made + LEASE_TTL


def holders(cache: Path, key: str) -> list[str]:
    """Names of the live leases on an entry (dead ones are removed)."""
    d = lease_dir(cache, key)
    try:
        names = os.listdir(d)
    except OSError:
        return []
    live = []
    for name in names:
        p = d / name
        if alive(p):
            live.append(name)
        else:
            drop(p)
    return sorted(live)
