"""Safe extraction of a crate into an empty directory.

Every member must match the next row of the crate's file table (path, type,
size, mode, link target), so what lands on disk is exactly what the crate id
names. Hostile archives are refused: absolute paths and ``..`` (see
:func:`tar.safe_name`), member types other than file, directory and symlink
(devices, hard links, fifos), setuid/setgid/sticky bits, and links that leave
the destination. Files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and
their final mode in one call, and symlinks only after every regular file, so
no write can go through a link.
"""

from __future__ import annotations

import os
import posixpath
from typing import Callable

from . import tar
from .archive import OpenedArchive
from .errors import ArchiveError, UnsafeArchiveError
from .manifest import FILES_MEMBER, MANIFEST_MEMBER, FileRow

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_file(path: bytes, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, _FLAGS, mode)
    try:
        _write_all(fd, memoryview(data))
    finally:
        os.close(fd)


def _link_escapes(name: bytes, target: bytes) -> bool:
    if target.startswith(b"/"):
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    return resolved == b".." or resolved.startswith(b"../")


def extract(
    opened: OpenedArchive,
    rows: list[FileRow],
    dest: str,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Extract the entries of ``opened`` into the existing empty ``dest``."""
    progress = progress or (lambda n: None)
    root = os.fsencode(dest)
    meta = root + b"/" + MANIFEST_MEMBER.split("/")[0].encode()
    os.mkdir(meta, 0o755)
    _write_file(root + b"/" + MANIFEST_MEMBER.encode(), opened.manifest_bytes)
    _write_file(root + b"/" + FILES_MEMBER.encode(), opened.table_bytes)

    stream = opened.stream
    links: list[tuple[bytes, bytes]] = []
    expected = iter(rows)
    for member in iter(stream.next_member, None):
        row = next(expected, None)
        name = member.name
        path = name.decode("utf-8", "surrogateescape")
        if row is None or row.path != path:
            raise ArchiveError(
                f"archive member {path} is not the next entry of the crate's file table"
            )
        if member.mode & 0o7000:
            raise UnsafeArchiveError(
                f"archive member {path} has setuid/setgid/sticky bits; refusing to extract"
            )
        full = root + b"/" + name
        if member.type == tar.DIRECTORY:
            if row.type != "d":
                raise ArchiveError(
                    f"archive member {path} is a directory, the file table says {row.type}"
                )
            try:
                os.mkdir(full, 0o755)
            except FileNotFoundError:
                os.makedirs(full, 0o755)
        elif member.type in (tar.REGULAR, b"\0"):
            if row.type != "f" or row.size != member.size:
                raise ArchiveError(f"archive member {path} does not match the crate's file table")
            mode = 0o755 if row.mode == "755" else 0o644
            try:
                fd = os.open(full, _FLAGS, mode)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(full), 0o755, exist_ok=True)
                fd = os.open(full, _FLAGS, mode)
            try:
                stream.pipe(member.size, lambda v: _write_all(fd, v))  # noqa: B023 (called here)
            finally:
                os.close(fd)
            stream.skip(tar.padding(member.size))
            progress(member.size)
        elif member.type == tar.SYMLINK:
            target = member.linkname
            if row.type != "l" or row.digest != target.decode("utf-8", "surrogateescape"):
                raise ArchiveError(f"archive member {path} does not match the crate's file table")
            if _link_escapes(name, target):
                raise UnsafeArchiveError(
                    f"link {path} -> {row.digest} leaves the destination; refusing to extract"
                )
            links.append((full, target))
        else:
            raise UnsafeArchiveError(
                f"archive member {path} has type {member.type!r} (device, fifo or hard link); refusing to extract"
            )
    if next(expected, None) is not None:
        raise ArchiveError(
            "the archive lacks entries listed in the crate's file table; it is truncated"
        )
    for full, target in links:
        os.makedirs(os.path.dirname(full), 0o755, exist_ok=True)
        os.symlink(target, full)
    # Lexical checks cannot see chains of links (a -> ., b -> a/..): resolve for real.
    real_root = os.path.realpath(root)
    for full, _ in links:
        real = os.path.realpath(full)
        if real != real_root and not real.startswith(real_root + b"/"):
            name = full[len(root) + 1 :].decode("utf-8", "surrogateescape")
            raise UnsafeArchiveError(
                f"link {name} resolves outside the destination; refusing to extract"
            )
