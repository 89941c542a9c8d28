"""Reading a crate archive from start to end, with bounded memory.

One thread reads the compressed bytes in order and hashes them; for a
seekable ``tar.zst`` (see :mod:`envcrate.crate.container`), two threads decompress
alternate frames; the caller parses the tar stream (:class:`TarStream`) and
gets file contents as views of reused 1 MiB buffers, released when written.
Only the first frame is read for the manifest (:func:`read_manifest_bytes`).
"""

import hashlib
import mmap
import queue
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from typing import BinaryIO, Callable

from ..errors import ArchiveError, EnvcrateError
from . import tar
from .container import detect_format, seek_table
from .manifest import FILES_MEMBER, MANIFEST_MEMBER, MAX_MANIFEST, MAX_TABLE

PIECE = 1 << 20


class _Buffers:
    """Reusable buffers of one size. Fresh pages for every decompressed
    frame (8 MiB, then freed) cost more system time than the
    decompression itself on virtual machines; a few buffers taken and given
    back keep the reader's memory small and already mapped. ``take`` never
    blocks (it makes a new buffer when none is free), so a holder can never
    starve the producer; the queues between the threads bound memory."""

    def __init__(self, size: int, keep: int):
        self.size, self.keep = size, keep
        self.free: deque[mmap.mmap] = deque()

    def take(self):
        try:
            return self.free.pop()
        except IndexError:
            # Anonymous memory: its pages are touched first by the thread
            # that fills it, outside the GIL (bytearray() zeroes it under it).
            return mmap.mmap(-1, self.size)

    def give(self, buf) -> None:
        if len(self.free) < self.keep:
            self.free.append(buf)


_refs_lock = threading.Lock()


class Piece:
    """A stretch of the decompressed stream. Its buffer goes back to its
    pool when the parser and every writer that holds it have released it."""

    __slots__ = ("buf", "view", "pool", "refs")

    def __init__(self, buf, n: int, pool: "_Buffers | None" = None):
        self.buf, self.view, self.pool, self.refs = buf, memoryview(buf)[:n], pool, 1

    def hold(self) -> None:
        with _refs_lock:
            self.refs += 1

    def release(self) -> None:
        with _refs_lock:
            self.refs -= 1
            last = self.refs == 0
        if last and self.pool is not None:
            self.pool.give(self.buf)


_NEXT = "next frame"  # markers in a lane: the frame ended / the stream ended
_END = "end"


class _Reader:
    """Reads an archive in the background: one thread reads and hashes the
    compressed bytes in order; for a seekable ``tar.zst``, two threads
    decompress alternate frames (zstandard releases the GIL) into pooled
    pieces, each into a bounded queue of its own (its lane), and the
    consumer takes the frames in order, lane after lane."""

    LANE_DEPTH = 8
    LANES = 2  # one decompressing thread is slower here, even with the CPU it saves

    def __init__(self, path: str, fmt: str, digest: "hashlib._Hash | None"):
        self.path, self.fmt, self.digest = path, fmt, digest
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.lanes: list[queue.Queue] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        f = open(self.path, "rb", buffering=0)
        from .zstdio import backend

        # Frames in parallel need the zstandard module; the fallbacks read one stream.
        parallel = self.fmt == "tar.zst" and backend() == "zstandard"
        table = seek_table(f) if parallel else None
        f.seek(0)
        if table:
            self.lanes = [queue.Queue(self.LANE_DEPTH) for _ in range(self.LANES)]
            inputs = [queue.Queue(4) for _ in range(self.LANES)]
            self._spawn("envcrate-read", self._read_frames, f, table, inputs)
            for k in range(self.LANES):
                self._spawn(f"envcrate-unzstd_{k}", self._decompress, inputs[k], self.lanes[k])
        else:
            self.lanes = [queue.Queue(self.LANE_DEPTH)]
            self._spawn("envcrate-read", self._read_stream, f)

    def _spawn(self, name: str, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    # -- blocking steps that give up once the consumer has stopped

    def _put(self, q: "queue.Queue", item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: "queue.Queue"):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _END

    def _hash_rest(self, f: "BinaryIO") -> None:
        """Read what follows the last frame (the index frames): hashed, not
        decompressed."""
        buf = bytearray(PIECE)
        for n in iter(lambda: f.readinto(buf), 0):
            if self.digest is not None:
                self.digest.update(memoryview(buf)[:n])

    # -- seekable tar.zst

    def _read_frames(self, f: "BinaryIO", table, inputs: "list[queue.Queue]") -> None:
        """Independent frames: read and hash in order, in pieces, each frame
        decompressed by the lanes' threads in turn."""
        chunks = _Buffers(PIECE, keep=16)
        lane = 0
        try:
            with f:
                for csize, dsize in table:
                    if not self._put(inputs[lane], dsize):  # a frame starts
                        return
                    while csize:
                        buf = chunks.take()
                        n = f.readinto(memoryview(buf)[: min(csize, PIECE)])
                        if n == 0:
                            raise ArchiveError("the archive is truncated")
                        if self.digest is not None:
                            self.digest.update(memoryview(buf)[:n])
                        if not self._put(inputs[lane], Piece(buf, n, chunks)):
                            return
                        csize -= n
                    if not self._put(inputs[lane], _NEXT):
                        return
                    lane = (lane + 1) % len(inputs)
                for q in inputs:
                    self._put(q, _END)
                self._hash_rest(f)
        except BaseException as e:  # handed to the lane the consumer will wait on
            self.error = e
            self._put(inputs[lane], e)

    def _decompress(self, inputs: "queue.Queue", lane: "queue.Queue") -> None:
        import zstandard

        d = zstandard.ZstdDecompressor()
        pieces = _Buffers(PIECE, keep=32)
        source = _FrameSource(self, inputs)
        while True:
            item = self._get(inputs)
            if item is _END or isinstance(item, BaseException):
                self._put(lane, item)
                return
            try:
                reader = d.stream_reader(source, read_size=PIECE)
                got = 0
                while True:
                    out = pieces.take()
                    n = reader.readinto(out)
                    if n == 0:
                        pieces.give(out)
                        break
                    got += n
                    if not self._put(lane, Piece(out, n, pieces)):
                        return
                if got != item or source.read():  # the frame must end with its pieces
                    raise ArchiveError("a frame of the archive does not match its seek table")
                source.ended = False
            except BaseException as e:
                self._put(lane, e)
                return
            if not self._put(lane, _NEXT):
                return

    # -- tar.gz, or tar.zst without a seek table

    def _read_stream(self, f: "BinaryIO") -> None:
        lane = self.lanes[0]
        try:
            with f:
                if self.fmt == "tar.zst":
                    self._stream_zstd(f, lane)
                else:
                    self._stream_gzip(f, lane)
                self._hash_rest(f)
            self._put(lane, _END)
        except BaseException as e:
            self.error = e
            self._put(lane, e)

    def _stream_zstd(self, f: "BinaryIO", lane: "queue.Queue") -> None:
        from .zstdio import stream

        pieces = _Buffers(PIECE, keep=24)
        reader = stream(_Hashing(f, self.digest))
        try:
            while True:
                out = pieces.take()
                n = reader.readinto(out)
                if n == 0 or not self._put(lane, Piece(out, n, pieces)):
                    return
        finally:
            reader.close()

    def _stream_gzip(self, f: "BinaryIO", lane: "queue.Queue") -> None:
        d = zlib.decompressobj(31)
        while True:
            data = f.read(4 << 20)
            if self.digest is not None:
                self.digest.update(data)
            if not data:
                if not d.eof:
                    raise ArchiveError("the archive is truncated")
                return
            while data:
                # At most a piece at a time: one read can inflate a thousandfold.
                out = d.decompress(data, PIECE)
                if out and not self._put(lane, Piece(out, len(out))):
                    return
                if d.eof:
                    data = d.unused_data
                    if not data:
                        break
                    d = zlib.decompressobj(31)
                else:
                    data = d.unconsumed_tail

    # -- the consumer's side

    def pieces(self) -> "Iterator[Piece]":
        """The decompressed stream, in order."""
        k = 0
        while True:
            item = self._get(self.lanes[k])
            if item is _END:
                return
            if item is _NEXT:
                k = (k + 1) % len(self.lanes)
                continue
            if isinstance(item, BaseException):
                raise self._user_error(item)
            yield item

    def _user_error(self, e: "BaseException") -> "BaseException":
        if isinstance(e, EnvcrateError):
            return e
        if isinstance(e, OSError):
            return EnvcrateError(f"cannot read {self.path}: {e.strerror or e}")
        return ArchiveError(f"{self.path}: cannot decompress ({e})")

    def wait(self) -> None:
        """Wait until every byte is read and hashed; raise a reading error."""
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self._user_error(self.error)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


class _FrameSource:
    """The compressed pieces of one frame, as a file for zstandard's reader;
    a piece is given back once the reader asks for the next one."""

    def __init__(self, reader: "_Reader", inputs: "queue.Queue"):
        self.reader, self.inputs = reader, inputs
        self.last: Piece | None = None
        self.ended = False

    def read(self, n: int = -1):
        if self.last is not None:
            self.last.release()
            self.last = None
        if self.ended:
            return b""
        item = self.reader._get(self.inputs)
        if item is _NEXT:
            self.ended = True
            return b""
        if item is _END:
            raise ArchiveError("the archive is truncated")
        if isinstance(item, BaseException):
            raise item
        self.last = item
        return item.view


class _Hashing:
    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def read(self, n=-1):
        data = self.f.read(n if n > 0 else PIECE)
        if self.digest is not None:
            self.digest.update(data)
        return data


class TarStream:
    """Parses the decompressed tar stream, without copying file data: the
    pieces of a file's content are views of the reader's buffers, held until
    released (see :meth:`take`)."""

    def __init__(self, pieces: "Iterator[Piece]", check_sums: bool = True):
        self._pieces = pieces
        self._piece: Piece | None = None
        self._buf = memoryview(b"")
        self._pos = 0
        # Header checksums catch corruption where nothing else would; when
        # the archive's digest is checked before anything becomes visible,
        # they are redundant (and a tenth of the parsing time).
        self.check_sums = check_sums

    def _fill(self) -> bool:
        if self._piece is not None:
            self._piece.release()
            self._piece = None
            self._buf = memoryview(b"")
        for piece in self._pieces:
            if len(piece.view):
                self._piece, self._buf, self._pos = piece, piece.view, 0
                return True
            piece.release()
        return False

    def read(self, n: int) -> bytes:
        avail = len(self._buf) - self._pos
        if avail >= n:
            out = self._buf[self._pos : self._pos + n].tobytes()
            self._pos += n
            return out
        parts = []
        while n > 0:
            if len(self._buf) - self._pos == 0 and not self._fill():
                break
            k = min(n, len(self._buf) - self._pos)
            parts.append(self._buf[self._pos : self._pos + k].tobytes())
            self._pos += k
            n -= k
        return b"".join(parts)

    def pipe(self, n: int, sink: "Callable[[memoryview], object]") -> None:
        """Hand the next ``n`` bytes to ``sink`` as views valid during the call."""
        while n > 0:
            if len(self._buf) - self._pos == 0 and not self._fill():
                raise ArchiveError("the archive is truncated inside a member")
            k = min(n, len(self._buf) - self._pos)
            sink(self._buf[self._pos : self._pos + k])
            self._pos += k
            n -= k

    def take(self, n: int, views: "list[memoryview]", held: "list[Piece]") -> None:
        """Append views of the next ``n`` bytes to ``views``, and the pieces
        they lie in, each held once more, to ``held``: the caller releases
        them when done with the views."""
        while n > 0:
            if len(self._buf) - self._pos == 0 and not self._fill():
                raise ArchiveError("the archive is truncated inside a member")
            k = min(n, len(self._buf) - self._pos)
            views.append(self._buf[self._pos : self._pos + k])
            if not held or held[-1] is not self._piece:
                self._piece.hold()
                held.append(self._piece)
            self._pos += k
            n -= k

    def skip(self, n: int) -> None:
        if n:
            self.pipe(n, lambda v: None)

    def drain(self, limit: int = 64 << 10) -> None:
        """Consume the rest (what follows the end-of-archive blocks): at most
        ``limit`` bytes of zeros, as tar pads (envcrate writes none)."""
        left = limit
        while True:
            rest = self._buf[self._pos :]
            if rest and (len(rest) > left or rest.tobytes().strip(b"\0")):
                raise ArchiveError("data follows the end of the archive; it is corrupt")
            left -= len(rest)
            self._pos = len(self._buf)
            if not self._fill():
                return

    def next_member(self) -> "tar.Member | None":
        pax: dict[bytes, bytes] = {}
        pax_bytes = 0  # of all the pax headers in front of this member
        while True:
            block = self.read(tar.BLOCK)
            if len(block) < tar.BLOCK:
                raise ArchiveError(
                    "the archive ends without its end-of-archive marker; it is truncated"
                )
            if block == b"\0" * tar.BLOCK:
                return None
            name, typeflag, mode, size, link = tar.parse_header(block, self.check_sums)
            if typeflag in (tar.PAX, tar.PAX_GLOBAL):
                pax_bytes += size
                if pax_bytes > tar.MAX_PAX:
                    raise ArchiveError(
                        "a member's pax headers are too large; the archive is corrupt"
                    )
                data = self.read(size)
                self.skip(tar.padding(size))
                if typeflag == tar.PAX:
                    # Only what envcrate writes is kept: a thousand other
                    # keys would be memory for nothing.
                    found = tar.parse_pax(data)
                    pax.update((k, found[k]) for k in (b"path", b"linkpath", b"size") if k in found)
                continue
            if b"path" in pax:
                name = pax[b"path"]
            if b"linkpath" in pax:
                link = pax[b"linkpath"]
            if b"size" in pax:
                if not pax[b"size"].isdigit() or len(pax[b"size"]) > 20:
                    raise ArchiveError("a pax header of the archive is malformed; it is corrupt")
                size = int(pax[b"size"])
            return tar.Member(tar.safe_name(name), typeflag, mode, size, link)


class OpenedArchive:
    """An archive being read from start to end, manifest and table first."""

    def __init__(self, path: str, fmt: str, stream: "TarStream", reader: "_Reader") -> None:
        self.path = path
        self.fmt = fmt
        self.stream = stream
        self.reader = reader
        self.manifest_bytes = b""
        self.table_bytes = b""

    def finish(self) -> None:
        """After the last member: read the rest, so the digest covers every
        byte, and raise any reading error."""
        self.stream.drain()
        self.reader.wait()

    def close(self) -> None:
        self.reader.close()


def open_stream(path: str, digest: "hashlib._Hash | None" = None) -> "OpenedArchive":
    """Start reading ``path``; with ``digest``, every byte read is hashed into
    it (complete once :meth:`OpenedArchive.finish` returns)."""
    fmt = detect_format(path)
    reader = _Reader(path, fmt, digest)
    try:
        reader.start()
    except OSError as e:
        raise EnvcrateError(f"cannot read {path}: {e.strerror or e}") from None
    stream = TarStream(reader.pieces(), check_sums=digest is None)
    opened = OpenedArchive(path, fmt, stream, reader)
    try:
        opened.manifest_bytes = _expect(stream, MANIFEST_MEMBER, path)
        opened.table_bytes = _expect(stream, FILES_MEMBER, path)
    except BaseException:
        opened.close()
        raise
    return opened


def _expect(stream: "TarStream", name: str, path: str) -> bytes:
    m = stream.next_member()
    if m is None or m.name != name.encode() or m.type != tar.REGULAR:
        raise ArchiveError(f"{path} lacks its {name} member; it is not an envcrate archive")
    if m.size > (MAX_MANIFEST if name == MANIFEST_MEMBER else MAX_TABLE):
        raise ArchiveError(f"{path}: its {name} member is too large for a crate")
    data = stream.read(m.size)
    if len(data) < m.size:
        raise ArchiveError(f"{path} ends inside its {name} member; it is truncated")
    stream.skip(tar.padding(m.size))
    return data
