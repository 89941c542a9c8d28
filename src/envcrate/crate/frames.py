"""Extraction of a seekable ``tar.zst`` crate frame by frame, in forked
processes.

A crate's body frames are independent, and its index says where in the tar
stream each one starts: (member, offset into that member's header and data;
see :mod:`envcrate.crate.container`). Each writer process reads a frame from the
archive, decompresses it, checks every header in it against the crate's file
table and writes the files, directories and parts of files it holds; files
that span frames are written in parts, at their offsets, by the writers of
each frame. Nothing is shared between the processes but the file table
(inherited when they fork) and the tree they write: no interpreter lock is
held by one while another creates files, and nothing is copied between
them.

The stream is checked as tightly as by a single pass: every header must
carry the path, type, mode, size and link target of its file-table row (all
of its bytes must be those :func:`tar.header` makes where it has pax records
or a frame cuts it), and each frame must end where the index says the next
one starts. Paths, modes and sizes come from the table, which the caller
checked (:func:`envcrate.crate.tree.check_table`) and whose digest is part of the
crate id. Each file that lies whole in a frame is hashed by its writer as it
writes it; a file spanning frames (the only one opened without ``O_EXCL``,
by each of its frames' writers) is hashed once all of it is written, before
anything becomes visible; links are made only after every file.
The archive's digest is computed by this process as the writers work.
Archives without a seek table and index (``tar.gz``, or written by other
tools) go through :func:`envcrate.crate.extract.extract` instead.
"""

import hashlib
import os
from typing import Callable

from ..errors import ArchiveError, EnvcrateError, UnsafeArchiveError
from ..fsutil import current_umask, hash_file, pread_into, write_all, write_all_at
from ..procs import ChildGone, Children
from . import tar
from .extract import content_mismatch, create_file, make_dir, make_links, write_head_files
from .manifest import (
    FileRow,
    decode_rows,
    table_lines,
)
from .plan import Frame, Plan

HEAD_MEMBERS = 2  # the manifest and the file table come before the entries
MAX_FRAME = 64 << 20  # a larger frame is refused rather than allocated


def extract_frames(
    path: str,
    plan: "Plan",
    dest: str,
    digest,
    links: "list[tuple[str, str]]",
    progress: "Callable[[int], None] | None" = None,
    read_only: bool = False,
    processes: "int | None" = None,
) -> bool:
    """Extract the body of the crate at ``path`` into the existing empty
    ``dest``, per ``plan``, whose file table the caller checked (``links``:
    the table's links, as :class:`envcrate.crate.tree.Tree` lists them); hash the
    whole archive into ``digest`` (if any) meanwhile. False, with nothing
    written, when no writer process can be forked (``ulimit -u``): the
    caller reads the archive as a stream.

    The writers are forked even when other threads run here (a cache
    filler's heartbeat): they take no lock such a thread could hold, as
    they only read the archive, decompress and make files."""
    progress = progress or (lambda n: None)
    root = os.fsencode(dest)
    rows = _Rows(table_lines(plan.table_bytes))
    dispatch = _Dispatch(plan.frames)
    try:
        children = Children(
            processes or _default_processes(),
            _Work(path, root, rows, read_only).serve,
            dispatch.answered,
        )
    except OSError:
        return False
    try:
        write_head_files(root, plan.manifest_bytes, plan.table_bytes, read_only)
        dispatch.start(children)
        if digest is not None:
            hash_file(path, digest)
        dispatch.wait(progress)
        children.close()
    except BaseException:
        dispatch.stop()  # else a reader thread could send to a closed pipe
        children.close(abort=True)
        raise
    # Each frame must end where the next starts, the last past the end of the archive.
    starts = [(fr.member, fr.at) for fr in plan.frames[1:]] + [(rows.end + 1, 0)]
    for k, want in enumerate(starts):
        if dispatch.ends[k] != want:
            raise ArchiveError(
                f"{path}: frame {k} of the body ends at member {dispatch.ends[k][0]}, not where "
                "the next starts; the archive is corrupt"
            )
    spanning = [rows[m] for m in sorted(dispatch.spanning)]
    _check_spanning(root, spanning)  # their writers each wrote a part
    if read_only:  # files written in parts were made writable for that
        mask = current_umask()
        for row in spanning:
            os.chmod(root + b"/" + _encoded(row.path), _READ_ONLY_MODES[row.mode] & ~mask)
    make_links(root, [(_encoded(name), _encoded(target)) for name, target in links])
    return True


def _check_spanning(root: bytes, rows: "list[FileRow]") -> None:
    """Hash the files written in parts, now whole, against their rows: on
    two threads (hashlib lets go of the interpreter lock), the largest
    first; a quarter of a typical env's bytes lies in such files."""
    import threading

    todo = sorted(rows, key=lambda r: r.size, reverse=True)
    bad: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        while todo and not bad and not errors:
            try:
                row = todo.pop(0)
            except IndexError:
                return
            try:
                if _file_digest(root + b"/" + _encoded(row.path)) != row.digest:
                    bad.append(row.path)
            except BaseException as e:
                errors.append(e)

    helper = threading.Thread(target=work, name="envcrate-hash", daemon=True)
    helper.start()
    work()
    helper.join()
    if errors:
        raise errors[0]
    if bad:
        raise content_mismatch(bad[0])


def _file_digest(path: bytes) -> str:
    import hashlib

    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for n in iter(lambda: os.readv(fd, [buf]), 0):
            h.update(view[:n])
    finally:
        os.close(fd)
    return h.hexdigest()


class _Dispatch:
    """Hands the frames to the writers, a new one to each as it answers, and
    gathers where each frame ended, the files written in parts and the bytes
    written."""

    def __init__(self, frames: "list[Frame]"):
        import threading

        self.frames = frames
        self.ends: dict[int, tuple[int, int]] = {}
        self.spanning: set[int] = set()
        self.written = 0
        self._next = 0
        self._finished = 0
        self._error: BaseException | None = None
        self._children = None
        self._changed = threading.Condition()

    def start(self, children) -> None:
        with self._changed:
            self._children = children
            for _ in range(2):  # each busy, and one more waiting in its pipe
                for i in range(len(children)):
                    self._assign(i)

    def stop(self) -> None:
        """Hand out no more frames."""
        with self._changed:
            self._next = len(self.frames)

    def _assign(self, i: int) -> None:
        if self._next < len(self.frames) and self._error is None:
            try:
                self._children.send(i, (self._next, self.frames[self._next]))
            except ChildGone:
                self._error = _died()
                return
            self._next += 1

    def answered(self, i: int, message) -> None:
        """Writer ``i``'s answer (on its reader thread), None once it is gone."""
        with self._changed:
            if message is None:
                if self._error is None and self._finished < len(self.frames):
                    self._error = _died()
            else:
                k, error, end, span, nbytes = message
                if error is not None:
                    self._error = self._error or error
                else:
                    self.ends[k] = end
                    self.spanning.update(span)
                    self.written += nbytes
                    self._finished += 1
                    self._assign(i)
            self._changed.notify_all()

    def wait(self, progress: "Callable[[int], None]") -> None:
        """Until every frame is written (raising a writer's error), reporting
        the bytes written as they grow."""
        reported = 0
        with self._changed:
            while self._error is None and self._finished < len(self.frames):
                self._changed.wait()
                progress(self.written - reported)
                reported = self.written
            if self._error is not None:
                raise self._error


def _died() -> "EnvcrateError":
    return EnvcrateError("a file writer process died (out of memory?); unpack again")


class _Rows:
    """The file table's rows by member ordinal, decoded a block at a time
    as they are asked for (a writer needs only those of its frames)."""

    BLOCK = 256

    def __init__(self, lines: "list[bytes]"):
        self.lines = lines
        self.end = HEAD_MEMBERS + len(lines)  # the end-of-archive blocks' ordinal
        self._blocks: dict[int, list[FileRow]] = {}

    def __getitem__(self, member: int) -> "FileRow":
        """The row of the entry that is ``member``."""
        b, k = divmod(member - HEAD_MEMBERS, self.BLOCK)
        block = self._blocks.get(b)
        if block is None:
            block = decode_rows(self.lines[b * self.BLOCK : (b + 1) * self.BLOCK], b * self.BLOCK)
            for row in block:
                if not (
                    isinstance(row.size, int)
                    and isinstance(row.path, str)
                    and isinstance(row.digest, str)
                ):
                    raise ArchiveError(
                        f"line {b * self.BLOCK + 1}.. of the crate's file table is not a valid "
                        "row; the crate is corrupt"
                    )
            self._blocks[b] = block
        return block[k]


def _encoded(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


_MODES = {"644": 0o644, "755": 0o755}  # the file modes a crate has
_READ_ONLY_MODES = {k: v & ~0o222 for k, v in _MODES.items()}


# A file written in parts is opened by the writer of each frame it spans.
_PART = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class _Work:
    """What a writer process does with the frames it is sent."""

    def __init__(self, path: str, root: bytes, rows: "_Rows", read_only: bool):
        self.path, self.root, self.rows, self.read_only = path, root, rows, read_only

    def serve(self, requests: int, answers: int) -> None:
        import gc

        import zstandard

        from ..procs import receive, send

        gc.disable()  # it makes few lasting objects; a collection would copy the parent's pages
        dctx = zstandard.ZstdDecompressor()
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        cbuf = bytearray(1 << 20)
        dbuf = bytearray(1 << 20)
        while True:
            try:
                k, fr = receive(requests)
            except EOFError:
                return
            offset, csize, dsize = fr.offset, fr.csize, fr.dsize
            try:
                if dsize > MAX_FRAME or csize > MAX_FRAME:
                    raise ArchiveError(
                        f"{self.path}: a frame of the archive is too large ({dsize} bytes)"
                    )
                if len(cbuf) < csize:
                    cbuf = bytearray(csize)
                if len(dbuf) < dsize:
                    dbuf = bytearray(dsize)
                cview = memoryview(cbuf)[:csize]
                got = 0
                while got < csize:  # a network filesystem may return less
                    step = pread_into(fd, cview[got:], offset + got)
                    if step == 0:
                        raise ArchiveError(f"{self.path} is truncated")
                    got += step
                data = memoryview(dbuf)[:dsize]
                reader = dctx.stream_reader(cview)
                n = 0
                while n < dsize:
                    r = reader.readinto(data[n:])
                    if not r:
                        break
                    n += r
                if n != dsize or reader.read(1):
                    raise ArchiveError(
                        f"{self.path}: a frame of the archive does not match its seek table"
                    )
                end, span, nbytes = self.frame(data, fr.member, fr.at)
                answer = (k, None, end, span, nbytes)
            except BaseException as e:
                if isinstance(e, zstandard.ZstdError):
                    e = ArchiveError(f"{self.path}: cannot decompress ({e})")
                elif not isinstance(e, (EnvcrateError, OSError)):
                    e = EnvcrateError(f"extracting: {e!r}")
                answer = (k, e, None, None, 0)
            send(answers, answer)

    def entry(self, m: int) -> "tuple[FileRow, bytes, int, bytes | None]":
        """Member ``m``'s row, its path, its size in the stream, and its
        whole header when that is not one plain ustar block (else None)."""
        row = self.rows[m]  # checked by the parent before the writers started
        t, p, mode, size, digest = row
        name = _encoded(p)
        if t == "f":
            if len(name) <= 100 and size <= tar.MAX_OCTAL_SIZE:
                return row, name, size, None
            return row, name, size, tar.header(name, tar.REGULAR, int(mode, 8), size)
        if t == "d":
            if len(name) < 100:
                return row, name, 0, None
            return row, name, 0, tar.header(name, tar.DIRECTORY, 0o755)
        if t == "l":
            link = _encoded(digest)
            if len(name) <= 100 and len(link) <= 100:
                return row, name, 0, None
            return row, name, 0, tar.header(name, tar.SYMLINK, 0o777, 0, link)
        raise ArchiveError(
            f"the crate's file table lists {p} with type {t!r}; the crate is corrupt"
        )

    def frame(self, data: memoryview, m: int, at: int) -> "tuple[tuple[int, int], list[int], int]":
        """Check and write what ``data`` (a frame starting ``at`` bytes into
        member ``m``) holds; its end (member, offset), the members it wrote
        in part, and the file bytes it wrote."""
        pos, n = 0, len(data)
        span: list[int] = []
        nbytes = 0
        root, last, entry = self.root + b"/", self.rows.end, self.entry
        sha256 = hashlib.sha256
        modes = _READ_ONLY_MODES if self.read_only else _MODES
        while pos < n:
            if m >= last:  # the end-of-archive blocks, then nothing
                if m > last:
                    raise ArchiveError(f"{self.path}: data follows the end of the archive")
                h = tar.END_OF_ARCHIVE
                end = at + (n - pos)
                b = min(len(h), end)
                if data[pos : pos + b - at] != h[at:b]:
                    raise ArchiveError(
                        f"{self.path}: the archive does not end where its file table does"
                    )
                if end < len(h):
                    return (m, end), span, nbytes
                pos += len(h) - at
                m, at = m + 1, 0
                continue
            row, name, size, h = entry(m)
            t = row.type
            hlen = tar.BLOCK if h is None else len(h)
            rec = hlen + size + (-size % tar.BLOCK)
            if at == 0 and h is None and pos + rec <= n:  # the common case: all of it is here
                if not _plain_header_matches(data[pos : pos + hlen], row, name):
                    raise _mismatch(self.path, data[pos : pos + hlen], 0, row)
                if t == "f":
                    piece = data[pos + hlen : pos + hlen + size]
                    if sha256(piece).hexdigest() != row.digest:
                        raise content_mismatch(row.path)
                    fd = create_file(root + name, modes[row.mode])
                    try:
                        if size:
                            k = os.write(fd, piece)
                            if k < size:  # a short write: rare
                                write_all(fd, piece[k:])
                    finally:
                        os.close(fd)
                    nbytes += size
                elif t == "d":
                    make_dir(root + name)
                pos += rec
                m += 1
                continue
            end = at + (n - pos)  # how far into the member this frame reaches
            if at < hlen:
                if h is None and at == 0 and end >= hlen:
                    ok = _plain_header_matches(data[pos : pos + hlen], row, name)
                else:  # a header cut by the frame, or with pax records: all its bytes
                    if h is None:
                        h = _header_of(row, name)
                    b = min(hlen, end)
                    ok = data[pos : pos + b - at] == h[at:b]
                if not ok:
                    raise _mismatch(self.path, data[pos : pos + min(hlen, end) - at], at, row)
            if t == "f":
                a, b = max(at, hlen), min(hlen + size, end)
                if a < b or (not size and at < hlen <= end):
                    full = root + name
                    if a == hlen and b == hlen + size:  # the whole file is here
                        piece = data[pos + a - at : pos + b - at]
                        if sha256(piece).hexdigest() != row.digest:
                            raise content_mismatch(row.path)
                        fd = create_file(full, modes[row.mode])
                        try:
                            write_all(fd, piece)
                        finally:
                            os.close(fd)
                    else:
                        span.append(m)
                        fd = create_file(full, _MODES[row.mode] | 0o200, _PART)
                        try:
                            write_all_at(fd, data[pos + a - at : pos + b - at], a - hlen)
                        finally:
                            os.close(fd)
                    nbytes += b - a
            elif t == "d" and at < hlen <= end:
                make_dir(root + name)
            if end < rec:  # the member goes on in the next frame
                return (m, end), span, nbytes
            pos += rec - at
            m, at = m + 1, 0
        return (m, 0), span, nbytes


def _mismatch(path: str, part, at: int, row: "FileRow") -> "ArchiveError":
    """The error for a header that is not the row's (``part``: its bytes in
    this frame, from ``at``): the most telling one its fields here give."""
    part = bytes(part)
    typeflag = part[156 - at : 157 - at] if at <= 156 < at + len(part) else tar.REGULAR
    mode = part[100 - at : 108 - at] if at <= 100 and at + len(part) >= 108 else b""
    if typeflag not in (tar.REGULAR, b"\0", tar.DIRECTORY, tar.SYMLINK, tar.PAX):
        return UnsafeArchiveError(
            f"archive member {row.path} has type {typeflag!r} (device, fifo or hard link); "
            "refusing to extract"
        )
    try:
        setuid = tar.number(mode) & 0o7000
    except ValueError:
        setuid = 0
    if setuid:
        return UnsafeArchiveError(
            f"archive member {row.path} has setuid/setgid/sticky bits; refusing to extract"
        )
    return ArchiveError(
        f"{path}: the archive member {row.path} does not match the crate's file table"
    )


_TYPEFLAGS = {"f": ord(tar.REGULAR), "d": ord(tar.DIRECTORY), "l": ord(tar.SYMLINK)}


def _plain_header_matches(block: memoryview, row: "FileRow", name: bytes) -> bool:
    """Whether a one-block ustar header has the fields the row gives: name,
    type, mode, size and link target (the rest does not change what is
    written, and tar's own checksum guards nothing the archive's digest
    does not)."""
    t, _, mode, size, digest = row
    if t == "d":
        name += b"/"
    k = len(name)
    if block[:k] != name or (k < 100 and block[k] != 0) or block[156] != _TYPEFLAGS[t]:
        return False
    if t == "f":
        return block[100:108] == b"%07o\0" % int(mode, 8) and block[124:136] == b"%011o\0" % size
    if t == "l":
        link = _encoded(digest)
        j = len(link)
        return block[157 : 157 + j] == link and (j == 100 or block[157 + j] == 0)
    return True


def _header_of(row: "FileRow", name: bytes) -> bytes:
    t, _, mode, size, digest = row
    if t == "f":
        return tar.header(name, tar.REGULAR, int(mode, 8), size)
    if t == "d":
        return tar.header(name, tar.DIRECTORY, 0o755)
    return tar.header(name, tar.SYMLINK, 0o777, 0, _encoded(digest))


def _default_processes() -> int:
    """Three on two cores (two were 5% slower on disk, four no faster); up
    to eight with more cores, for filesystems where creating a file waits
    on a server."""
    return max(3, min(8, os.cpu_count() or 1))
