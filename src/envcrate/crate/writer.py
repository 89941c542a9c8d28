"""The deterministic writer of a crate's body (see :mod:`envcrate.crate.container`
for the layout): entries in order into frames of a fixed cut, compressed by
workers, written in order, the file table built as it goes."""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable

from ..fsutil import copy_range, write_all_at
from . import tar
from .container import (
    FRAME_SIZE,
    RAMP,
    TABLE_CHUNK,
    Codec,
    Head,
    compress_bound,
    head_frames,
    padded,
    trailer,
)
from .entry import Entry
from .manifest import FileRow, encode_table
from .pyc import HEADER as PYC_HEADER
from .workers import Frame, start_workers

if TYPE_CHECKING:
    from concurrent.futures import Future


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
    that, and compresses it (:func:`pack_frame`). In order, a completer
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
        self.codec = Codec(fmt, level)
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
        self._workers = start_workers(self.threads, self._bufs, self._outs, self.codec, scanner)
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
                else:
                    frame.buf[start : start + n] = memoryview(data)[done : done + n]
                if entry.pyc and done == 0 and size >= PYC_HEADER:
                    # Contents start on a block boundary and frames end on
                    # one: the header is all in this frame.
                    frame.pycs.append((start, entry.source))
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

    def _new_frame(self) -> Frame:
        while self._free.empty() and self._pending:
            self._drain(1)
        slot = self._free.get()  # the completer gives buffers back
        # The first frames are smaller (RAMP, twice that, ...): compression
        # starts sooner instead of waiting for a whole frame to fill.
        limit = min(self.frame_size, RAMP << min(self._made, 16))
        self._made += 1
        return Frame(
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

    def _filled(self, frame: Frame, handle) -> None:
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

    def _done(self, frame: Frame, handle) -> None:
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

    def _complete(self, frame: Frame, size: int) -> None:
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

    def _spanning_pieces(self, frame: Frame) -> None:
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
        placed = padded(head, self.offset, self._first_member, self.codec.fmt)
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
            self._write(trailer(self.codec.fmt, self._placed, self.frames, self.index))
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


_ZEROS = bytes(tar.BLOCK)


def assemble_copy(out: BinaryIO, body: BinaryIO, result: BodyResult, fmt: str) -> None:
    """Write the whole archive to ``out`` when the head did not go into the
    room in front of the body: head, the body copied from ``body`` (where
    :class:`BodyWriter` wrote it), index."""
    out.write(result.head.data)
    out.flush()
    body.flush()
    copy_range(body.fileno(), result.offset, sum(c for c, _ in result.frames), out.fileno())
    out.seek(0, os.SEEK_END)
    out.write(trailer(fmt, result.head, result.frames, result.index))
    out.flush()
