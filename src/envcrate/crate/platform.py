"""The platform a crate records and a host has: operating system, machine
and glibc (the manifest's ``platform``; :mod:`envcrate.node.compat` checks a
host against it)."""

import os
import sys

from ..errors import IncompatibleError


def host_platform() -> dict:
    u = os.uname()  # what platform.system() and platform.machine() return on POSIX
    return {"os": u.sysname.lower(), "machine": u.machine}


def host_glibc() -> "tuple[int, ...] | None":
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    name, _, version = text.partition(" ")
    if name != "glibc":
        return None
    return tuple(int(x) for x in version.split(".") if x.isdigit())


def libc_record(needs: "set[tuple[int, ...]]") -> dict:
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
