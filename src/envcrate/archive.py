"""The crate archive: its format and the deterministic writer (the reader is
:mod:`envcrate.reading`).

Layout of a ``.tar.zst`` crate (a valid tar stream for stock tools)::

    frame 0          tar member .envcrate/manifest.json
    frames 1..k      tar member .envcrate/files.jsonl (the file table)
    skippable frame  padding (zeros), when the head was written into room
                     left for it in front of the body (see below)
    frames k+2..n    the env's entries, sorted, cut into independent frames
                     of FRAME_SIZE bytes of tar stream (a file may span frames),
                     then the two zero blocks that end a tar archive
    skippable frame  envcrate index: per frame, (member, offset in member)
    skippable frame  zstd seek table (the "seekable" format)

``.tar.gz`` crates have the same members and the same cut, one gzip member
per frame, no padding and no index. Frames are compressed independently by a
thread pool and written in order, so the output does not depend on the
thread count.

The manifest must come first but needs the crate id, known only once the body
is written. The body of a ``.tar.zst`` is therefore written straight into the
output behind room left for the head (manifest and table frames), whose size
is estimated from the entries before packing starts; the head then goes into
that room and a skippable frame pads what it leaves. If the head does not fit
(or for ``.tar.gz``), the head is written to a new file and the body copied
behind it. Either way each source file is read once and the result depends
only on the content and settings.
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
from .fsutil import copy_range, read_file
from .manifest import FILES_MEMBER, MANIFEST_MEMBER, FileRow

FRAME_SIZE = 16 << 20
RAMP = 2 << 20
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
    limit: int  # bytes of tar stream this frame takes
    used: int = 0
    hash_jobs: list = field(default_factory=list)  # (row index, start, end)
    start_member: tuple[int, int] = (0, 0)


@dataclass
class BodyResult:
    rows: list[FileRow]
    frames: list[tuple[int, int]]  # (compressed, decompressed) per body frame
    index: list[tuple[int, int]]  # (member, offset) per body frame
    size: int  # uncompressed bytes of archived files
    offset: int = 0  # where the body starts in the output


def row_of(entry: Entry, size: int = 0, digest: str = "") -> FileRow:
    """The file-table row of an entry as archived (for a file: its archived
    size and content sha256). Packing and ``identify`` both use it, so they
    agree on the crate id."""
    target = entry.target if entry.type == "l" else digest
    return FileRow(entry.type, entry.path, "%o" % entry.mode, size, target)


class BodyWriter:
    """Writes the sorted entries as compressed frames to ``out``, from its
    current position or from where :meth:`leave_room` says."""

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
        # Compressed frames are written in order by a thread of their own:
        # a write to the page cache would otherwise stall the thread that
        # feeds the compressors.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="envcrate-write")
        self._write_error: BaseException | None = None
        # Anonymous memory rather than bytearray(): not zeroed under the GIL.
        self._free = [mmap.mmap(-1, self.frame_size) for _ in range(self.threads + 2)]
        self._pending: deque = deque()  # (frame, future)
        self._made = 0
        self._unwritten: list[bytes] = []  # compressed, waiting for the room estimate
        self._frame = self._new_frame()
        self._estimate: Callable[[], int] | None = None
        self._room = None  # future of the estimate
        self.offset = out.tell()

    def leave_room(self, estimate: Callable[[], int]) -> None:
        """Start the body ``estimate()`` bytes into ``out``; a worker runs
        ``estimate`` while compressed frames wait in memory."""
        self._estimate = estimate

    # -- frame plumbing

    def _new_frame(self) -> _Frame:
        if not self._free:
            self._drain(1)
        # The first frames are smaller (RAMP, twice that, ...): compression
        # starts sooner instead of waiting for a whole frame to fill.
        limit = min(self.frame_size, RAMP << min(self._made, 16))
        self._made += 1
        return _Frame(self._free.pop(), limit, start_member=(self.member, self.member_pos))

    def _work(self, frame: _Frame) -> tuple[bytes, list[tuple[int, str]]]:
        view = memoryview(frame.buf)[: frame.used]
        hashes = [(i, hashlib.sha256(view[s:e]).hexdigest()) for i, s, e in frame.hash_jobs]
        return self.codec.compress(view), hashes

    def _flush(self, final: bool = False) -> None:
        frame = self._frame
        if frame.used == 0:
            return
        self._pending.append((frame, self._pool.submit(self._work, frame)))
        if self._estimate is not None and (frame.limit == self.frame_size or final):
            # Once the frames are full-size, the compressors have work queued
            # while a worker estimates (in the interpreter, like the thread
            # filling frames).
            self._room = self._pool.submit(self._estimate)
            self._estimate = None
        if len(self._pending) > self.threads:
            self._drain(len(self._pending) - self.threads)
        self._frame = self._new_frame()

    def _drain(self, n: int, last: bool = False) -> None:
        for _ in range(n):
            frame, fut = self._pending.popleft()
            data, hashes = fut.result()
            for i, digest in hashes:
                self.digests[i] = digest
            self._unwritten.append(data)
            self.frames.append((len(data), frame.used))
            self.index.append(frame.start_member)
            frame.used = 0
            frame.hash_jobs = []
            self._free.append(frame.buf)
        if self._write_error is not None:
            raise self._write_error
        if self._room is not None and (last or self._room.done()):
            self.offset += self._room.result()
            self._room = None
            self.out.seek(self.offset)
        if self._room is None and self._estimate is None:
            for data in self._unwritten:
                self._writer.submit(self._write, data)
            self._unwritten.clear()

    def _write(self, data: bytes) -> None:
        if self._write_error is None:  # nothing after a failed write
            try:
                self.out.write(data)
            except BaseException as e:
                self._write_error = e

    def _put(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            frame = self._frame
            n = min(frame.limit - frame.used, len(data) - pos)
            frame.buf[frame.used : frame.used + n] = data[pos : pos + n]
            frame.used += n
            pos += n
            self.member_pos += n
            if frame.used == frame.limit:
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
                n = min(frame.limit - start, remaining)
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
                if frame.used == frame.limit:
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
        self._flush(final=True)
        try:
            self._drain(len(self._pending), last=True)
        finally:
            self._pool.shutdown()
            self._writer.shutdown()
        if self._write_error is not None:
            raise self._write_error
        rows = [
            FileRow(r.type, r.path, r.mode, r.size, d) if r.type == "f" else r
            for r, d in zip(self.rows, self.digests)
        ]
        return BodyResult(rows, self.frames, self.index, self.bytes, self.offset)

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)


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


def _member_bytes(name: str, data: bytes) -> bytes:
    return (
        tar.header(name.encode(), tar.REGULAR, 0o644, len(data))
        + data
        + b"\0" * tar.padding(len(data))
    )


def _skippable(magic: int, payload: bytes) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


_PADDING_MAGIC = 0x184D2A50


def head_frames(
    manifest: bytes, table: bytes, fmt: str, level: int | None, frame_size: int | None = None
):
    """The compressed manifest frame and file-table frames: (bytes, [(compressed,
    decompressed) per frame])."""
    frame_size = frame_size or FRAME_SIZE
    codec = _Codec(fmt, level)
    out, frames = [], []
    first = _member_bytes(MANIFEST_MEMBER, manifest)
    second = _member_bytes(FILES_MEMBER, table)
    pieces = [first] + [second[p : p + frame_size] for p in range(0, len(second), frame_size)]
    for piece in pieces:
        data = codec.compress(piece)
        out.append(data)
        frames.append((len(data), len(piece)))
    return b"".join(out), frames


def assemble(
    out: BinaryIO,
    result: BodyResult,
    manifest: bytes,
    table: bytes,
    fmt: str,
    level: int | None,
    frame_size: int | None = None,
) -> bool:
    """Complete the archive whose body :class:`BodyWriter` wrote to ``out``:
    the head (manifest and file-table frames) in the room left in front of
    the body, padded by a skippable frame, then the index behind it. Returns
    False, writing nothing, when the head does not fit; :func:`assemble_copy`
    then makes the archive in another file."""
    head, frames = head_frames(manifest, table, fmt, level, frame_size)
    gap = result.offset - len(head)
    if fmt != "tar.zst" or not (gap == 0 or gap >= 8):
        return False
    if gap:
        head += _skippable(_PADDING_MAGIC, bytes(gap - 8))
        frames.append((gap, 0))
    out.flush()
    os.pwrite(out.fileno(), head, 0)
    out.seek(result.offset + sum(c for c, _ in result.frames))
    out.write(_trailer(fmt, result, frames, frame_size))
    out.flush()
    return True


def assemble_copy(
    out: BinaryIO,
    body: BinaryIO,
    result: BodyResult,
    manifest: bytes,
    table: bytes,
    fmt: str,
    level: int | None,
    frame_size: int | None = None,
) -> None:
    """Write the whole archive to ``out``: head, the body copied from
    ``body`` (where :class:`BodyWriter` wrote it), index."""
    head, frames = head_frames(manifest, table, fmt, level, frame_size)
    out.write(head)
    out.flush()
    body.flush()
    copy_range(body.fileno(), result.offset, sum(c for c, _ in result.frames), out.fileno())
    out.seek(0, os.SEEK_END)
    out.write(_trailer(fmt, result, frames, frame_size))
    out.flush()


def _trailer(
    fmt: str, result: BodyResult, head: list[tuple[int, int]], frame_size: int | None
) -> bytes:
    """The index and seek-table frames that end a tar.zst (nothing for
    tar.gz); ``head`` lists the frames in front of the body (manifest, table
    pieces, padding)."""
    if fmt != "tar.zst":
        return b""
    frame_size = frame_size or FRAME_SIZE
    index = [[0, 0]]
    for i, (_, d) in enumerate(head[1:]):
        # A table piece starts at its offset in the table member; the padding
        # decompresses to nothing, so it "starts" where the body does.
        index.append([1, i * frame_size] if d else list(result.index[0]))
    index += [list(x) for x in result.index]
    frames = head + result.frames
    table_bytes = b"".join(struct.pack("<II", c, d) for c, d in frames)
    footer = struct.pack("<IBI", len(frames), 0, _SEEKABLE_FOOTER_MAGIC)
    index_bytes = json.dumps({"frames": index}, separators=(",", ":")).encode()
    return _skippable(_INDEX_MAGIC, index_bytes) + _skippable(
        _SEEK_TABLE_MAGIC, table_bytes + footer
    )
