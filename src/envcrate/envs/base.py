"""What every kind of source env yields: entries to archive, pins, facts."""

from __future__ import annotations

import fnmatch
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..crate.entry import Entry
from ..crate.manifest import META_DIR, sort_key
from ..errors import SourceEnvError


@dataclass
class SourceEnv:
    """An env to pack. Its entries may still be coming: ``walking`` yields the
    rest in archive order (and may complete the other fields when it ends);
    :meth:`stream` gives them as they are found, :attr:`entries` all of them."""

    kind: str  # "venv" or "conda"
    prefix: str  # absolute, as given (not resolved)
    real_prefix: str
    found: list[Entry]  # the entries found so far, in archive order
    pins: list[dict]
    python: dict
    extra: dict = field(default_factory=dict)  # kind-specific manifest sections
    flags: dict = field(default_factory=dict)
    walking: Iterator[Entry] | None = None
    # What archived files name instead of the prefix (venvs; conda packages
    # carry placeholders of their own): the manifest's "prefix".
    placeholder: str | None = None
    # The thread that drains ``walking`` into ``found`` (see stream()).
    _walker: threading.Condition | None = field(default=None, init=False, repr=False)
    _walk_error: BaseException | None = field(default=None, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.prefix.rstrip("/")) or "env"

    @property
    def prefixes(self) -> list[str]:
        """Every spelling of the prefix a file may embed."""
        return prefix_spellings(self.prefix, self.real_prefix)

    @property
    def entries(self) -> list[Entry]:
        """Every entry, in archive order (the walk finished first)."""
        self.finish_walk()
        return self.found

    def finish_walk(self) -> None:
        """Wait until every entry has been found."""
        for _ in self.stream():
            pass

    @property
    def walked(self) -> bool:
        """Whether every entry has been found (and the other fields are final)."""
        return self.walking is None

    def stream(self) -> Iterator[Entry]:
        """The entries in archive order as they are found: a thread walks
        ahead (the walk waits on system calls; the caller meanwhile packs
        what it has)."""
        if self.walking is not None and self._walker is None:
            self._start_walker()
        i = 0
        while True:
            if i < len(self.found):
                yield self.found[i]
                i += 1
                continue
            walker = self._walker
            if walker is None:
                return
            with walker:
                while i >= len(self.found) and self.walking is not None:
                    walker.wait()
                if self._walk_error is not None:
                    raise self._walk_error
                if i >= len(self.found):
                    return

    def stop_walk(self) -> None:
        """Stop the walk early (packing failed): the walker thread ends after
        the entry it is on, and :attr:`walked` turns true."""
        self._stopping = True

    def _start_walker(self) -> None:
        self._walker = threading.Condition()

        def walk() -> None:
            batch: list[Entry] = []
            try:
                for entry in self.walking:
                    if self._stopping:
                        break
                    batch.append(entry)
                    if len(batch) == 64:
                        with self._walker:
                            self.found.extend(batch)
                            self._walker.notify()
                        batch = []
            except BaseException as e:
                self._walk_error = e
            with self._walker:
                self.found.extend(batch)
                self.walking = None
                self._walker.notify()

        threading.Thread(target=walk, name="envcrate-walk", daemon=True).start()


def prefix_spellings(prefix: str, real: str) -> list[str]:
    """The prefix as given and as resolved, longest first (so that a longer
    spelling is replaced before one it contains)."""
    return sorted({prefix, real}, key=len, reverse=True)


def as_bytes(spellings: list[str]) -> list[bytes]:
    """Spellings as the file system's bytes."""
    return [p.encode("utf-8", "surrogateescape") for p in spellings]


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
    """Every entry below ``prefix``, sorted, excluded globs left out (see
    :func:`iter_walk`)."""
    return list(iter_walk(prefix, real, exclude))


def iter_walk(prefix: str, real: str, exclude: tuple[str, ...] = ()) -> Iterator[Entry]:
    """Every entry below ``prefix`` in archive order (by the bytes of their
    paths), excluded globs left out, each directory listed as the walk
    reaches it.

    A directory's contents sort right where its name followed by "/" sorts
    among its siblings, so each directory is descended into at that place.
    Absolute links into the env become relative. A link that leaves the env
    is returned with an empty ``target`` (and its path in ``source``) for the
    caller to judge.
    """
    prefixes = (prefix.rstrip("/"), real.rstrip("/"))

    def visit(directory: str, rel: str) -> Iterator[Entry]:
        items: list[tuple[bytes, object]] = []  # (sort key, Entry or (dir, rel))
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
                key = sort_key(de.name)
                # The directory listing tells the type: only files need a stat.
                if de.is_symlink():
                    items.append((key, _link(de.path, path, prefixes)))
                elif de.is_dir(follow_symlinks=False):
                    items.append((key, Entry(path, "d")))
                    items.append((key + b"/", (de.path, path + "/")))
                elif de.is_file(follow_symlinks=False):
                    st = de.stat(follow_symlinks=False)
                    items.append(
                        (
                            key,
                            Entry(
                                path,
                                "f",
                                exec=bool(st.st_mode & 0o111),
                                size=st.st_size,
                                source=de.path,
                            ),
                        )
                    )
                else:
                    raise SourceEnvError(
                        f"{de.path} is a socket, fifo or device, which cannot be packed; "
                        f"pack without it: --exclude '{path}'"
                    )
        items.sort(key=lambda item: item[0])
        for _, item in items:
            if isinstance(item, Entry):
                yield item
            else:
                yield from visit(*item)

    yield from visit(prefix, "")


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
