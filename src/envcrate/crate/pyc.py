"""Timestamp pycs become unchecked-hash pycs (PEP 552) in the archive.

Archived mtimes are fixed, so a timestamp pyc would be stale after
extraction and recompiled by every process that imports it (into memory
only, in a read-only tree). Only the 16-byte header changes: flags 1
(unchecked hash) and the source's hash, keyed by the pyc's own magic number
as importlib does. The rewrite happens where the pyc is read (a packing
worker, or ``identify``), on its header alone.
"""

from __future__ import annotations

import _imp
import os

from ..fsutil import read_file

HEADER = 16


def source_of(pyc: str) -> str:
    """The source of ``pkg/__pycache__/mod.<tag>.pyc``: ``pkg/mod.py``."""
    cache_dir, base = os.path.split(pyc)
    return os.path.join(os.path.dirname(cache_dir), base.split(".", 1)[0] + ".py")


def unchecked_header(header: bytes, pyc: str, code=None) -> bytes | None:
    """The header that makes the pyc at ``pyc``, which starts with
    ``header``, an unchecked-hash pyc; ``code``: its source's bytes, when the
    caller has them. ``None`` leaves the pyc as it is: too short to be one,
    no source (a sourceless module), or stale (compiled from another version
    of the source: the interpreter recompiles it after extraction, as it
    would have in the env)."""
    if len(header) < HEADER:
        return None
    if int.from_bytes(header[4:8], "little") & 1:  # hash-based already: unchecked
        return header[:4] + b"\x01\0\0\0" + header[8:HEADER]
    source = source_of(pyc)
    try:
        if code is None:
            code, st = read_file(source)
        else:
            st = os.stat(source)
    except OSError:
        return None
    if header[8:12] != (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") or header[12:16] != (
        len(code) & 0xFFFFFFFF
    ).to_bytes(4, "little"):
        return None
    return header[:4] + b"\x01\0\0\0" + _imp.source_hash(int.from_bytes(header[:4], "little"), code)


def rewritten(data: bytes, pyc: str) -> bytes:
    """The archived bytes of the pyc ``data`` read from ``pyc``."""
    header = unchecked_header(data[:HEADER], pyc)
    return data if header is None else header + data[HEADER:]
