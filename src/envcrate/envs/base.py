"""What every kind of source env yields: entries to archive, pins, facts."""

from __future__ import annotations

import _imp
import fnmatch
import os
import stat
from dataclasses import dataclass, field

from ..entry import Entry
from ..errors import SourceEnvError
from ..fsutil import read_file
from ..manifest import META_DIR, sort_key


@dataclass
class SourceEnv:
    kind: str  # "venv" or "conda"
    prefix: str  # absolute, as given (not resolved)
    real_prefix: str
    entries: list[Entry]
    pins: list[dict]
    python: dict
    extra: dict = field(default_factory=dict)  # kind-specific manifest sections
    flags: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(self.prefix.rstrip("/")) or "env"

    @property
    def prefixes(self) -> list[str]:
        """Every spelling of the prefix a file may embed."""
        return sorted({self.prefix, self.real_prefix}, key=len, reverse=True)


def matches_any(path: str, patterns: tuple[str, ...]) -> bool:
    """``--exclude`` globs match the relative path or the last component."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def inside(path: str, prefixes: tuple[str, ...]) -> str | None:
    for p in prefixes:
        if path == p:
            return ""
        if path.startswith(p + "/"):
            return path[len(p) + 1 :]
    return None


def walk(prefix: str, real: str, exclude: tuple[str, ...] = ()) -> list[Entry]:
    """Every entry below ``prefix``, sorted, excluded globs left out.

    Absolute links into the env become relative. A link that leaves the env
    is returned with an empty ``target`` (and its path in ``source``) for the
    caller to judge.
    """
    prefixes = (prefix.rstrip("/"), real.rstrip("/"))
    out: list[Entry] = []

    def visit(directory: str, rel: str) -> None:
        try:
            it = os.scandir(directory)
        except OSError as e:
            raise SourceEnvError(f"cannot read {directory}: {e.strerror}") from None
        with it:
            for de in it:
                path = rel + de.name
                if path == META_DIR:
                    raise SourceEnvError(
                        f"{de.path} uses the name envcrate reserves for its metadata; "
                        f"rename it or pack without it: --exclude '{META_DIR}'"
                    )
                if exclude and matches_any(path, exclude):
                    continue
                st = de.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    out.append(_link(de.path, path, prefixes))
                elif stat.S_ISDIR(st.st_mode):
                    out.append(Entry(path, "d"))
                    visit(de.path, path + "/")
                elif stat.S_ISREG(st.st_mode):
                    out.append(
                        Entry(
                            path,
                            "f",
                            exec=bool(st.st_mode & 0o111),
                            size=st.st_size,
                            source=de.path,
                        )
                    )
                else:
                    raise SourceEnvError(
                        f"{de.path} is a socket, fifo or device, which cannot be packed; "
                        f"pack without it: --exclude '{path}'"
                    )

    visit(prefix, "")
    out.sort(key=lambda e: sort_key(e.path))
    return out


def refuse_outside_link(entry: Entry) -> None:
    """A link that :func:`walk` found leaving the env cannot be packed."""
    if entry.type == "l" and entry.target == "":
        raise SourceEnvError(
            f"{entry.path} is a link to {os.readlink(entry.source)}, outside the env; "
            f"remove it or pack without it: --exclude '{entry.path}'"
        )


def _link(full: str, path: str, prefixes: tuple[str, ...]) -> Entry:
    target = os.readlink(full)
    if os.path.isabs(target):
        inner = inside(os.path.normpath(target), prefixes)
        if inner is None:
            return Entry(path, "l", source=full)
        target = os.path.relpath(inner or ".", os.path.dirname(path) or ".")
    else:
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        if resolved == ".." or resolved.startswith("../"):
            return Entry(path, "l", source=full)
    return Entry(path, "l", target=target)


def pyc_loader(path: str):
    """Rewrite a timestamp pyc as an unchecked-hash pyc; drop it when stale."""

    def load() -> bytes | None:
        data, _ = read_file(path)
        if len(data) < 16:
            return data
        flags = int.from_bytes(data[4:8], "little")
        if flags & 1:  # already hash-based: make it unchecked
            return data[:4] + b"\x01\0\0\0" + data[8:]
        cache_dir, base = os.path.split(path)
        source = os.path.join(os.path.dirname(cache_dir), base.split(".", 1)[0] + ".py")
        try:
            code, st = read_file(source)
        except OSError:
            return data  # sourceless: leave as is
        if data[8:12] != (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") or data[12:16] != (
            len(code) & 0xFFFFFFFF
        ).to_bytes(4, "little"):
            return None  # stale: the interpreter would not have used it either
        # The pyc's own magic number keys the hash, as importlib does.
        return (
            data[:4]
            + b"\x01\0\0\0"
            + _imp.source_hash(int.from_bytes(data[:4], "little"), code)
            + data[16:]
        )

    return load
