"""Safe extraction of a crate read as one stream into an empty directory
(``tar.gz`` crates, and ``tar.zst`` ones without a seek table and index;
the others are extracted frame by frame, see :mod:`envcrate.crate.frames`), and
what both ways share: the metadata files and the links.

The file table was checked before (:func:`envcrate.crate.tree.check_table`: plain
relative paths, nothing below a link, links that stay inside). Every member
must then be the next row of the table as envcrate archives it (path, type,
mode, size, link target: :func:`check_member`), and every file's bytes must
hash to the row's sha256 (checked as they are written, before the caller
makes anything visible), so what lands on disk is exactly what the crate id
names. Hostile archives are refused: absolute paths and ``..`` (see
:func:`tar.safe_name`), member types other than file, directory and symlink
(devices, hard links, fifos), setuid/setgid/sticky bits. Files are created
with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and their final mode in one call, and
symlinks only after every regular file, each in a directory opened without
following links (:func:`make_links`), so no write can go through a link.
"""

import hashlib
import os
import stat
from collections.abc import Iterable
from typing import Callable

from ..errors import ArchiveError, DigestMismatchError, UnsafeArchiveError
from ..fsutil import write_all
from . import tar
from .manifest import FILES_MEMBER, MANIFEST_MEMBER, FileRow
from .reading import OpenedArchive

LARGE_FILE = 4 << 20
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_file(path: bytes, mode: int, flags: int = _FLAGS) -> int:
    """A new file's descriptor (``O_EXCL``, no link followed, unless
    ``flags`` say otherwise), its parent directories made if missing."""
    try:
        return os.open(path, flags, mode)
    except FileNotFoundError:
        # A parent the archive did not list, or one a writer has not made
        # yet; no links exist yet, so makedirs cannot be led astray.
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        return os.open(path, flags, mode)


def _write_file(path: bytes, data: bytes, mode: int = 0o644) -> None:
    fd = create_file(path, mode)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def make_dir(path: bytes) -> None:
    """A directory of the crate (or nothing, if another writer made it)."""
    try:
        os.mkdir(path, 0o755)
    except FileNotFoundError:  # a parent the archive did not list
        os.makedirs(path, 0o755, exist_ok=True)
    except FileExistsError:  # made already by another writer's makedirs
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise ArchiveError(
                f"archive member {os.fsdecode(path)} is listed as a directory and a file"
            ) from None


def content_mismatch(path: str) -> "DigestMismatchError":
    return DigestMismatchError(
        f"{path} in the archive does not match the crate's file table (content differs); "
        "the archive is corrupt or was tampered with: fetch it again"
    )


def _write_batch(
    batch: "list[tuple[bytes, int, list[memoryview] | None, str]]", held: "list"
) -> None:
    try:
        for path, mode, pieces, digest in batch:
            if pieces is None:
                make_dir(path)
                continue
            h = hashlib.sha256()
            fd = create_file(path, mode)
            try:
                for piece in pieces:
                    h.update(piece)
                    write_all(fd, piece)
            finally:
                os.close(fd)
            if h.hexdigest() != digest:
                raise content_mismatch(os.fsdecode(path))
    finally:
        for piece in held:
            piece.release()


class _Writers:
    """Creates and writes files on worker threads, in batches.

    Creating a file costs a syscall that releases the GIL; with the parsing
    on the calling thread and decompression on others, three writers keep
    both cores busier than two (2-6% faster on the reference crate).
    Directories go through the writers too (a mkdir can cost hundreds of
    microseconds); a writer that finds a file's directory missing
    because another writer has not made it yet makes it itself. Links are made
    only after :meth:`finish`. The reader's pieces that a batch's views lie
    in (:attr:`held`) are released once the batch is written. Plain threads
    and a bounded queue: ``concurrent.futures`` would cost unpacking more
    start-up time than it saves code.
    """

    BATCH_FILES = 64
    BATCH_BYTES = 2 << 20
    MAX_PENDING = 6

    def __init__(self, threads: int = 3):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(self.MAX_PENDING)
        self._error: BaseException | None = None
        self._batch: list = []
        self.held: list = []
        self._bytes = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"envcrate-write_{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        for job in iter(self._queue.get, None):
            batch, held = job
            if self._error is not None:  # failed or cancelled: only let go
                for piece in held:
                    piece.release()
                continue
            try:
                _write_batch(batch, held)
            except BaseException as e:
                self._error = e

    def add_dir(self, path: bytes) -> None:
        self._batch.append((path, 0o755, None, ""))
        if len(self._batch) >= self.BATCH_FILES:
            self._submit()

    def add(
        self, path: bytes, mode: int, pieces: "list[memoryview]", size: int, digest: str
    ) -> None:
        self._batch.append((path, mode, pieces, digest))
        self._bytes += size
        if len(self._batch) >= self.BATCH_FILES or self._bytes >= self.BATCH_BYTES:
            self._submit()

    def _submit(self) -> None:
        if self._error is not None:
            raise self._error
        if self._batch:
            self._queue.put((self._batch, self.held))
            self._batch, self.held, self._bytes = [], [], 0

    def _stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def finish(self) -> None:
        """Write what is left and wait for every batch (raising a writer's error)."""
        self._submit()
        self._stop()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the writers; batches not yet written are dropped."""
        if self._threads:
            self._error = self._error or ArchiveError("extraction was cancelled")
            self._stop()


_TYPES = {tar.REGULAR: "f", b"\0": "f", tar.DIRECTORY: "d", tar.SYMLINK: "l"}


def check_member(member: "tar.Member", row: "FileRow | None") -> str:
    """Refuse ``member`` unless it is ``row`` (the file table's next row) as
    envcrate archives it: same path, type, mode, size and link target. Its
    path as text."""
    path = member.name.decode("utf-8", "surrogateescape")
    if member.mode & 0o7000:
        raise UnsafeArchiveError(
            f"archive member {tar.printable(member.name)} has setuid/setgid/sticky bits; "
            "refusing to extract"
        )
    t = _TYPES.get(member.type)
    if t is None:
        raise UnsafeArchiveError(
            f"archive member {tar.printable(member.name)} has type {tar.printable(member.type)} "
            "(device, fifo or hard link); refusing to extract"
        )
    if row is None or row.path != path:
        raise ArchiveError(
            f"archive member {tar.printable(member.name)} is not the next entry of the crate's "
            "file table"
        )
    if (
        t != row.type
        or member.mode != int(row.mode, 8)
        or member.size != row.size
        or (t == "l" and member.linkname.decode("utf-8", "surrogateescape") != row.digest)
    ):
        raise ArchiveError(
            f"archive member {tar.printable(member.name)} does not match the crate's file table"
        )
    return path


def extract(
    opened: "OpenedArchive",
    rows: "Iterable[FileRow]",
    dest: str,
    progress: "Callable[[int], None] | None" = None,
    read_only: bool = False,
) -> None:
    """Extract the entries of ``opened`` into the existing empty ``dest``;
    ``rows``: its file table, checked already (:func:`envcrate.crate.tree.check_table`).
    ``read_only`` creates files without write bits (a cache entry: cheaper
    than a chmod of every file afterwards)."""
    progress = progress or (lambda n: None)
    root = os.fsencode(dest)
    write_head_files(root, opened.manifest_bytes, opened.table_bytes, read_only)

    stream = opened.stream
    links: list[tuple[bytes, bytes]] = []
    expected = iter(rows)
    writers = _Writers()
    try:
        for member in iter(stream.next_member, None):
            row = next(expected, None)
            path = check_member(member, row)
            name = member.name
            full = root + b"/" + name
            if row.type == "d":
                writers.add_dir(full)
            elif row.type == "f":
                mode = 0o755 if row.mode == "755" else 0o644
                if read_only:
                    mode &= ~0o222
                if member.size > LARGE_FILE:
                    # Written here as it streams in, so that the reader's
                    # buffers it spans are not all held at once.
                    h = hashlib.sha256()
                    fd = create_file(full, mode)
                    try:

                        def sink(view, fd=fd, h=h) -> None:
                            h.update(view)
                            write_all(fd, view)

                        stream.pipe(member.size, sink)
                    finally:
                        os.close(fd)
                    if h.hexdigest() != row.digest:
                        raise content_mismatch(path)
                else:
                    pieces: list[memoryview] = []
                    stream.take(member.size, pieces, writers.held)
                    writers.add(full, mode, pieces, member.size, row.digest)
                stream.skip(tar.padding(member.size))
                progress(member.size)
            else:
                links.append((name, member.linkname))
        writers.finish()
    finally:
        writers.close()
    if next(expected, None) is not None:
        raise ArchiveError(
            "the archive lacks entries listed in the crate's file table; it is truncated"
        )
    make_links(root, links)


def write_head_files(
    root: bytes, manifest_bytes: bytes, table_bytes: bytes, read_only: bool
) -> None:
    """The manifest and the file table, in ``root/.envcrate``."""
    os.mkdir(root + b"/" + MANIFEST_MEMBER.split("/")[0].encode(), 0o755)
    mode = 0o444 if read_only else 0o644
    _write_file(root + b"/" + MANIFEST_MEMBER.encode(), manifest_bytes, mode)
    _write_file(root + b"/" + FILES_MEMBER.encode(), table_bytes, mode)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_links(root: bytes, links: "list[tuple[bytes, bytes]]") -> None:
    """Make the symlinks (name, target) under ``root`` once every file is
    written, in table order. The table was checked (no link leaves ``root``,
    nothing lies below one), and each link is still made in its directory
    opened component by component without following links, so none can be
    made anywhere else."""
    if not links:
        return
    root_fd = os.open(root, _DIR_FLAGS)
    dirs: dict[bytes, int] = {b"": root_fd}
    try:
        for name, target in links:
            parent, _, leaf = name.rpartition(b"/")
            if parent not in dirs and len(dirs) > 64:  # links are sorted: the old ones are done
                for rel in [r for r in dirs if r]:
                    os.close(dirs.pop(rel))
            os.symlink(target, leaf, dir_fd=_open_dir(dirs, parent))
    except OSError as e:
        raise UnsafeArchiveError(
            f"link {os.fsdecode(name)} cannot be made inside the destination ({e.strerror}); "
            "refusing to extract"
        ) from None
    finally:
        for fd in dirs.values():
            os.close(fd)


def _open_dir(dirs: "dict[bytes, int]", rel: bytes) -> int:
    """A descriptor of directory ``rel`` below the root (``dirs[b""]``),
    opened and made if missing one component at a time, never through a
    link; kept in ``dirs``."""
    fd = dirs.get(rel)
    if fd is not None:
        return fd
    parent, _, leaf = rel.rpartition(b"/")
    up = _open_dir(dirs, parent)
    try:
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=up)
    except FileNotFoundError:
        os.mkdir(leaf, 0o755, dir_fd=up)
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=up)
    dirs[rel] = fd
    return fd
