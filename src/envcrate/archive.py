"""The crate archive: its format and the deterministic writer (the reader is
:mod:`envcrate.reading`).

Layout of a ``.tar.zst`` crate (a valid tar stream for stock tools)::

    frame 0          tar member .envcrate/manifest.json
    frames 1..k      tar member .envcrate/files.jsonl (the file table)
    skippable frame  padding (zeros), when the head was written into room
                     left for it in front of the body (see below)
    frames k+2..n    the env's entries, sorted, cut into independent frames
                     of RAMP, twice that, ... up to FRAME_SIZE bytes of tar
                     stream (a file may span frames), then the two zero
                     blocks that end a tar archive
    skippable frame  envcrate index: per frame, (member, offset in member)
    skippable frame  zstd seek table (the "seekable" format)

``.tar.gz`` crates have the same members and the same cut, one gzip member
per frame, no padding and no index. Frames are compressed independently by
workers (see :class:`BodyWriter`) and written in order, so the output does
not depend on the number of workers, nor on whether they are processes or
threads.

The manifest must come first but needs the crate id, known only once the body
is written. The body of a ``.tar.zst`` is therefore written straight into the
output behind room left for the head (manifest and table frames), whose size
is estimated from the entries once they are all known; the head then goes into
that room and a skippable frame pads what it leaves. If the head does not fit
(or for ``.tar.gz``), the head is written to a new file and the body copied
behind it. Either way each source file is read once and the result depends
only on the content and settings.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import mmap
import os
import queue
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Callable

from . import tar
from .entry import Entry
from .errors import EnvcrateError
from .fsutil import copy_range, read_file, write_all_at
from .manifest import FILES_MEMBER, MANIFEST_MEMBER, FileRow, encode_table
from .pyc import HEADER as PYC_HEADER
from .pyc import rewritten, source_of, unchecked_header

if TYPE_CHECKING:
    from concurrent.futures import Future

# Smaller frames cost a little size (8 MiB: +0.35% on the reference venv) and
# shorten the end of a pack, when the last frames compress on their own.
FRAME_SIZE = 8 << 20
RAMP = 2 << 20
# The file table's frames: compressed as packing goes, so that little is left
# to compress once the last digest is known. A multiple of the tar block: a
# whole piece needs no padding, last or not.
TABLE_CHUNK = 256 << 10
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
    """Compresses frames; usable from several threads."""

    def __init__(self, fmt: str, level: int | None):
        self.fmt = fmt
        self.level = level
        self._local = threading.local()

    def compress(self, data) -> bytes:
        if self.fmt == "tar.zst":
            return self._zstd().compress(data)
        co = zlib.compressobj(self.level, zlib.DEFLATED, 31)  # gzip wrapper, mtime 0
        return co.compress(data) + co.flush()

    def compress_into(self, data, out) -> int:
        """Compress ``data`` into ``out`` (at least :func:`compress_bound`
        long; it may be shared with another process); returns the length.
        One call for the whole frame: zstd's streaming interface copies its
        input through a window buffer and costs about 10% more CPU."""
        packed = self.compress(data)
        out[: len(packed)] = packed
        return len(packed)

    def ready(self) -> None:
        """Make this thread's compressor now (forked workers inherit it)."""
        if self.fmt == "tar.zst":
            self._zstd()

    def _zstd(self):
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
        return c


def compress_bound(n: int) -> int:
    """Room enough for ``n`` bytes compressed by zstd or deflate."""
    return n + (n >> 7) + (64 << 10)


@dataclass
class _Frame:
    """One frame's share of the tar stream: what the planning thread laid out
    in it, filled in by a worker (see :func:`_pack_frame`)."""

    slot: int  # which pair of buffers
    buf: mmap.mmap  # its tar stream
    out: mmap.mmap  # its compressed bytes
    limit: int  # bytes of tar stream this frame takes
    used: int = 0
    # Files to read into it: (position, path, offset in the file, length, file size)
    reads: list = field(default_factory=list)
    pycs: list = field(default_factory=list)  # (position, path): pyc headers to rewrite
    whole: list = field(default_factory=list)  # (row, start, end, entry): files all in this frame
    pieces: list = field(default_factory=list)  # (row, start, end, entry, first, last)
    content: int = 0  # file bytes, for progress
    rows_end: int = 0  # rows before this one are final once this frame is hashed
    start_member: tuple[int, int] = (0, 0)


def _pack_frame(buf, out, reads, pycs, whole, used, codec, scanner, report):
    """A worker's job: read the files laid out in ``buf`` (``reads``:
    position, path, offset, length, size), rewrite the headers of the pycs
    starting in it (``pycs``: position, path), hash and scan the files that
    lie whole in it (``whole``: row, start, end, what the scanner needs) and
    ``report`` that: ([(row, sha256)], findings); then compress it into
    ``out`` and return the compressed length. (Reporting before compressing
    lets the head of the archive be made while the last frames compress.)"""
    view = memoryview(buf)
    for pos, path, offset, n, size in reads:
        _read_into(view[pos : pos + n], path, offset, size)
    if pycs:
        _rewrite_pycs(view, pycs, reads)
    hashes = [(row, hashlib.sha256(view[s:e]).hexdigest()) for row, s, e, _ in whole]
    found = []
    if scanner is not None:
        found = [scanner.whole(meta, buf, s, e) for _, s, e, meta in whole]
    report((hashes, found))
    return codec.compress_into(view[:used], out)


def _rewrite_pycs(view: memoryview, pycs, reads) -> None:
    """Make the pycs laid out in a frame unchecked-hash pycs, hashing their
    sources from the frame where they lie whole in it (a module's source
    mostly sorts next to its ``__pycache__``), else from the file."""
    here = {path: (pos, n) for pos, path, offset, n, size in reads if offset == 0 and n == size}
    for pos, path in pycs:
        at = here.get(source_of(path))
        code = None if at is None else view[at[0] : at[0] + at[1]]
        header = unchecked_header(bytes(view[pos : pos + PYC_HEADER]), path, code)
        if header is not None:
            view[pos : pos + PYC_HEADER] = header


@dataclass
class BodyResult:
    frames: list[tuple[int, int]]  # (compressed, decompressed) per body frame
    index: list[tuple[int, int]]  # (member, offset) per body frame
    offset: int  # where the body starts in the output
    head: Head  # the manifest and table frames
    # sha256 of the whole archive, when the head went into the room left for
    # it and the archive is complete; else None (see assemble_copy).
    blob: str | None


def row_of(entry: Entry, size: int = 0, digest: str = "") -> FileRow:
    """The file-table row of an entry as archived (for a file: its archived
    size and content sha256). Packing and ``identify`` both use it, so they
    agree on the crate id."""
    target = entry.target if entry.type == "l" else digest
    return FileRow(entry.type, entry.path, "%o" % entry.mode, size, target)


class BodyWriter:
    """Writes the sorted entries as compressed frames to ``out``, from its
    current position or from where :meth:`leave_room` says.

    The caller's thread plans: it lays each entry's header and content out in
    the tar stream (sizes are known from the walk), copies headers and loaded
    bytes into the frame as it goes and hands full frames to workers. A
    worker reads the frame's files straight into it, rewrites its pyc
    headers, hashes and scans the files that lie wholly inside it, reports
    that, and compresses it (:func:`_pack_frame`). In order, a completer
    thread hashes and scans the pieces of files that span frames, adds the
    rows whose digests are known to the file table and writes the frames.
    Once the last digest is known, :meth:`finish` makes the head while the
    last frames compress, places it and hashes the archive as it ends.

    Workers are processes forked with the frame buffers (shared memory)
    where that is safe (see :class:`_ProcessWorkers`), threads otherwise; the
    archive is the same either way.
    """

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
        size = frame_size or FRAME_SIZE
        self.frame_size = size + tar.padding(size)  # frames end on a block boundary
        self.member = first_member - 1
        self.member_pos = 0
        self.rows: list[FileRow] = []
        self.digests: list[str] = []
        self.frames: list[tuple[int, int]] = []
        self.index: list[tuple[int, int]] = []
        # Anonymous shared memory: not zeroed under the GIL, and seen by
        # forked workers.
        slots = self.threads + 2
        self._bufs = [mmap.mmap(-1, self.frame_size) for _ in range(slots)]
        self._outs = [mmap.mmap(-1, compress_bound(self.frame_size)) for _ in range(slots)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for slot in range(slots):
            self._free.put(slot)
        self._workers = _workers(self.threads, self._bufs, self._outs, self.codec, scanner)
        self._completer = None  # see _later
        self._error: BaseException | None = None  # the completer's
        self._pending: deque = deque()  # (frame, handle)
        self._made = 0
        self._unwritten: list[bytes] = []  # compressed, waiting for the room estimate
        self.held = 0  # bytes in _unwritten
        self._spanning = None  # sha256 of the file whose pieces are being hashed
        self._blob = None  # sha256 of the archive, once the head is placed
        self._placed: Head | None = None  # the head as placed, padding included
        self._first_member: tuple[int, int] | None = None  # where the body starts
        self._open_file = False  # a file's content goes on in the next frame
        self._final = 0  # rows before this have their digests ...
        self._final_rows: list[FileRow] = []  # ... here
        self._table = bytearray()  # ... and encoded for the file table
        self._chunks: list[bytes] = []  # its whole TABLE_CHUNK pieces, compressed
        self._frame = self._new_frame()
        self._holding = False  # nothing written until the room is known
        self._room: Future | None = None  # bytes left in front of the body
        self.offset = out.tell()

    def hold(self) -> None:
        """Write nothing until :meth:`leave_room` says where the body starts;
        compressed frames wait in memory."""
        self._holding = True

    def leave_room(self, estimate: Callable[[], int]) -> None:
        """Start the body ``estimate()`` bytes into ``out`` (a thread runs
        ``estimate``)."""
        from concurrent.futures import Future

        self._room = Future()
        threading.Thread(
            target=self._run_estimate, args=(estimate, self._room), name="envcrate-room"
        ).start()

    def _later(self, job: Callable, *args) -> Future:
        """Run ``job(*args)`` in the completer thread, after the jobs given
        before. Frames complete in order there (pieces of spanning files
        hashed and scanned, rows finalized, then written): page-cache writes
        and hashing would otherwise stall the planning thread."""
        if self._completer is None:
            # Made at the first frame's completion, when the planner waits
            # anyway, rather than before the first frame is planned.
            from concurrent.futures import ThreadPoolExecutor

            self._completer = ThreadPoolExecutor(1, thread_name_prefix="envcrate-write")
        return self._completer.submit(job, *args)

    # -- planning (the caller's thread)

    def add(self, entry: Entry) -> None:
        """Archive ``entry``.

        Loaders (an edited ``pyvenv.cfg``, conda records) run in this thread:
        there are few. Files, pycs among them, are read by the workers."""
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
        else:
            data = None if entry.loader is None else entry.loader()
            size = entry.size if data is None else len(data)
            self._begin_member()
            self._put(tar.header(name, tar.REGULAR, entry.mode, size))
            row = len(self.rows)
            self.rows.append(row_of(entry, size))
            self.digests.append("")
            self._lay_out(row, entry, size, data)
            self._put(_ZEROS[: tar.padding(size)])

    def _lay_out(self, row: int, entry: Entry, size: int, data: bytes | None) -> None:
        """Plan a file's content, cut where frames end: copied from ``data``
        now, or read from ``entry.source`` by the worker."""
        done = 0
        while True:
            frame = self._frame
            start = frame.used
            n = min(frame.limit - start, size - done)
            if n:
                if data is None:
                    frame.reads.append((start, entry.source, done, n, size))
                    if entry.pyc and done == 0 and size >= PYC_HEADER:
                        # Contents start on a block boundary and frames end on
                        # one: the header is all in this frame.
                        frame.pycs.append((start, entry.source))
                else:
                    frame.buf[start : start + n] = memoryview(data)[done : done + n]
                frame.used += n
                frame.content += n
                self.member_pos += n
            if done == 0 and n == size:
                frame.whole.append((row, start, start + n, entry))
            else:
                frame.pieces.append((row, start, start + n, entry, done == 0, done + n == size))
            done += n
            if frame.used == frame.limit:
                self._open_file = done < size  # its digest needs the next frame
                self._flush()
                self._open_file = False
            if done == size:
                return

    def _put(self, data: bytes) -> None:
        done = 0
        while done < len(data):
            frame = self._frame
            n = min(frame.limit - frame.used, len(data) - done)
            frame.buf[frame.used : frame.used + n] = data[done : done + n]
            frame.used += n
            done += n
            self.member_pos += n
            if frame.used == frame.limit:
                self._flush()

    def _begin_member(self) -> None:
        self.member += 1
        self.member_pos = 0
        if self._frame.used == 0:
            self._frame.start_member = (self.member, 0)

    def _new_frame(self) -> _Frame:
        while self._free.empty() and self._pending:
            self._drain(1)
        slot = self._free.get()  # the completer gives buffers back
        # The first frames are smaller (RAMP, twice that, ...): compression
        # starts sooner instead of waiting for a whole frame to fill.
        limit = min(self.frame_size, RAMP << min(self._made, 16))
        self._made += 1
        return _Frame(
            slot,
            self._bufs[slot],
            self._outs[slot],
            limit,
            start_member=(self.member, self.member_pos),
        )

    def _flush(self) -> None:
        frame = self._frame
        if frame.used == 0:
            return
        whole = [
            (row, s, e, (entry.path, entry.scan, entry.placeholder, entry.placeholder_mode))
            for row, s, e, entry in frame.whole
        ]
        frame.rows_end = len(self.rows) - self._open_file
        handle = self._workers.submit(
            self._made, frame.slot, frame.reads, frame.pycs, whole, frame.used
        )
        self._pending.append((frame, handle))
        if self._first_member is None:
            self._first_member = frame.start_member
        if len(self._pending) > self.threads:
            self._drain(len(self._pending) - self.threads)
        self._frame = self._new_frame()

    @staticmethod
    def _run_estimate(estimate: Callable[[], int], room: Future) -> None:
        try:
            room.set_result(estimate())
        except BaseException as e:
            room.set_exception(e)

    # -- completion, in order

    def _drain(self, n: int) -> None:
        """Take the ``n`` oldest frames from the workers (the caller's thread)
        and hand them to the completer."""
        for _ in range(n):
            frame, handle = self._pending.popleft()
            self._filled(frame, handle)
            self._done(frame, handle)

    def _filled(self, frame: _Frame, handle) -> None:
        """A worker has read, hashed and scanned a frame: record its digests
        and findings; the completer hashes its pieces of spanning files."""
        hashes, found = self._workers.filled(handle)
        for i, digest in hashes:
            self.digests[i] = digest
        if self.scanner is not None:
            self.scanner.merge(found)
        self._check()
        self._later(self._guarded, self._spanning_pieces, frame)
        self._later(self._guarded, self._finalize, frame.rows_end)

    def _done(self, frame: _Frame, handle) -> None:
        """A worker has compressed a frame: the completer writes it."""
        size = self._workers.result(handle)
        self.progress(frame.content)
        self.frames.append((size, frame.used))
        self.index.append(frame.start_member)
        self._check()
        self._later(self._complete, frame, size)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _guarded(self, job: Callable, *args) -> None:
        """Run a completer job, unless one failed before; keep its error."""
        if self._error is not None:
            return
        try:
            job(*args)
        except BaseException as e:
            self._error = e

    def _complete(self, frame: _Frame, size: int) -> None:
        """The completer: the frame's compressed bytes, written at once if the
        room in front of the body is known, else copied aside until it is;
        then the buffers are free."""
        try:
            data = memoryview(frame.out)[:size]
            if self._holding and (self._room is None or not self._room.done()):
                self._unwritten.append(bytes(data))
                self.held += size
            else:
                self._guarded(self._write_out, False)  # what waited, first
                self._guarded(self._write, data)
        finally:
            self._free.put(frame.slot)

    def _write(self, data) -> None:
        self.out.write(data)
        if self._blob is not None:
            self._blob.update(data)

    def _write_out(self, wait: bool) -> None:
        """Write the frames held back so far, if the room is known (``wait``:
        wait for it)."""
        if self._holding and (wait or (self._room is not None and self._room.done())):
            self.offset += self._room.result()
            self._holding, self._room = False, None
            self.out.seek(self.offset)
        if not self._holding:
            for data in self._unwritten:
                self._write(data)
            self._unwritten.clear()
            self.held = 0

    def _spanning_pieces(self, frame: _Frame) -> None:
        """Hash and scan the pieces of files that span frames, in order."""
        scanner = self.scanner
        for row, start, end, entry, first, last in frame.pieces:
            if first:
                self._spanning = hashlib.sha256()
                if scanner is not None:
                    scanner.begin(entry)
            self._spanning.update(memoryview(frame.buf)[start:end])
            if scanner is not None:
                scanner.update(frame.buf, start, end)
            if last:
                self.digests[row] = self._spanning.hexdigest()
                if scanner is not None:
                    scanner.end()

    def _finalize(self, end: int) -> None:
        """The completer: rows before ``end`` have their digests; add them to
        the file table, encoded, while later frames are still packed (the
        head is needed as soon as the last digest is known)."""
        rows = [
            FileRow(r.type, r.path, r.mode, r.size, d) if r.type == "f" else r
            for r, d in zip(self.rows[self._final : end], self.digests[self._final : end])
        ]
        self._final_rows += rows
        self._table += encode_table(rows)
        self._final = end
        while len(self._table) >= (len(self._chunks) + 1) * TABLE_CHUNK:
            at = len(self._chunks) * TABLE_CHUNK
            self._chunks.append(self.codec.compress(self._table[at : at + TABLE_CHUNK]))

    def _place_head(self, head: Head) -> None:
        """The completer, once the head is made: write it into the room in
        front of the body, padded, if it fits, and hash what is written so
        far; the frames still to come are hashed as they are written."""
        placed = _padded(head, self.offset, self._first_member, self.codec.fmt)
        if placed is None:
            return
        self.out.flush()
        fd = self.out.fileno()
        write_all_at(fd, placed.data, 0)
        blob = hashlib.sha256(placed.data)
        end = self.out.tell()
        if end > self.offset:  # the body so far, hashed where the page cache holds it
            with mmap.mmap(fd, end, prot=mmap.PROT_READ) as written:
                with memoryview(written) as view:
                    blob.update(view[self.offset :])
        self._blob = blob
        self._placed = placed

    def _end(self) -> None:
        """The completer, after the last frame: the trailer, if the head was
        placed."""
        if self._placed is not None:
            self._write(_trailer(self.codec.fmt, self._placed, self.frames, self.index))
            self.out.flush()

    def finish(self, manifest_of: Callable[[list[FileRow], bytes], bytes]) -> BodyResult:
        """End the tar stream and complete the archive. As soon as every
        file's digest is known (the last frames may still be compressing),
        ``manifest_of(rows, encoded table)`` makes the manifest and the head
        is made. If it fits the room left for it
        (tar.zst), it goes there and the archive is completed and hashed as
        it is written (``BodyResult.blob``); else :func:`assemble_copy`
        makes the archive elsewhere."""
        self._begin_member()
        self._put(tar.END_OF_ARCHIVE)
        self._flush()
        try:
            last = list(self._pending)
            self._pending.clear()
            for frame, handle in last:
                self._filled(frame, handle)
            # Every piece hashed, every row final, and the room known.
            self._later(self._guarded, self._write_out, True).result()
            self._check()
            if self.scanner is not None:
                self.scanner.merge([self.scanner.pieces()])
            rows, table = self._final_rows, bytes(self._table)
            codec = self.codec
            head = head_frames(
                manifest_of(rows, table), table, codec.fmt, codec.level, self._chunks
            )
            self._later(self._guarded, self._place_head, head)
            for frame, handle in last:
                self._done(frame, handle)
            self._workers.close()  # they exit while the last frames are written
            # Freeing the frame buffers takes tens of milliseconds: here, while
            # the completer hashes the archive, rather than at the end.
            _release(self._bufs)
            self._later(self._guarded, self._end).result()
            _release(self._outs)
        finally:
            self._workers.close()
            if self._completer is not None:
                self._completer.shutdown()
        self._check()
        blob = None if self._blob is None else self._blob.hexdigest()
        return BodyResult(self.frames, self.index, self.offset, head, blob)

    def abort(self) -> None:
        self._workers.close(abort=True)
        if self._completer is not None:
            self._completer.shutdown(wait=True, cancel_futures=True)


def _release(maps: list[mmap.mmap]) -> None:
    for m in maps:
        try:
            m.close()
        except BufferError:  # still viewed somewhere: freed with the view
            pass


USE_PROCESSES = True  # tests turn it off to check that threads give the same archive


def _workers(n: int, bufs, outs, codec, scanner):
    """Worker processes where forking is safe (no other thread is running:
    a forked child inherits the locks other threads hold), else threads."""
    if USE_PROCESSES and hasattr(os, "fork") and threading.active_count() == 1:
        try:
            return _ProcessWorkers(n, bufs, outs, codec, scanner)
        except OSError:  # no more processes allowed (ulimit -u): threads will do
            pass
    return _ThreadWorkers(n, bufs, outs, codec, scanner)


class _ThreadWorkers:
    def __init__(self, n: int, bufs, outs, codec, scanner):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(n, thread_name_prefix="envcrate-zstd")
        self._args = bufs, outs, codec, scanner

    def submit(self, k: int, slot: int, reads, pycs, whole, used: int):
        from concurrent.futures import Future

        bufs, outs, codec, scanner = self._args
        filled: Future = Future()

        def job():
            try:
                return _pack_frame(
                    bufs[slot],
                    outs[slot],
                    reads,
                    pycs,
                    whole,
                    used,
                    codec,
                    scanner,
                    filled.set_result,
                )
            except BaseException as e:
                if not filled.done():
                    filled.set_exception(e)
                raise

        return filled, self._pool.submit(job)

    def filled(self, handle):
        return handle[0].result()

    def result(self, handle):
        return handle[1].result()

    def close(self, abort: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=abort)


class _ProcessWorkers:
    """Forked worker processes (see :mod:`envcrate.procs`), frame ``k`` to
    worker ``k % n``; the frame buffers are shared memory mapped before the
    fork. Reading files, which hands the interpreter lock back and forth at
    every system call, then waits on no other thread."""

    def __init__(self, n: int, bufs, outs, codec, scanner):
        from .procs import Children

        self.answers: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n)]
        self._got: dict[tuple[int, str], object] = {}  # answers by (frame, kind)
        # Loaded once here rather than in each worker after the fork
        # (importing zstandard takes about 20 ms there).
        codec.ready()
        self.children = Children(
            n,
            functools.partial(_serve, bufs=bufs, outs=outs, codec=codec, scanner=scanner),
            lambda i, message: self.answers[i].put(message),
        )

    def submit(self, k: int, slot: int, reads, pycs, whole, used: int):
        from .procs import ChildGone

        try:
            self.children.send(k % len(self.children), (k, slot, reads, pycs, whole, used))
        except ChildGone:
            raise _worker_died() from None
        return k

    def filled(self, k: int):
        """What frame ``k``'s worker reported before compressing it."""
        return self._answer(k, "filled")

    def result(self, k: int):
        """Frame ``k``'s compressed length."""
        return self._answer(k, "done")

    def _answer(self, k: int, kind: str):
        answers = self.answers[k % len(self.answers)]
        while True:
            if (k, "error") in self._got:
                raise self._got[k, "error"]
            if (k, kind) in self._got:
                return self._got.pop((k, kind))
            got = answers.get()
            if got is None:
                raise _worker_died()
            frame, what, value = got
            self._got[frame, what] = value

    def close(self, abort: bool = False) -> None:
        self.children.close(abort)


def _worker_died() -> EnvcrateError:
    return EnvcrateError(
        "a packing worker process died (out of memory?); pack again, or with --threads 1"
    )


def _serve(requests: int, results: int, bufs, outs, codec, scanner) -> None:
    """A worker process: for each frame asked for, send (frame, "filled",
    digests and findings) then (frame, "done", compressed length), or
    (frame, "error", the error)."""
    from .procs import receive, send

    while True:
        try:
            k, slot, *job = receive(requests)
        except EOFError:
            return

        def report(filled, k=k) -> None:
            send(results, (k, "filled", filled))

        try:
            answer = (k, "done", _pack_frame(bufs[slot], outs[slot], *job, codec, scanner, report))
        except BaseException as e:
            error = e if isinstance(e, EnvcrateError) else EnvcrateError(f"packing: {e!r}")
            answer = (k, "error", error)
        send(results, answer)


_ZEROS = bytes(tar.BLOCK)


def _read_into(view: memoryview, path: str, offset: int, size: int) -> None:
    """Read ``len(view)`` bytes of the file at ``path`` from ``offset``; the
    file must still have the ``size`` the walk saw.

    Every system call lets go of the interpreter lock and must take it back,
    which other threads delay: a whole file is read with open, one read and
    close (a spare byte tells that it grew), pieces of large files check the
    size with fstat."""
    whole = offset == 0 and len(view) == size
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise EnvcrateError(f"cannot read {path}: {e.strerror}") from None
    try:
        if not whole and os.fstat(fd).st_size != size:
            raise EnvcrateError(f"{path} changed while it was being packed; pack again")
        got = 0
        while True:
            k = os.preadv(fd, [view[got:], _SPARE] if whole else [view[got:]], offset + got)
            got += k
            if got > len(view):
                raise EnvcrateError(f"{path} grew while it was being packed; pack again")
            if got == len(view):
                return
            if k == 0:
                raise EnvcrateError(f"{path} shrank while it was being packed; pack again")
    except OSError as e:
        raise EnvcrateError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)


_SPARE = bytearray(1)  # written to by readers, never read


PREFETCH_MAX_FILE = 1 << 20


def _prefetched(e: Entry) -> bool:
    return e.loader is not None or (e.type == "f" and (e.pyc or e.size <= PREFETCH_MAX_FILE))


def _load_batch(entries: list[Entry]) -> list[bytes]:
    """Archived content of each entry."""
    out: list[bytes] = []
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
        out.append(rewritten(data, e.source) if e.pyc else data)
    return out


def prefetch(
    entries: list[Entry], threads: int = 2, window: int = 8
) -> Iterator[tuple[Entry, bytes | None]]:
    """Yield ``(entry, content)`` in order, the archived content of small
    files, pycs and loader entries loaded ahead by worker threads (their
    syscalls overlap the caller's work; ``identify`` hashes them as they
    come); other entries come with ``None``."""
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
                    yield e, next(loaded)


def _member_bytes(name: str, data: bytes) -> bytes:
    return (
        tar.header(name.encode(), tar.REGULAR, 0o644, len(data))
        + data
        + b"\0" * tar.padding(len(data))
    )


def _skippable(magic: int, payload: bytes) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


_PADDING_MAGIC = 0x184D2A50


@dataclass
class Head:
    """What goes in front of the body: the manifest frame and the file-table
    frames, compressed, then perhaps padding."""

    data: bytes
    frames: list[tuple[int, int]]  # (compressed, decompressed) per frame
    index: list[list[int]]  # (member, offset) per frame


def head_frames(
    manifest: bytes, table: bytes, fmt: str, level: int | None, compressed: list[bytes] = ()
) -> Head:
    """The compressed manifest frame and file-table frames: the table's tar
    header, then its content cut every TABLE_CHUNK bytes (the last piece
    with the tar padding). ``compressed``: the first whole pieces,
    compressed already (the same bytes: see :meth:`BodyWriter._finalize`)."""
    codec = _Codec(fmt, level)
    pieces = [
        (_member_bytes(MANIFEST_MEMBER, manifest), [0, 0]),
        (tar.header(FILES_MEMBER.encode(), tar.REGULAR, 0o644, len(table)), [1, 0]),
    ]
    for p in range(0, len(table), TABLE_CHUNK):
        piece = table[p : p + TABLE_CHUNK]
        if len(piece) < TABLE_CHUNK:
            piece += bytes(tar.padding(len(table)))
        pieces.append((piece, [1, tar.BLOCK + p]))
    out, frames = [], []
    for k, (piece, _) in enumerate(pieces):
        data = compressed[k - 2] if 2 <= k < 2 + len(compressed) else codec.compress(piece)
        out.append(data)
        frames.append((len(data), len(piece)))
    return Head(b"".join(out), frames, [at for _, at in pieces])


def _padded(head: Head, offset: int, first: tuple[int, int], fmt: str) -> Head | None:
    """``head`` padded by a skippable frame to fill the ``offset`` bytes in
    front of a tar.zst body whose first frame starts at ``first`` (member,
    offset); None if it does not fit."""
    gap = offset - len(head.data)
    if fmt != "tar.zst" or not (gap == 0 or gap >= 8):
        return None
    if not gap:
        return head
    # The padding decompresses to nothing: it "starts" where the body does.
    padding = _skippable(_PADDING_MAGIC, bytes(gap - 8))
    return Head(head.data + padding, head.frames + [(gap, 0)], head.index + [list(first)])


def assemble_copy(out: BinaryIO, body: BinaryIO, result: BodyResult, fmt: str) -> None:
    """Write the whole archive to ``out`` when the head did not go into the
    room in front of the body: head, the body copied from ``body`` (where
    :class:`BodyWriter` wrote it), index."""
    out.write(result.head.data)
    out.flush()
    body.flush()
    copy_range(body.fileno(), result.offset, sum(c for c, _ in result.frames), out.fileno())
    out.seek(0, os.SEEK_END)
    out.write(_trailer(fmt, result.head, result.frames, result.index))
    out.flush()


def _trailer(fmt: str, head: Head, body_frames: list, body_index: list) -> bytes:
    """The index and seek-table frames that end a tar.zst (nothing for
    tar.gz)."""
    if fmt != "tar.zst":
        return b""
    index = [list(x) for x in head.index + body_index]
    frames = head.frames + body_frames
    table_bytes = b"".join(struct.pack("<II", c, d) for c, d in frames)
    footer = struct.pack("<IBI", len(frames), 0, _SEEKABLE_FOOTER_MAGIC)
    index_bytes = json.dumps({"frames": index}, separators=(",", ":")).encode()
    return _skippable(_INDEX_MAGIC, index_bytes) + _skippable(
        _SEEK_TABLE_MAGIC, table_bytes + footer
    )
