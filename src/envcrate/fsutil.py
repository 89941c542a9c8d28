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
    (a single read may return short on network filesystems). A read that
    returns exactly the size fstat gave, when one byte more was asked for,
    ended the file: no second read to see it end."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        chunks = []
        got = 0
        while True:
            # Exactly what fstat promises (plus one): a larger buffer would be
            # allocated and shrunk for every small file.
            chunk = os.read(fd, st.st_size + 1 if st.st_size else 1 << 16)
            if not chunk:
                return b"".join(chunks), st
            chunks.append(chunk)
            got += len(chunk)
            if got == st.st_size and len(chunks) == 1:
                return chunk, st
    finally:
        os.close(fd)


def write_all(fd: int, data) -> None:
    """Write all of ``data`` (bytes or a memoryview) to ``fd``; a write may
    take only part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_all_at(fd: int, data, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset`` (its position stays)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_range(src: int, offset: int, count: int, dst: int) -> None:
    """Append ``count`` bytes of file ``src`` from ``offset`` to file ``dst``
    (at its position): in the kernel where the filesystem can, else through
    a buffer."""
    end = offset + count
    try:
        while offset < end:
            n = os.copy_file_range(src, dst, end - offset, offset)
            if n == 0:
                raise OSError(f"{count} bytes to copy but the file ended")
            offset += n
        return
    except OSError as e:
        if e.errno is None:
            raise
    while offset < end:  # EXDEV, ENOSYS, EINVAL...: filesystems that cannot
        chunk = os.pread(src, min(end - offset, 4 << 20), offset)
        if not chunk:
            raise OSError(f"{count} bytes to copy but the file ended")
        write_all(dst, chunk)
        offset += len(chunk)


def group_shared(root: str | os.PathLike) -> bool:
    """Whether ``root`` is group-writable: a directory a project group shares."""
    try:
        return bool(os.stat(root).st_mode & 0o020)
    except OSError:
        return False


def make_dirs_under(root: str | os.PathLike, path: str | os.PathLike, sticky: bool = False) -> None:
    """Create ``path`` below ``root`` (and ``root`` itself if missing). Below a
    group-shared root every new directory is ``2775`` (``3775`` with
    ``sticky``: members may add entries but remove only their own): the
    group can write in it and inherits it (set-group-id); otherwise
    ``0755 & ~umask``. Modes are set explicitly, never through the umask
    alone, so nothing is world-writable even under umask 000. (Plain strings
    inside: the cache's cold path runs in every process that waits for a
    fill and does not import pathlib.)"""
    root, path = os.fspath(root), os.fspath(path)
    _make_dirs(root)
    shared = group_shared(root)
    missing = []
    d = path
    while d != root and not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            continue
        if shared:
            os.chmod(d, 0o3775 if sticky and d == path else 0o2775)
    if sticky and shared and not missing:  # made by an older envcrate: sticky now, if ours
        try:
            st = os.stat(path)
            if not st.st_mode & 0o1000 and st.st_uid == os.geteuid():
                os.chmod(path, (st.st_mode & 0o7777) | 0o1000)
        except OSError:
            pass


def _make_dirs(path: str) -> None:
    """``os.makedirs(path)``, each new directory ``0755 & ~umask`` (makedirs
    would give the parents ``0777 & ~umask``)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        _make_dirs(parent)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass


def create_file(path: str, mode: int, flags: int = os.O_WRONLY) -> int:
    """Open ``path`` (created if missing) and, when this process owns it,
    give it exactly ``mode``: not through the umask, which would make a
    group-shared lock or stamp unusable by the next member (umask 022) or
    world-writable (umask 000). Returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, mode & 0o755)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o7777 != mode and st.st_uid == os.geteuid():
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def shared_mode(root: str, private: int = 0o644) -> int:
    """``private`` with group write added in a group-shared cache: for the
    files every member must open for writing (locks, holder files, stamps)."""
    return private | 0o020 if group_shared(root) else private


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """The sha256 (hex) of a file's content and its size, read in 4 MiB pieces."""
    import hashlib

    h = hashlib.sha256()
    size = hash_file(path, h)
    return h.hexdigest(), size


def hash_file(path: str | os.PathLike, digest) -> int:
    """Feed a file's content to ``digest`` (a hashlib object), read in 4 MiB
    pieces; its size."""
    size = 0
    with open(path, "rb") as f:
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return size


def remove_tree(path: str | os.PathLike, attempts: int = 5) -> None:
    """Remove a directory tree, read-only ones included (its directories are
    made writable first, which needs its owner); a missing path is fine. A
    tree that is still being written (a killed filler's writers may not have
    died yet) is walked again, a few times, until it is empty."""
    import errno
    import shutil
    import time

    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    for attempt in range(attempts):
        try:
            _make_writable(path)
            shutil.rmtree(path)
            return
        except OSError as e:
            if not os.path.lexists(path):
                return
            retry = e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT)
            if not retry or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _make_writable(path: str) -> None:
    """``u+rwx`` on every directory of the tree that lacks it (top down, so
    that each can then be listed)."""
    import stat

    def writable(p: str) -> None:
        try:
            mode = os.lstat(p).st_mode
            if stat.S_ISDIR(mode) and mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(p, stat.S_IMODE(mode) | stat.S_IRWXU)
        except FileNotFoundError:
            pass

    writable(path)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            writable(os.path.join(dirpath, d))
