"""What a source env hands to the archive writer: one :class:`Entry` per path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Entry:
    """One path of a crate, as it will be archived.

    A file's archived bytes come from ``source`` (a path read once, streamed)
    or from ``loader`` (bytes built in memory: an edited ``pyvenv.cfg``, a
    conda record, a venv file with the placeholder). A ``pyc`` (read from
    ``source``, or given by ``loader``) is archived as an unchecked-hash pyc
    (:mod:`envcrate.crate.pyc`): same size, another header, written where it
    is laid out.
    """

    path: str  # relative, "/"-separated
    type: str  # "f", "d" or "l"
    exec: bool = False
    size: int = 0
    source: str | None = None
    target: str = ""
    loader: Callable[[], bytes] | None = None
    pyc: bool = False
    scan: bool = True  # look for prefixes in this file
    # A prefix placeholder the archived bytes are known to embed (conda's
    # has_prefix) and how to replace it: "text" or "binary".
    placeholder: str | None = None
    placeholder_mode: str = "text"

    @property
    def mode(self) -> int:
        if self.type == "l":
            return 0o777
        return 0o755 if (self.exec or self.type == "d") else 0o644
