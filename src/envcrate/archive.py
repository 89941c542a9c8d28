"""The crate archive: its format and the deterministic writer (the reader is
:mod:`envcrate.reading`).

Layout of a ``.tar.zst`` crate (a valid tar stream for stock tools)::

    frame 0          tar member .envcrate/manifest.json
    frames 1..k      tar member .envcrate/files.jsonl (the file table)
    frames k+1..n    the env's entries, sorted, cut into independent frames
                     of FRAME_SIZE bytes of tar stream (a file may span frames),
                     then the two zero blocks that end a tar archive
    skippable frame  envcrate index: per frame, (member, offset in member)
    skippable frame  zstd seek table (the "seekable" format)

``.tar.gz`` crates have the same members and the same cut, one gzip member
per frame, and no index. Frames are compressed independently by a thread pool
and written in order, so the output does not depend on the thread count.

The body is held back (in memory up to a limit, then in a temporary file)
because the manifest, which needs the crate id known only at the end, must
come first; each source file is read once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from . import tar
from .entry import Entry
from .errors import EnvcrateError
from .fsutil import read_file, unlink_quietly
from .manifest import FILES_MEMBER, MANIFEST_MEMBER, FileRow

FRAME_SIZE = 16 << 20
FORMATS = ("tar.zst", "tar.gz")
DEFAULT_LEVEL = {"tar.zst": None, "tar.gz": 6}
# The default zstd setting: level 3's window and match length with the "fast"
# strategy. On the reference venv it compresses with a third less CPU than
# level 3 for a 3% larger archive (bench/bench_pack_unpack.py); --level N
# selects zstd's standard level N instead.
_ZSTD_DEFAULT = dict(
    strategy=1, window_log=21, hash_log=17, chain_log=16, search_log=1, min_match=6, target_length=0
)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
_SEEK_TABLE_MAGIC = 0x184D2A5E
_INDEX_MAGIC = 0x184D2A5B
_SEEKABLE_FOOTER_MAGIC = 0x8F92EAB1


def format_of_name(name: str) -> str | None:
    for fmt in FORMATS:
        if name.endswith("." + fmt):
            return fmt
    return None


# --------------------------------------------------------------------------- writing


class _Codec:
    """Compresses one frame; one instance per worker thread."""

    def __init__(self, fmt: str, level: int | None):
        self.fmt = fmt
        self.level = level
        self._local = threading.local()

    def compress(self, data) -> bytes:
        if self.fmt == "tar.zst":
            c = getattr(self._local, "c", None)
            if c is None:
                import zstandard

                if self.level is None:
                    params = zstandard.ZstdCompressionParameters(
                        write_checksum=True, write_content_size=True, **_ZSTD_DEFAULT
                    )
                else:
                    params = zstandard.ZstdCompressionParameters.from_level(
                        self.level, write_checksum=True, write_content_size=True
                    )
                c = self._local.c = zstandard.ZstdCompressor(compression_params=params)
            return c.compress(data)
        co = zlib.compressobj(self.level, zlib.DEFLATED, 31)  # gzip wrapper, mtime 0
        return co.compress(data) + co.flush()


@dataclass
class _Frame:
    buf: bytearray
    used: int = 0
    hash_jobs: list = field(default_factory=list)  # (row index, start, end)
    start_member: tuple[int, int] = (0, 0)


@dataclass
class BodyResult:
    rows: list[FileRow]
    frames: list[tuple[int, int]]  # (compressed, decompressed) per body frame
    index: list[tuple[int, int]]  # (member, offset) per body frame
    size: int  # uncompressed bytes of archived files


def row_of(entry: Entry, size: int = 0, digest: str = "") -> FileRow:
    """The file-table row of an entry as archived (for a file: its archived
    size and content sha256). Packing and ``identify`` both use it, so they
    agree on the crate id."""
    target = entry.target if entry.type == "l" else digest
    return FileRow(entry.type, entry.path, "%o" % entry.mode, size, target)


class BodyWriter:
    """Writes the sorted entries as compressed frames to ``out``."""

    def __init__(
        self,
        out: BinaryIO,
        fmt: str,
        level: int | None,
        threads: int,
        scanner=None,
        progress: Callable[[int], None] | None = None,
        frame_size: int | None = None,
        first_member: int = 2,
    ):
        self.out = out
        self.codec = _Codec(fmt, level)
        self.threads = max(1, threads)
        self.scanner = scanner
        self.progress = progress or (lambda n: None)
        self.frame_size = frame_size or FRAME_SIZE
        self.member = first_member - 1
        self.member_pos = 0
        self.rows: list[FileRow] = []
        self.digests: list[str] = []
        self.frames: list[tuple[int, int]] = []
        self.index: list[tuple[int, int]] = []
        self.bytes = 0
        from concurrent.futures import ThreadPoolExecutor  # not imported for unpacking

        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="envcrate-zstd")
        # Anonymous memory rather than bytearray(): not zeroed under the GIL.
        self._free = [mmap.mmap(-1, self.frame_size) for _ in range(self.threads + 2)]
        self._pending: deque = deque()  # (frame, future)
        self._frame = self._new_frame()

    # -- frame plumbing

    def _new_frame(self) -> _Frame:
        if not self._free:
            self._drain(1)
        return _Frame(self._free.pop(), start_member=(self.member, self.member_pos))

    def _work(self, frame: _Frame) -> tuple[bytes, list[tuple[int, str]]]:
        view = memoryview(frame.buf)[: frame.used]
        hashes = [(i, hashlib.sha256(view[s:e]).hexdigest()) for i, s, e in frame.hash_jobs]
        return self.codec.compress(view), hashes

    def _flush(self) -> None:
        frame = self._frame
        if frame.used == 0:
            return
        self._pending.append((frame, self._pool.submit(self._work, frame)))
        if len(self._pending) > self.threads:
            self._drain(len(self._pending) - self.threads)
        self._frame = self._new_frame()

    def _drain(self, n: int) -> None:
        for _ in range(n):
            frame, fut = self._pending.popleft()
            data, hashes = fut.result()
            for i, digest in hashes:
                self.digests[i] = digest
            self.out.write(data)
            self.frames.append((len(data), frame.used))
            self.index.append(frame.start_member)
            frame.used = 0
            frame.hash_jobs = []
            self._free.append(frame.buf)

    def _put(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            frame = self._frame
            n = min(self.frame_size - frame.used, len(data) - pos)
            frame.buf[frame.used : frame.used + n] = data[pos : pos + n]
            frame.used += n
            pos += n
            self.member_pos += n
            if frame.used == self.frame_size:
                self._flush()

    def _begin_member(self) -> None:
        self.member += 1
        self.member_pos = 0
        if self._frame.used == 0:
            self._frame.start_member = (self.member, 0)

    # -- entries

    def add(self, entry: Entry, data: bytes | None = None) -> None:
        """Archive ``entry``; ``data``, if given, is its archived content
        already read (see :func:`prefetch`)."""
        name = entry.path.encode("utf-8", "surrogateescape")
        if entry.type == "d":
            self._begin_member()
            self._put(tar.header(name, tar.DIRECTORY, 0o755))
            self.rows.append(row_of(entry))
            self.digests.append("")
        elif entry.type == "l":
            self._begin_member()
            target = entry.target.encode("utf-8", "surrogateescape")
            self._put(tar.header(name, tar.SYMLINK, 0o777, 0, target))
            self.rows.append(row_of(entry))
            self.digests.append(entry.target)
        elif data is not None:
            self._add_file(entry, name, len(data), data=data)
        elif entry.loader is not None:
            data = entry.loader()
            if data is not None:
                self._add_file(entry, name, len(data), data=data)
        else:
            self._add_file(entry, name, entry.size)

    def _add_file(self, entry: Entry, name: bytes, size: int, data: bytes | None = None) -> None:
        self._begin_member()
        self._put(tar.header(name, tar.REGULAR, entry.mode, size))
        row = len(self.rows)
        self.rows.append(row_of(entry, size))
        self.digests.append("")
        scanner = self.scanner
        if scanner is not None:
            scanner.begin(entry, size)
        fd = -1
        if data is None:
            try:
                fd = os.open(entry.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as e:
                raise EnvcrateError(f"cannot read {entry.source}: {e.strerror}") from None
        try:
            spanning = None
            remaining = size
            pos = 0
            while True:
                frame = self._frame
                start = frame.used
                n = min(self.frame_size - start, remaining)
                if n:
                    view = memoryview(frame.buf)[start : start + n]
                    if data is not None:
                        view[:] = memoryview(data)[pos : pos + n]  # one copy, not two
                    else:
                        got = 0
                        while got < n:
                            k = os.readv(fd, [view[got:]])
                            if k == 0:
                                raise EnvcrateError(
                                    f"{entry.source} shrank while it was being packed; pack again"
                                )
                            got += k
                    frame.used += n
                    self.member_pos += n
                    if scanner is not None:
                        scanner.update(frame.buf, start, start + n)
                pos += n
                remaining -= n
                if spanning is None and remaining == 0:
                    frame.hash_jobs.append((row, start, start + n))
                else:
                    if spanning is None:
                        spanning = hashlib.sha256()
                    spanning.update(memoryview(frame.buf)[start : start + n])
                self.progress(n)
                if frame.used == self.frame_size:
                    self._flush()
                if remaining == 0:
                    break
            if spanning is not None:
                self.digests[row] = spanning.hexdigest()
        finally:
            if fd >= 0:
                os.close(fd)
        if scanner is not None:
            scanner.end()
        self._put(b"\0" * tar.padding(size))
        self.bytes += size

    def finish(self) -> BodyResult:
        self._begin_member()
        self._put(tar.END_OF_ARCHIVE)
        self._flush()
        try:
            self._drain(len(self._pending))
        finally:
            self._pool.shutdown()
        rows = [
            FileRow(r.type, r.path, r.mode, r.size, d) if r.type == "f" else r
            for r, d in zip(self.rows, self.digests)
        ]
        return BodyResult(rows, self.frames, self.index, self.bytes)

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


PREFETCH_MAX_FILE = 1 << 20


def _prefetched(e: Entry) -> bool:
    return e.loader is not None or (e.type == "f" and e.size <= PREFETCH_MAX_FILE)


def _load_batch(entries: list[Entry]) -> list[bytes | None]:
    """Archived content of each entry; ``None`` where a loader drops it."""
    out: list[bytes | None] = []
    for e in entries:
        if e.loader is not None:
            out.append(e.loader())
            continue
        try:
            data, _ = read_file(e.source, nofollow=True)
        except OSError as err:
            raise EnvcrateError(f"cannot read {e.source}: {err.strerror}") from None
        if len(data) != e.size:
            raise EnvcrateError(f"{e.source} changed while it was being packed; pack again")
        out.append(data)
    return out


def prefetch(
    entries: list[Entry], threads: int = 2, window: int = 8
) -> Iterator[tuple[Entry, bytes | None]]:
    """Yield ``(entry, content)`` in order, small files and loader entries
    read ahead by worker threads (their syscalls overlap the caller's work);
    other entries come with ``None`` (large files are streamed by the writer),
    and entries a loader drops are not yielded."""
    batches: list[list[Entry]] = []
    batch: list[Entry] = []
    size = 0
    for e in entries:
        batch.append(e)
        if _prefetched(e):
            size += e.size
        if len(batch) >= 64 or size >= (4 << 20):
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)

    def submit(pool, b: list[Entry]):
        return b, pool.submit(_load_batch, [e for e in b if _prefetched(e)])

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="envcrate-read") as pool:
        it = iter(batches)
        futures = deque(submit(pool, b) for b in itertools.islice(it, window))
        while futures:
            b, fut = futures.popleft()
            nxt = next(it, None)
            if nxt is not None:
                futures.append(submit(pool, nxt))
            loaded = iter(fut.result())
            for e in b:
                if not _prefetched(e):
                    yield e, None
                else:
                    data = next(loaded)
                    if data is not None:
                        yield e, data


class Spool:
    """Compressed frames kept in memory up to ``limit`` bytes, the rest in a
    named temporary file in ``directory`` (removed by :meth:`close`).

    The body must wait for the manifest, which is known only at the end;
    keeping it in memory saves writing and reading it back."""

    def __init__(self, directory: str | os.PathLike, limit: int = 256 << 20):
        self.directory = directory
        self.limit = limit
        self.held: list[bytes] = []
        self.size = 0
        self.file: BinaryIO | None = None
        self.path: str | None = None

    def write(self, data: bytes) -> None:
        if self.file is None and self.size + len(data) > self.limit:
            import tempfile

            fd, self.path = tempfile.mkstemp(
                dir=self.directory, prefix=".envcrate-body-", suffix=".tmp"
            )
            self.file = os.fdopen(fd, "w+b")
        if self.file is None:
            self.held.append(data)
        else:
            self.file.write(data)
        self.size += len(data)

    def chunks(self) -> Iterator[bytes]:
        yield from self.held
        if self.file is not None:
            self.file.flush()
            self.file.seek(0)
            while chunk := self.file.read(8 << 20):
                yield chunk

    def close(self) -> None:
        self.held = []
        if self.file is not None:
            self.file.close()
            unlink_quietly(self.path)
            self.file = None


def _member_bytes(name: str, data: bytes) -> bytes:
    return (
        tar.header(name.encode(), tar.REGULAR, 0o644, len(data))
        + data
        + b"\0" * tar.padding(len(data))
    )


def _skippable(magic: int, payload: bytes) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


def assemble(
    out: BinaryIO,
    body: Spool,
    result: BodyResult,
    manifest: bytes,
    table: bytes,
    fmt: str,
    level: int,
    frame_size: int | None = None,
) -> tuple[str, int]:
    """Write manifest frame, file-table frames, the body and the index to
    ``out``; returns (blob digest, size)."""
    frame_size = frame_size or FRAME_SIZE
    codec = _Codec(fmt, level)
    digest = hashlib.sha256()
    size = 0
    frames: list[tuple[int, int]] = []

    def emit(data: bytes) -> None:
        nonlocal size
        out.write(data)
        digest.update(data)
        size += len(data)

    first = _member_bytes(MANIFEST_MEMBER, manifest)
    data = codec.compress(first)
    emit(data)
    frames.append((len(data), len(first)))
    second = _member_bytes(FILES_MEMBER, table)
    for pos in range(0, len(second), frame_size):
        piece = second[pos : pos + frame_size]
        data = codec.compress(piece)
        emit(data)
        frames.append((len(data), len(piece)))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="envcrate-hash") as hasher:
        # Hash in a second thread while this one writes: both release the GIL.
        for chunk in body.chunks():
            out.write(chunk)
            hasher.submit(digest.update, chunk)
            size += len(chunk)
    frames.extend(result.frames)
    if fmt == "tar.zst":
        index = [[0, 0]] + [
            [1, i * frame_size] for i in range(len(frames) - 1 - len(result.frames))
        ]
        index += [list(x) for x in result.index]
        emit(
            _skippable(_INDEX_MAGIC, json.dumps({"frames": index}, separators=(",", ":")).encode())
        )
        table_bytes = b"".join(struct.pack("<II", c, d) for c, d in frames)
        footer = struct.pack("<IBI", len(frames), 0, _SEEKABLE_FOOTER_MAGIC)
        emit(_skippable(_SEEK_TABLE_MAGIC, table_bytes + footer))
    return "sha256:" + digest.hexdigest(), size
