"""The glibc symbol versions an ELF file needs (its ``.gnu.version_r``).

Only the versions *required* count: a manylinux wheel built on a new system
still runs on an older glibc as long as it references no newer symbol
version.
"""

from __future__ import annotations

import struct
from typing import Callable

ELF_MAGIC = b"\x7fELF"
_SHT_GNU_VERNEED = 0x6FFFFFFE


def glibc_needs(read_at: Callable[[int, int], bytes]) -> set[tuple[int, ...]]:
    """Versions like ``(2, 17)`` referenced as ``GLIBC_2.17``; empty when the
    file is not a readable ELF or needs no versioned glibc symbol."""
    try:
        return _needs(read_at)
    except (struct.error, IndexError, ValueError):
        return set()


def _needs(read_at: Callable[[int, int], bytes]) -> set[tuple[int, ...]]:
    ident = read_at(0, 16)
    if len(ident) < 16 or ident[:4] != ELF_MAGIC:
        return set()
    is64 = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    if is64:
        ehdr = read_at(0, 64)
        (shoff,) = struct.unpack_from(end + "Q", ehdr, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", ehdr, 0x3A)
        shfmt = end + "IIQQQQIIQQ"
    else:
        ehdr = read_at(0, 52)
        (shoff,) = struct.unpack_from(end + "I", ehdr, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", ehdr, 0x2E)
        shfmt = end + "IIIIIIIIII"
    if not shoff or not shnum or shnum > 65535:
        return set()
    table = read_at(shoff, shentsize * shnum)
    sections = [struct.unpack_from(shfmt, table, i * shentsize) for i in range(shnum)]
    out: set[tuple[int, ...]] = set()
    for sec in sections:
        # (name, type, flags, addr, offset, size, link, info, ...)
        if sec[1] != _SHT_GNU_VERNEED:
            continue
        strtab = sections[sec[6]]
        strings = read_at(strtab[4], strtab[5])
        data = read_at(sec[4], sec[5])
        pos = 0
        for _ in range(sec[7]):  # sh_info = number of Verneed entries
            _, cnt, _, aux, nxt = struct.unpack_from(end + "HHIII", data, pos)
            apos = pos + aux
            for _ in range(cnt):
                _, _, _, name, anext = struct.unpack_from(end + "IHHII", data, apos)
                label = strings[name : strings.index(b"\0", name)]
                if label.startswith(b"GLIBC_") and label[6:7].isdigit():
                    out.add(tuple(int(x) for x in label[6:].split(b".")))
                if not anext:
                    break
                apos += anext
            if not nxt:
                break
            pos += nxt
    return out
