"""What packing learns from each file's bytes while they stream past.

The archive writer hands every file's archived bytes, piece by piece, to a
:class:`Scanner`: it records which prefixes a file embeds (and whether the
file is text or binary) and the glibc symbol versions ELF files need. Pieces
are regions of the writer's frame buffer, so nothing is copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .elf import ELF_MAGIC, glibc_needs


@dataclass
class Findings:
    prefix_files: list[dict] = field(default_factory=list)
    glibc: set[tuple[int, ...]] = field(default_factory=set)


class Scanner:
    """Per-file scan state; one file at a time, in archive order."""

    def __init__(self, needles: list[bytes]):
        # Longest first, so a real path that extends the given one is found as itself.
        self.needles = sorted(set(needles), key=len, reverse=True)
        self._overlap = max((len(n) for n in self.needles), default=1) - 1
        self.findings = Findings()

    def begin(self, entry, size: int) -> None:
        """Start on ``entry`` (an :class:`~envcrate.entry.Entry`), whose
        archived content has ``size`` bytes."""
        self._path = entry.path
        self._source = entry.source
        self._size = size
        self._scan = entry.scan and bool(self.needles)
        self._known = entry.placeholder
        self._known_mode = entry.placeholder_mode
        self._found: set[bytes] = set()
        self._nul = False
        self._tail = b""
        self._first = True
        self._elf = False

    def update(self, buf: bytearray, start: int, end: int) -> None:
        if self._first:
            self._first = False
            if buf[start : start + 4] == ELF_MAGIC:
                self._elf = True
                if end - start == self._size:
                    view = memoryview(buf)[start:end]
                    self.findings.glibc |= glibc_needs(lambda off, n: bytes(view[off : off + n]))
                    self._elf = False  # done
        if not self._scan:
            return
        if not self._nul and buf.find(b"\0", start, end) >= 0:
            self._nul = True
        for needle in self.needles:
            if needle in self._found:
                continue
            if buf.find(needle, start, end) >= 0:
                self._found.add(needle)
            elif self._tail:
                joined = self._tail + bytes(buf[start : min(end, start + self._overlap)])
                if joined.find(needle) >= 0:
                    self._found.add(needle)
        if self._overlap:
            self._tail = bytes(buf[max(start, end - self._overlap) : end])

    def end(self) -> None:
        if self._elf and self._source:
            # A large ELF file came in several pieces: read its tables directly.
            with open(self._source, "rb") as f:
                fd = f.fileno()
                self.findings.glibc |= glibc_needs(lambda off, n: os.pread(fd, n, off))
        if self._known:
            self.findings.prefix_files.append(
                {"path": self._path, "placeholder": self._known, "mode": self._known_mode}
            )
        for needle in self.needles:
            if needle in self._found:
                self.findings.prefix_files.append(
                    {
                        "path": self._path,
                        "placeholder": needle.decode("utf-8", "surrogateescape"),
                        "mode": "binary" if self._nul else "text",
                    }
                )
