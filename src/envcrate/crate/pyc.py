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


# marshal's string types (Python 3.4 and later) and its reference flag
_SHORT = {ord("z"): False, ord("Z"): True}  # one length byte; True: interned
_LONG = {ord("a"): False, ord("A"): True, ord("u"): False, ord("t"): True}
_REF = 0x80


def _string_at(data: bytes, slash: int, end: int) -> tuple[int, int, bool] | None:
    """(start, flag, interned) of the marshalled string whose content is
    ``data[slash:end]``, when the bytes before ``slash`` are its header."""
    n = end - slash
    if n < 256 and slash >= 2 and data[slash - 1] == n and data[slash - 2] & ~_REF in _SHORT:
        t = data[slash - 2]
        return slash - 2, t & _REF, _SHORT[t & ~_REF]
    if (
        slash >= 5
        and data[slash - 5] & ~_REF in _LONG
        and int.from_bytes(data[slash - 4 : slash], "little") == n
    ):
        t = data[slash - 5]
        return slash - 5, t & _REF, _LONG[t & ~_REF]
    return None


def _string(value: bytes, flag: int, interned: bool) -> bytes:
    """``value`` marshalled as Python would (the type from its length and
    whether it is ASCII), keeping the reference flag and interning."""
    if value.isascii():
        if len(value) < 256:
            return bytes([(ord("Z") if interned else ord("z")) | flag, len(value)]) + value
        kind = ord("A") if interned else ord("a")
    else:
        kind = ord("t") if interned else ord("u")
    return bytes([kind | flag]) + len(value).to_bytes(4, "little") + value


def with_filename(data: bytes, source: str, prefix: str) -> bytes:
    """The pyc ``data`` of the module whose source is at ``source``
    (relative to the env) with each code object's file name that is an
    absolute path ending in ``/source`` (where it was compiled) replaced by
    ``prefix/source``: the bytes no longer depend on where the env was
    built. Only whole marshalled strings are replaced (their header found
    and its length matching); the import system sets the real file name
    when it loads the module, so the name in the archive is never used."""
    suffix = ("/" + source).encode("utf-8", "surrogateescape")
    value = prefix.encode("utf-8", "surrogateescape") + suffix
    parts, done = [], 0
    at = data.find(suffix, HEADER)
    while at >= 0:
        end = at + len(suffix)
        slash, found = at, None
        while slash >= done and found is None:
            found = _string_at(data, slash, end)
            if found is None:
                slash = data.rfind(b"/", done, slash)
        if found is not None and b"\0" not in data[slash:end]:
            start, flag, interned = found
            parts += [data[done:start], _string(value, flag, interned)]
            done = end
        at = data.find(suffix, end)
    if not parts:
        return data
    parts.append(data[done:])
    return b"".join(parts)
