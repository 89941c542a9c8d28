"""The cache as the warm path reads it: cache directories, entry keys, ready
markers, last-use stamps, and what a ref is known to be without a store.

Everything here runs for every ``ensure``, hundreds of processes at once, so
it takes no lock and imports almost nothing (strings, not even pathlib).
Layout: ``cache_layout.md``.
"""

import os
import time

from ..ids import blob_digest, normalize_id

READY = ".envcrate/ready"  # the marker inside an entry, written last
STAMP_EVERY = 60.0  # last-use stamps are refreshed at most this often


class Ensured:
    """Where a crate is ready. (A plain class: dataclasses cost the warm path
    more to import than the rest of it takes to run.)"""

    __slots__ = ("id", "path", "state", "cache", "key", "seconds", "lease")

    def __init__(self, id: str, path: str, state: str, cache: str, key: str, seconds: float):
        self.id = id
        self.path = path  # the prefix, as a string
        self.state = state  # HIT, READY or WAITED
        self.cache = cache
        self.key = key
        self.seconds = seconds
        self.lease: str | None = None  # the lease file made for ``lease=``, if any

    @property
    def prefix(self):
        from pathlib import Path

        return Path(self.path)

    def __repr__(self) -> str:
        return f"Ensured(id={self.id!r}, prefix={self.path!r}, state={self.state!r})"


def default_caches() -> "list[str]":
    env = os.environ.get("ENVCRATE_CACHE")
    if env:
        return [p for p in env.split(os.pathsep) if p]
    return [user_cache()]


def user_cache() -> str:
    """This user's cache directory (platformdirs'), ``~/.cache/envcrate``."""
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # a node without it: what platformdirs says on Linux
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(base, "envcrate")
    return user_cache_dir("envcrate", appauthor=False)


def cache_list(caches) -> "list[str]":
    """Absolute cache directories from ``--cache`` values (a path or a list),
    else the defaults."""
    if caches is None or caches == [] or caches == ():
        caches = default_caches()
    elif isinstance(caches, (str, os.PathLike)):
        caches = [caches]
    return [os.path.abspath(os.path.expanduser(os.fspath(c))) for c in caches]


def entry_key(crate_id: str, interpreter: "str | None") -> str:
    """``<16 hex of the id>`` plus, for venvs, ``-<8 hex of the interpreter path>``:
    an entry relocated for another base interpreter is another entry."""
    import hashlib

    hexd = crate_id.split(":", 1)[-1][:16]
    if interpreter is None:
        return hexd
    return f"{hexd}-{hashlib.sha256(interpreter.encode()).hexdigest()[:8]}"


def _marker_lines(entry) -> "list[bytes] | None":
    """The plain lines of an entry's ready marker: crate id, interpreter (or
    empty), blob digest the entry was filled from (or empty); then the rest.
    None when it is not a ready entry of this envcrate (entries of crate
    format 1 had two plain lines). Opened rather than stat'ed: on NFS an open
    revalidates the directory."""
    data = read_small(os.path.join(entry, READY), 8192)
    if data is None:
        return None
    head = data.split(b"\n", 3)
    if (
        len(head) < 4
        or len(head[0]) != 71
        or not head[0].startswith(b"sha256:")
        or not head[0][7:].isalnum()
        or head[2][:1] not in (b"s", b"")
    ):
        return None
    return head


def read_small(path: str, limit: int) -> "bytes | None":
    """At most ``limit`` bytes of the regular file at ``path``, or None: a
    cache file another member made could be a link, a FIFO (an open that
    never returns) or /dev/zero (a read that never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_mode & 0o170000 != 0o100000:  # S_ISREG, without importing stat
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_ready(entry) -> "tuple[str, str | None] | None":
    """(crate id, interpreter or None) from an entry's ready marker, or None
    when it is not a ready entry. The marker's first lines carry these in
    plain text, so the warm path needs no json (which imports re: 11 ms)."""
    head = _marker_lines(entry)
    if head is None:
        return None
    interp = head[1].decode("utf-8", "surrogateescape")
    return head[0].decode("ascii"), (interp or None)


def read_marker(entry) -> "dict | None":
    """The whole ready marker (its JSON part, after the plain lines; entries
    of crate format 1 had two)."""
    import json

    data = read_small(os.path.join(entry, READY), 16 << 20)
    if data is None:
        return None
    try:
        parts = data.split(b"\n", 3)
        marker = json.loads(parts[2] if parts[2][:1] == b"{" else parts[3])
    except (ValueError, IndexError, RecursionError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("id"), str) else None


def _usable(ready: "tuple[str, str | None]", crate_id: str, python: "str | None") -> bool:
    marked, interp = ready
    if marked != crate_id:
        return False
    if interp is None:
        return True
    if python is not None:
        return os.path.realpath(python) == os.path.realpath(interp)
    return os.access(interp, os.X_OK)


def find_ready(caches: list, crate_id: str, python: "str | None", blob: "str | None" = None):
    """(cache, key, marker) of a ready entry for the crate, or None; with
    ``blob``, only an entry filled from the archive with that digest (the
    cache's digest index is not trusted alone)."""
    head = crate_id.split(":", 1)[-1][:16]
    for cache in caches:
        cache = os.fspath(cache)
        try:
            names = [n for n in os.listdir(os.path.join(cache, "e")) if n.startswith(head)]
        except OSError:
            continue
        found = []
        for name in sorted(names):
            entry = os.path.join(cache, "e", name)
            ready = read_ready(entry)
            if ready is not None and _usable(ready, crate_id, python):
                if blob is not None and (_marker_lines(entry) or [b""] * 3)[2].decode() != blob:
                    continue
                found.append((cache, name, ready))
        if len(found) > 1:  # a member may add one beside the real one
            found.sort(key=lambda f: not _holds(f[0], f[1], f[2], crate_id))
        if found:
            return found[0]
    return None


def _holds(cache: str, name: str, ready, crate_id: str) -> bool:
    """Whether the entry is named as its filler names it and its manifest
    and file table hash to the crate id (the id covers the crate's kind, so
    a conda-style name cannot pass for a venv crate's entry): only when
    two entries would do, since it costs hashing the table."""
    from ..crate.manifest import FILES_MEMBER, MANIFEST_MEMBER, crate_id_of

    if name != entry_key(crate_id, ready[1]):
        return False
    entry = os.path.join(cache, "e", name)
    table = read_small(os.path.join(entry, FILES_MEMBER), 256 << 20)
    manifest = read_small(os.path.join(entry, MANIFEST_MEMBER), 64 << 20)
    if table is None or manifest is None:
        return False
    import json

    try:
        data = json.loads(manifest)
        return isinstance(data, dict) and crate_id_of(table, data) == crate_id
    except Exception:  # a planted manifest: any shape
        return False


def stamp(cache: str, key: str) -> None:
    """Refresh the entry's last-use stamp, at most once a minute. Stamps are
    group-writable in a shared cache (any member refreshes them in place).
    ``used/`` is not sticky, so another member may replace a stamp by a
    symlink or FIFO: the stamp is looked at with ``lstat``, touched through
    a descriptor opened without following a symlink (a regular file only),
    and created new only where nothing is."""
    path = os.path.join(cache, "used", key)
    try:
        st = os.lstat(path)
        if time.time() - st.st_mtime < STAMP_EVERY or st.st_mode & 0o170000 != 0o100000:
            return  # fresh, or not a stamp envcrate made: left alone
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_mode & 0o170000 == 0o100000:
                os.utime(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        try:
            from ..fsutil import create_file, make_dirs_under, shared_mode

            make_dirs_under(cache, os.path.join(cache, "used"))
            os.close(create_file(path, shared_mode(cache)))
        except OSError:
            pass
    except OSError:
        pass  # a read-only shared cache


def known_id(ref: str, caches: "list[str]", sha256: "str | None") -> "str | None":
    """The crate id of ``ref`` if it can be known without a store: a full id,
    a prefix of a crate in the caches, an archive (from its head, checked),
    an archive URL whose digest was seen before (to be confirmed by the
    entry's own marker: see :func:`find_ready`)."""
    hexd = normalize_id(ref)
    if hexd is not None and len(hexd) == 64 and not os.path.exists(ref):
        return "sha256:" + hexd
    if os.path.isfile(ref):
        # The crate id its head hashes to (not the record beside it, which
        # is not checked against anything): reading the head imports zstandard.
        from ..crate.head import read_head

        return read_head(ref).id
    if ref.startswith(("http://", "https://", "file://")) and sha256:
        blob = blob_digest(sha256).split(":", 1)[1]
        for c in caches:
            data = read_small(os.path.join(c, "blobs", blob), 128)
            if data is None:
                continue
            known = data.decode("ascii", "replace").strip()
            if normalize_id(known) and len(known) == 71:
                return known
        return None
    if hexd is not None:
        found = cached_ids(caches, hexd)
        return found[0] if len(found) == 1 else None
    return None


def cached_ids(caches: "list[str]", hexd: str) -> "list[str]":
    """Crate ids in the caches that start with ``hexd``."""
    found = set()
    for c in caches:
        try:
            names = os.listdir(os.path.join(c, "e"))
        except OSError:
            continue
        for n in names:
            if n.startswith(hexd[:16]):
                ready = read_ready(os.path.join(c, "e", n))
                if ready and ready[0].split(":", 1)[-1].startswith(hexd):
                    found.add(ready[0])
    return sorted(found)
