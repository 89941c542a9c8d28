"""Small filesystem helpers shared by the packer and the unpacker."""

import errno
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


def read_file(path: str, nofollow: bool = False) -> "tuple[bytes, os.stat_result]":
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


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` at ``offset`` of file ``fd``; the byte count (less
    at the end of the file). ``os.preadv`` where there is one (3.7+), else a
    copy through ``os.pread``."""
    if _preadv is not None:
        return _preadv(fd, [view], offset)
    chunk = os.pread(fd, len(view), offset)
    view[: len(chunk)] = chunk
    return len(chunk)


_preadv = getattr(os, "preadv", None)


def copy_range(src: int, offset: int, count: int, dst: int) -> None:
    """Append ``count`` bytes of file ``src`` from ``offset`` to file ``dst``
    (at its position): in the kernel where the filesystem can, else through
    a buffer."""
    end = offset + count
    try:
        while offset < end:
            if not hasattr(os, "copy_file_range"):  # Python 3.6 and 3.7
                break
            n = os.copy_file_range(src, dst, end - offset, offset)  # novermin (checked)
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


def group_shared(root: "str | os.PathLike") -> bool:
    """Whether ``root`` is group-writable: a directory a project group shares."""
    try:
        return bool(os.stat(root).st_mode & 0o020)
    except OSError:
        return False


def make_dirs_under(
    root: "str | os.PathLike", path: "str | os.PathLike", sticky: bool = False
) -> None:
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


# Opening the cache's own files (locks, holder files, stamps, leases, partial
# downloads, index files): never through a symlink or onto a FIFO or device
# that another member of a shared cache planted under the name.
_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_REGULAR = 0o100000


def _regular(fd: int, path) -> "os.stat_result":
    """The stat of ``fd``, which must be a regular file (else it is closed)."""
    st = os.fstat(fd)
    if st.st_mode & 0o170000 != _REGULAR:
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (another member's?)", os.fspath(path))
    return st


def open_regular(path, flags: int = os.O_RDONLY, dir_fd: "int | None" = None) -> int:
    """Open an existing regular file: not through a symlink (``ELOOP``), not a
    FIFO or device (``EINVAL``, without blocking on a FIFO)."""
    fd = os.open(path, flags | _SAFE, dir_fd=dir_fd)
    _regular(fd, path)
    return fd


def open_dir(path, dir_fd: "int | None" = None) -> int:
    """A descriptor of directory ``path`` whose last component is no symlink."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def read_small(path, limit: int = 512, dir_fd: "int | None" = None) -> bytes:
    """The content of a small regular file of the cache (an index or tag
    record): at most ``limit`` bytes, else ``EFBIG``; through no symlink,
    never blocking on a FIFO."""
    fd = open_regular(path, dir_fd=dir_fd)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
    return data


def read_bounded(path, limit: int) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (else
    ``EFBIG``), read in pieces; through no symlink, never blocking on a FIFO."""
    fd = open_regular(path)
    try:
        chunks, got = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if got > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def create_file(
    path: str,
    mode: int,
    flags: int = os.O_WRONLY,
    truncate: bool = False,
    dir_fd: "int | None" = None,
) -> int:
    """Open the regular file ``path``, created with exactly ``mode`` if missing
    (not through the umask, which would make a group-shared lock or stamp
    unusable by the next member (umask 022) or world-writable (umask 000)).
    Never through a symlink, never a FIFO or device: in a shared cache
    another member may have planted one under the name. An existing file is
    left as it is (its mode is its owner's); ``truncate`` empties it only if
    it is this process's own and has no other name. Returns the descriptor."""
    flags = (flags & ~os.O_TRUNC) | _SAFE
    for _ in range(10):
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode & 0o755, dir_fd=dir_fd)
        except FileExistsError:
            try:
                fd = os.open(path, flags, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # removed meanwhile: create it
            st = _regular(fd, path)
            try:
                if truncate and st.st_size and st.st_uid == os.geteuid() and st.st_nlink == 1:
                    os.ftruncate(fd, 0)
            except BaseException:
                os.close(fd)
                raise
            return fd
        try:  # just created, by this process: its mode is ours to set
            if os.fstat(fd).st_mode & 0o7777 != mode:
                os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise OSError(errno.EAGAIN, "created and removed again and again", os.fspath(path))


def make_temp(
    d: str, prefix: str, suffix: str, mode: int, dir_fd: "int | None" = None
) -> "tuple[int, str]":
    """A new file ``<prefix><random>.<suffix>`` in ``d`` (or ``dir_fd``) with
    exactly ``mode``, as :func:`tempfile.mkstemp` makes one (``O_EXCL``, 64
    random bits, no symlink followed) without importing :mod:`tempfile` on
    the path every waiting process runs. (descriptor, name)."""
    for _ in range(100):
        name = f"{prefix}{os.urandom(8).hex()}{suffix}"
        where = name if dir_fd is not None else os.path.join(d, name)
        try:
            fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd, where
    raise OSError(errno.EEXIST, "no free temporary name", d)


def shared_mode(root: str, private: int = 0o644) -> int:
    """``private`` with group write added in a group-shared cache: for the
    files every member must open for writing (locks, holder files, stamps)."""
    return private | 0o020 if group_shared(root) else private


def sha256_file(path: "str | os.PathLike") -> "tuple[str, int]":
    """The sha256 (hex) of a file's content and its size, read in 4 MiB pieces."""
    import hashlib

    h = hashlib.sha256()
    size = hash_file(path, h)
    return h.hexdigest(), size


def hash_file(path: "str | os.PathLike", digest) -> int:
    """Feed a file's content to ``digest`` (a hashlib object), read in 4 MiB
    pieces; its size."""
    size = 0
    with open(path, "rb") as f:
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        for n in iter(lambda: f.readinto(buf), 0):
            digest.update(view[:n])
            size += n
    return size


def remove_tree(path: "str | os.PathLike", attempts: int = 5) -> None:
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
    """``u+rwx`` on every directory of the tree that lacks it and is this
    process's (top down, so that each can then be listed). Each directory is
    opened without following a symlink and changed through that descriptor:
    a member who swaps a directory of the tree for a symlink (to a directory
    of the remover's) between the look and the change gets nothing changed."""
    me = os.geteuid()

    def writable(name: str, dir_fd: "int | None" = None) -> None:
        try:
            fd = os.open(
                name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError:
            return  # gone, or not a directory (a symlink is removed as a name)
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o700 != 0o700 and me in (0, st.st_uid):
                os.chmod(f"/proc/self/fd/{fd}", (st.st_mode & 0o7777) | 0o700)
        except OSError:
            pass
        finally:
            os.close(fd)

    writable(path)
    for _, dirnames, _, dir_fd in os.fwalk(path):
        for d in dirnames:
            writable(d, dir_fd)
