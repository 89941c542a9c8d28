"""The plan of a seekable ``tar.zst`` crate: its frames, from the seek table
and envcrate's index at its end, and its head (manifest and file table),
which lets :mod:`.frames` extract the body frame by frame in parallel."""

import json
import struct
from typing import NamedTuple

from ..errors import ArchiveError
from . import tar
from .container import INDEX_MAGIC, seek_table
from .manifest import FILES_MEMBER, MANIFEST_MEMBER, MAX_MANIFEST, MAX_TABLE

HEAD_MEMBERS = 2  # the manifest and the file table come before the entries
MAX_FRAME = 64 << 20  # a larger frame is refused rather than allocated


class Frame(NamedTuple):
    offset: int  # in the archive
    csize: int
    dsize: int
    member: int  # the member in progress where the frame starts
    at: int  # and how far into its header and data


class Plan(NamedTuple):
    """The frames of a seekable crate, read from its end, and its head."""

    frames: "list[Frame]"  # the body's, in order
    manifest_bytes: bytes
    table_bytes: bytes


def read_plan(path: str) -> "Plan | None":
    """The plan of the ``tar.zst`` at ``path``, or None when it has no seek
    table or no index (it is then read as a plain stream), and on a node
    without the zstandard module (the fallbacks read one stream)."""
    from .zstdio import backend

    if backend() != "zstandard":
        return None
    with open(path, "rb") as f:
        table = seek_table(f)
        if not table:
            return None
        index = _read_index(f, table)
        if index is None or len(index) != len(table):
            return None
        frames, offset = [], 0
        for (csize, dsize), (member, at) in zip(table, index):
            frames.append(Frame(offset, csize, dsize, member, at))
            offset += csize
        head = [fr for fr in frames if fr.member < HEAD_MEMBERS]
        body = [fr for fr in frames if fr.member >= HEAD_MEMBERS and fr.dsize]
        if (
            not head
            or not body
            or frames[: len(head)] != head
            or (body[0].member, body[0].at) != (HEAD_MEMBERS, 0)
        ):
            raise ArchiveError(f"{path}: the index of the archive does not match its frames")
        manifest_bytes, table_bytes = _read_head(f, head, path)
    return Plan(body, manifest_bytes, table_bytes)


def _read_index(f, table) -> "list | None":
    """The envcrate index: the skippable frame in front of the seek table."""
    end = sum(c for c, _ in table)
    f.seek(end)
    head = f.read(8)
    if len(head) < 8:
        return None
    magic, length = struct.unpack("<II", head)
    if magic != INDEX_MAGIC:
        return None
    if length > 64 * (len(table) + 1):  # a member and an offset per frame, in JSON
        raise ArchiveError("the index of the archive is larger than its frames need; it is corrupt")
    try:
        index = json.loads(f.read(length))["frames"]
        return [(_count(m), _count(at)) for m, at in index]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ArchiveError(
            "the index of the archive is not valid JSON; the archive is corrupt"
        ) from None


def _count(value) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(value)
    return value


def _read_head(f, head: "list[Frame]", path: str) -> "tuple[bytes, bytes]":
    """The manifest and the file table, from the head's frames, which must
    hold exactly those two members."""
    import zstandard

    from .reading import Piece, TarStream, _expect

    d = zstandard.ZstdDecompressor()
    parts = []
    if sum(fr.dsize for fr in head) > MAX_MANIFEST + MAX_TABLE + 4 * tar.BLOCK or any(
        fr.dsize > MAX_FRAME or fr.csize > MAX_FRAME for fr in head
    ):
        raise ArchiveError(f"{path}: the head of the archive is larger than a crate's can be")
    for fr in head:
        f.seek(fr.offset)
        try:
            data = d.decompress(f.read(fr.csize), max_output_size=fr.dsize) if fr.dsize else b""
        except zstandard.ZstdError as e:
            raise ArchiveError(f"{path}: cannot decompress the archive's head ({e})") from None
        if len(data) != fr.dsize:
            raise ArchiveError(f"{path}: a frame of the archive does not match its seek table")
        parts.append(data)
    data = b"".join(parts)
    stream = TarStream(iter([Piece(data, len(data))]))
    manifest_bytes = _expect(stream, MANIFEST_MEMBER, path)
    table_bytes = _expect(stream, FILES_MEMBER, path)
    if stream.read(1):
        raise ArchiveError(
            f"{path}: the head of the archive holds more than its manifest and table"
        )
    return manifest_bytes, table_bytes
