"""The crate archive's container: formats, magic numbers, codecs, the head
(manifest and table frames) and the trailer (index, seek table). The writer
is :mod:`envcrate.crate.writer`, the readers :mod:`envcrate.crate.reading` and
:mod:`envcrate.crate.frames`.

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

import json
import os
import struct
import threading
import zlib
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from ..errors import ArchiveError, EnvcrateError
from . import tar
from .manifest import FILES_MEMBER, MANIFEST_MEMBER, MAX_MANIFEST

if TYPE_CHECKING:
    pass

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
ZSTD_DEFAULT = dict(
    strategy=1, window_log=21, hash_log=17, chain_log=16, search_log=1, min_match=6, target_length=0
)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
SEEK_TABLE_MAGIC = 0x184D2A5E
INDEX_MAGIC = 0x184D2A5B
SEEKABLE_FOOTER_MAGIC = 0x8F92EAB1


def format_of_name(name: str) -> "str | None":
    for fmt in FORMATS:
        if name.endswith("." + fmt):
            return fmt
    return None


class Codec:
    """Compresses frames; usable from several threads."""

    def __init__(self, fmt: str, level: "int | None"):
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
                    write_checksum=True, write_content_size=True, **ZSTD_DEFAULT
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


def member_bytes(name: str, data: bytes) -> bytes:
    return (
        tar.header(name.encode(), tar.REGULAR, 0o644, len(data))
        + data
        + b"\0" * tar.padding(len(data))
    )


def skippable(magic: int, payload: bytes) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


PADDING_MAGIC = 0x184D2A50


class Head(NamedTuple):
    """What goes in front of the body: the manifest frame and the file-table
    frames, compressed, then perhaps padding."""

    data: bytes
    frames: "list[tuple[int, int]]"  # (compressed, decompressed) per frame
    index: "list[list[int]]"  # (member, offset) per frame


def head_frames(
    manifest: bytes, table: bytes, fmt: str, level: "int | None", compressed: "list[bytes]" = ()
) -> "Head":
    """The compressed manifest frame and file-table frames: the table's tar
    header, then its content cut every TABLE_CHUNK bytes (the last piece
    with the tar padding). ``compressed``: the first whole pieces,
    compressed already (the same bytes: see :meth:`BodyWriter._finalize`)."""
    codec = Codec(fmt, level)
    pieces = [
        (member_bytes(MANIFEST_MEMBER, manifest), [0, 0]),
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


def padded(head: "Head", offset: int, first: "tuple[int, int]", fmt: str) -> "Head | None":
    """``head`` padded by a skippable frame to fill the ``offset`` bytes in
    front of a tar.zst body whose first frame starts at ``first`` (member,
    offset); None if it does not fit."""
    gap = offset - len(head.data)
    if fmt != "tar.zst" or not (gap == 0 or gap >= 8):
        return None
    if not gap:
        return head
    # The padding decompresses to nothing: it "starts" where the body does.
    padding = skippable(PADDING_MAGIC, bytes(gap - 8))
    return Head(head.data + padding, head.frames + [(gap, 0)], head.index + [list(first)])


def trailer(fmt: str, head: "Head", body_frames: list, body_index: list) -> bytes:
    """The index and seek-table frames that end a tar.zst (nothing for
    tar.gz)."""
    if fmt != "tar.zst":
        return b""
    index = [list(x) for x in head.index + body_index]
    frames = head.frames + body_frames
    table_bytes = b"".join(struct.pack("<II", c, d) for c, d in frames)
    footer = struct.pack("<IBI", len(frames), 0, SEEKABLE_FOOTER_MAGIC)
    index_bytes = json.dumps({"frames": index}, separators=(",", ":")).encode()
    return skippable(INDEX_MAGIC, index_bytes) + skippable(SEEK_TABLE_MAGIC, table_bytes + footer)


# ----------------------------------------------------------------- reading


def detect_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise EnvcrateError(f"no archive at {path}") from None
    except IsADirectoryError:
        raise EnvcrateError(f"{path} is a directory, not an archive") from None
    if magic == ZSTD_MAGIC:
        return "tar.zst"
    if magic[:2] == GZIP_MAGIC:
        return "tar.gz"
    raise ArchiveError(f"{path} is neither a .tar.zst nor a .tar.gz crate")


def seek_table(f: "BinaryIO") -> "list[tuple[int, int]] | None":
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end < 17:
        return None
    f.seek(end - 9)
    count, desc, magic = struct.unpack("<IBI", f.read(9))
    if magic != SEEKABLE_FOOTER_MAGIC:
        return None
    width = 12 if desc & 0x80 else 8
    table_size = count * width + 9
    if table_size + 8 > end:
        return None
    f.seek(end - table_size - 8)
    head = f.read(8 + count * width)
    magic, length = struct.unpack_from("<II", head)
    if magic != SEEK_TABLE_MAGIC or length != table_size:
        return None
    return [struct.unpack_from("<II", head, 8 + i * width) for i in range(count)]


def first_unit(f: "BinaryIO", fmt: str, limit: int) -> bytes:
    """Decompress only the first zstd frame (or gzip member) of ``f``, at
    most ``limit`` bytes of it (an archive is refused before a larger one
    is read: a small archive can inflate to gigabytes)."""
    if fmt == "tar.zst":
        from .zstdio import backend

        if backend() != "zstandard":
            return _first_member(f, limit)
        import zstandard

        # One read stops at the end of the frame (read_across_frames=False).
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_size=1 << 16)
        first = reader.read(limit + 1)
        if len(first) > limit:
            raise ArchiveError("the archive's first frame is larger than a crate manifest can be")
        return first
    d = zlib.decompressobj(31)
    out = []
    got = 0
    pending = b""
    while not d.eof:
        if not pending:
            pending = f.read(1 << 16)
            if not pending:
                raise ArchiveError("the archive ends inside its manifest; it is truncated")
        out.append(d.decompress(pending, limit + 1 - got))
        got += len(out[-1])
        pending = d.unconsumed_tail
        if got > limit:
            raise ArchiveError("the archive's first frame is larger than a crate manifest can be")
    return b"".join(out)


def _first_member(f: "BinaryIO", limit: int) -> bytes:
    """The first tar member of a zstd stream, header and data, at most
    ``limit`` bytes, without the zstandard module (:mod:`.zstdio`): the
    stream is stopped once they are read."""
    from .zstdio import stream

    reader = stream(f)
    try:
        out = bytearray()
        want = tar.BLOCK
        while len(out) < want:
            buf = bytearray(min(want - len(out), 1 << 20))
            n = reader.readinto(buf)
            if n == 0:
                break
            out += buf[:n]
            if len(out) >= tar.BLOCK and want == tar.BLOCK:
                size = tar.parse_header(bytes(out[: tar.BLOCK]))[3]
                want = tar.BLOCK + size
                if want > limit:
                    raise ArchiveError(
                        "the archive's first frame is larger than a crate manifest can be"
                    )
        return bytes(out)
    finally:
        reader.close()


def read_manifest_bytes(path: str) -> bytes:
    """The manifest member's bytes, reading only the first frame/member."""
    fmt = detect_format(path)
    try:
        with open(path, "rb") as f:
            first = first_unit(f, fmt, MAX_MANIFEST + 2 * tar.BLOCK)
    except (zlib.error, ValueError) as e:
        raise ArchiveError(f"{path}: cannot decompress the manifest ({e})") from None
    except OSError as e:
        raise EnvcrateError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # zstandard.ZstdError
        if type(e).__name__ == "ZstdError":
            raise ArchiveError(f"{path}: cannot decompress the manifest ({e})") from None
        raise
    if len(first) < tar.BLOCK:
        raise ArchiveError(f"{path} does not start with a crate manifest")
    name, typeflag, _, size, _ = tar.parse_header(first[: tar.BLOCK])
    if name != MANIFEST_MEMBER.encode() or typeflag != tar.REGULAR or size > MAX_MANIFEST:
        raise ArchiveError(
            f"{path} does not start with a crate manifest; it is not an envcrate archive"
        )
    if len(first) < tar.BLOCK + size:
        raise ArchiveError(f"{path}: the archive ends inside its manifest; it is truncated")
    return first[tar.BLOCK : tar.BLOCK + size]
