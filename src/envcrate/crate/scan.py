"""What packing learns from each file's bytes while they stream past.

The archive writer shows every file's archived bytes to a :class:`Scanner`:
it records which prefixes a file embeds (and whether the file is text or
binary) and the glibc symbol versions ELF files need. A file that lies whole
in one frame is scanned by the worker that fills the frame (:meth:`whole`,
which only reads the scanner); a file that spans frames is scanned piece by
piece, in order (:meth:`begin`, :meth:`update`, :meth:`end`). Pieces are
regions of the writer's frame buffers, so nothing is copied.
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
        self._pieces = Findings()  # of files scanned piece by piece

    def whole(self, meta, buf, start: int, end: int) -> tuple[list[dict], set]:
        """The findings of a file whose archived bytes are ``buf[start:end]``
        (``meta``: its path, whether to scan it, its known placeholder and
        that one's mode), for :meth:`merge`; safe to call from several threads
        or a worker process."""
        path, scan, placeholder, placeholder_mode = meta
        glibc: set[tuple[int, ...]] = set()
        if buf[start : start + 4] == ELF_MAGIC:
            view = memoryview(buf)[start:end]
            glibc = glibc_needs(lambda off, n: bytes(view[off : off + n]))
        found = [n for n in self.needles if buf.find(n, start, end) >= 0] if scan else []
        binary = bool(found) and buf.find(b"\0", start, end) >= 0
        return _prefix_files(path, placeholder, placeholder_mode, found, binary), glibc

    def merge(self, found: list[tuple[list[dict], set]]) -> None:
        """Add what :meth:`whole` returned."""
        for prefix_files, glibc in found:
            self.findings.prefix_files.extend(prefix_files)
            self.findings.glibc |= glibc

    def pieces(self) -> tuple[list[dict], set]:
        """What the piece-by-piece scans found, for :meth:`merge` (they run
        in another thread than the one that merges)."""
        return self._pieces.prefix_files, self._pieces.glibc

    def begin(self, entry) -> None:
        """Start on ``entry`` (an :class:`~envcrate.crate.entry.Entry`)."""
        self._path = entry.path
        self._source = entry.source
        self._scan = entry.scan and bool(self.needles)
        self._known = entry.placeholder
        self._known_mode = entry.placeholder_mode
        self._found: set[bytes] = set()
        self._nul = False
        self._tail = b""
        self._magic = b""  # the first bytes, until there are four

    def update(self, buf: bytearray, start: int, end: int) -> None:
        if len(self._magic) < 4:
            self._magic += bytes(buf[start : min(end, start + 4 - len(self._magic))])
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
        if self._magic == ELF_MAGIC and self._source:
            # An ELF file that came in pieces: read its tables directly.
            with open(self._source, "rb") as f:
                fd = f.fileno()
                self._pieces.glibc |= glibc_needs(lambda off, n: os.pread(fd, n, off))
        found = [n for n in self.needles if n in self._found]
        self._pieces.prefix_files += _prefix_files(
            self._path, self._known, self._known_mode, found, self._nul
        )


def _prefix_files(
    path: str, known: str | None, known_mode: str, found: list[bytes], binary: bool
) -> list[dict]:
    """The manifest's records of a file: its known placeholder, then each
    prefix found in it (text or binary, by whether it holds a NUL byte)."""
    records = [{"path": path, "placeholder": known, "mode": known_mode}] if known else []
    for needle in found:
        placeholder = needle.decode("utf-8", "surrogateescape")
        records.append(
            {"path": path, "placeholder": placeholder, "mode": "binary" if binary else "text"}
        )
    return records
