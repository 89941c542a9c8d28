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


def _header_before(data: bytes, start: int, value: bytes) -> tuple[int, int, bool] | None:
    """(header start, reference flag, interned) when ``data[start:]`` begins
    with ``value`` as a whole marshalled string: the bytes before it are a
    string header whose length is ``len(value)`` and whose type fits the
    content (short ASCII under 256 bytes, long ASCII from 256, else UTF-8)."""
    n, ascii_ = len(value), value.isascii()
    if start >= 2 and data[start - 1] == n and n < 256 and ascii_:
        t = data[start - 2]
        if t & ~_REF in _SHORT:
            return start - 2, t & _REF, _SHORT[t & ~_REF]
    if start >= 5 and int.from_bytes(data[start - 4 : start], "little") == n:
        t = data[start - 5]
        kind = t & ~_REF
        fits = kind in (ord("u"), ord("t")) or (ascii_ and n >= 256 and kind in _LONG)
        if fits:
            return start - 5, t & _REF, _LONG[kind]
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


def with_filename(data: bytes, source: str, prefix: str, spellings: list[bytes]) -> bytes:
    """The pyc ``data`` of the module whose source is at ``source``
    (relative to the env) with each code object's file name that names
    that source in the env (a spelling of its prefix in ``spellings``, then
    ``/source``; or ``lib64/`` for ``lib/``, as venvs of distributions whose
    ``platlibdir`` is lib64 compile it) replaced by ``prefix/source``: the
    bytes no longer depend on where the env was built. Only whole
    marshalled strings of exactly that content are replaced (header, length
    and type checked); the import system sets the real file name when it
    loads the module, so the name in the archive is never used."""
    rels = [source]
    if source.startswith("lib/"):
        rels.append("lib64/" + source[4:])
    names = sorted(
        {s + ("/" + r).encode("utf-8", "surrogatepass") for s in spellings for r in rels},
        key=len,
        reverse=True,
    )
    value = prefix.encode("utf-8", "surrogatepass") + ("/" + source).encode(
        "utf-8", "surrogatepass"
    )
    found = []
    for name in names:
        at = data.find(name, HEADER)
        while at >= 0:
            header = _header_before(data, at, name)
            if header is not None:
                found.append((header[0], at + len(name), header[1], header[2]))
            at = data.find(name, at + len(name))
    if not found:
        return data
    parts, done = [], 0
    for start, end, flag, interned in sorted(found):
        if start < done:
            continue  # inside one already replaced (a longer spelling's)
        parts += [data[done:start], _string(value, flag, interned)]
        done = end
    parts.append(data[done:])
    return b"".join(parts)
