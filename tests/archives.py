"""Crafted crate archives for the tests of hostile inputs: raw tar members,
crates with any manifest and table, seekable layouts cut where a test wants."""

from __future__ import annotations

import sys
from pathlib import Path

import zstandard

from envcrate.crate import tar
from envcrate.crate.manifest import (
    FILES_MEMBER,
    MANIFEST_MEMBER,
    FileRow,
    canonical_json,
    crate_id_of,
    encode_table,
)
from envcrate.crate.platform import host_platform


def _member(name: bytes, typeflag: bytes, mode: int, data: bytes = b"", link: bytes = b"") -> bytes:
    # Raw ustar headers, so modes and types that envcrate never writes can be made.
    h = tar._ustar(name, typeflag, mode, len(data), link)
    return h + data + b"\0" * tar.padding(len(data))


def _crate(
    path: Path,
    members: list[tuple[FileRow, bytes]],
    table: bytes | None = None,
    layout: str = "stream",
    extra: dict | None = None,
) -> Path:
    """A crafted crate: one zstd frame (``stream``), one gzip member
    (``gz``), or seekable frames of 700 bytes with an index as envcrate
    writes them (``frames``); ``extra``: manifest fields to add or replace
    (the id covers them)."""
    members = sorted(members, key=lambda m: m[0].path.encode("utf-8", "surrogateescape"))
    rows = [row for row, _ in members]
    table = encode_table(rows) if table is None else table
    manifest = {
        "schema": 2,
        "kind": "venv",
        "platform": dict(host_platform(), libc={"family": "glibc", "version": None}),
        "python": {
            "implementation": sys.implementation.name,
            "version": "%d.%d.%d" % sys.version_info[:3],
            "abiflags": "",
        },
        "prefix": "/nowhere",
        "prefix_files": [],
        "venv": {"base_links": [], "cfg": {}},
        "files": {
            "count": sum(r.type == "f" for r in rows),
            "entries": len(rows),
            "bytes": sum(r.size for r in rows if r.type == "f"),
        },
    }
    manifest.update(extra or {})
    try:
        manifest["id"] = crate_id_of(table, manifest)
    except (AttributeError, TypeError):  # a malformed manifest, made on purpose
        manifest["id"] = "sha256:" + "0" * 64
    head = [
        _member(MANIFEST_MEMBER.encode(), b"0", 0o644, canonical_json(manifest)),
        _member(FILES_MEMBER.encode(), b"0", 0o644, table),
    ]
    body = [raw for _, raw in members] + [tar.END_OF_ARCHIVE]
    if layout == "frames":
        path.write_bytes(seekable(head, body, 700))
    elif layout == "gz":
        import gzip

        path.write_bytes(gzip.compress(b"".join(head + body), mtime=0))
    else:
        path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(head + body)))
    return path


def seekable(head: list[bytes], body: list[bytes], cut: int) -> bytes:
    """A seekable tar.zst laid out as envcrate writes one: a frame per head
    member, the body's members cut every ``cut`` bytes, then the index
    ((member, offset into it) where each frame starts) and the seek table."""
    import bisect
    import itertools
    import json
    import struct

    from envcrate.crate import container

    frames = [(rec, [k, 0]) for k, rec in enumerate(head)]
    ends = list(itertools.accumulate(len(r) for r in body))
    data = b"".join(body)
    for pos in range(0, len(data), cut):
        m = bisect.bisect_right(ends, pos)
        frames.append((data[pos : pos + cut], [len(head) + m, pos - (ends[m - 1] if m else 0)]))
    c = zstandard.ZstdCompressor()
    out, sizes = [], []
    for piece, _ in frames:
        z = c.compress(piece)
        out.append(z)
        sizes.append((len(z), len(piece)))
    index = json.dumps({"frames": [at for _, at in frames]}).encode()
    out.append(struct.pack("<II", container.INDEX_MAGIC, len(index)) + index)
    seek = b"".join(struct.pack("<II", *x) for x in sizes)
    seek += struct.pack("<IBI", len(sizes), 0, container.SEEKABLE_FOOTER_MAGIC)
    out.append(struct.pack("<II", container.SEEK_TABLE_MAGIC, len(seek)) + seek)
    return b"".join(out)


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[FileRow, bytes]:
    import hashlib

    row = FileRow(
        "f", name, "755" if mode & 0o111 else "644", len(data), hashlib.sha256(data).hexdigest()
    )
    return row, _member(name.encode(), b"0", mode, data)


def _link(name: str, target: str) -> tuple[FileRow, bytes]:
    return FileRow("l", name, "777", 0, target), _member(
        name.encode(), b"2", 0o777, link=target.encode()
    )


_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of nothing

CASES = {
    "absolute": [_file("/etc/evil")],
    "dotdot": [_file("a/../../evil")],
    "link-out": [_link("out", "../../etc")],
    "link-absolute": [_link("out", "/etc")],
    "link-chain": [_link("a", "."), _link("b", "a/..")],
    "setuid": [_file("bin/tool", b"x", 0o4755)],
    "device": [(FileRow("f", "dev", "644", 0, _EMPTY), _member(b"dev", b"3", 0o644))],
    "hardlink": [
        (FileRow("f", "h", "644", 0, _EMPTY), _member(b"h", b"1", 0o644, link=b"/etc/passwd"))
    ],
}
