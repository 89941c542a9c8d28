"""Small filesystem helpers shared by the packer and the unpacker."""

from __future__ import annotations

import os


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_file(path: str, nofollow: bool = False) -> tuple[bytes, os.stat_result]:
    """The whole content of ``path`` and its stat, read until end of file
    (a single read may return short on network filesystems)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        chunks = []
        while True:
            chunk = os.read(fd, max(st.st_size, 1 << 16))
            if not chunk:
                return b"".join(chunks), st
            chunks.append(chunk)
    finally:
        os.close(fd)
