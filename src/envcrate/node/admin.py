"""Looking after a cache: list, show, verify and remove entries, and ``gc``.

An entry is removed by renaming it to a hidden name in the same directory
first (it disappears at once for ``ensure``; a rename within its parent
needs no write permission on the read-only entry itself) and then making it
writable and deleting the tree, which only its owner (or root) can do.
Entries with a live lease, or being leased right now (their use lock is
held), are never removed; in a group-shared cache, another member's entries
are kept with the reason.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from ..crate.manifest import FILES_MEMBER, decode_table
from ..errors import EnvcrateError, NotFoundError
from ..fsutil import (
    make_dirs_under,
    open_regular,
    read_bounded,
    read_small,
    remove_tree,
    sha256_file,
)
from ..ids import looks_like_path, missing_hint, normalize_id
from . import leases
from .activation import PROFILE
from .cache import read_marker

ABANDONED = 3600.0  # temporary directories and downloads older than this are abandoned
TAG_BYTES = 256  # a tag or index record is a crate id and a newline
ENTRY_FILE_BYTES = 1 << 30  # an entry's file table or manifest is read up to this size

# A cache's directories, and whether each is sticky in a group-shared cache
# (members add to it, and remove only what is theirs). Not sticky: leases/
# (any member's gc drops dead leases), used/ (stamps), tags/ (a tag moves;
# these are hints for ls/info/rm). See cache_layout.md.
LAYOUT = {"e": True, "locks": True, "dl": True, "blobs": True}
LAYOUT.update(leases=False, used=False, tags=False)


def prepare(cache: Path) -> None:
    """Create a group-shared cache's directories when this process owns its
    root (or is root), so that they belong to the cache's owner rather than
    to the first member who fills it: the owner of a sticky directory may
    remove anything in it. Nothing happens in other caches."""
    try:
        st = os.stat(cache)
    except OSError:
        return
    if not st.st_mode & 0o020 or os.geteuid() not in (0, st.st_uid):
        return
    for name, sticky in LAYOUT.items():
        make_dirs_under(cache, cache / name, sticky=sticky)


def _last_use(cache: Path, key: str, entry: Path) -> float:
    for p in (cache / "used" / key, entry / ".envcrate" / "ready"):
        try:
            return p.stat().st_mtime
        except OSError:
            continue
    return 0.0


def _tags(cache: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    try:
        names = os.listdir(cache / "tags")
    except OSError:
        return out
    for name in names:
        try:  # a short regular file: never a FIFO (a hang) or /dev/zero (no end)
            crate_id = read_small(cache / "tags" / name, TAG_BYTES).decode().strip()
        except (OSError, UnicodeDecodeError):
            continue
        out.setdefault(crate_id, []).append(name)
    return out


def entries(caches: list[Path]) -> list[dict]:
    """Every ready entry of the caches."""
    out = []
    for cache in map(Path, caches):
        tags = _tags(cache)
        try:
            names = sorted(os.listdir(cache / "e"))
        except OSError:
            continue
        for key in names:
            if key.startswith("."):
                continue
            entry = cache / "e" / key
            marker = read_marker(entry)
            if marker is None:
                continue
            out.append(
                {
                    "id": marker["id"],
                    "key": key,
                    "cache": str(cache),
                    "prefix": str(entry),
                    "name": marker.get("name"),
                    "kind": marker.get("kind"),
                    "interpreter": marker.get("interpreter"),
                    "size": marker.get("bytes", 0),
                    "last_use": _last_use(cache, key, entry),
                    "in_use": leases.holders(cache, key),
                    "tags": sorted(tags.get(marker["id"], [])),
                }
            )
    return out


def find(caches: list[Path], ref: str) -> list[dict]:
    """Entries matching a crate id, 12+ hex prefix, a tag the cache has seen,
    an entry's path, or an archive file of the crate."""
    all_entries = entries(caches)
    hexd = normalize_id(ref)
    if hexd is None and os.path.isfile(ref):
        from ..crate.head import read_manifest

        hexd = read_manifest(ref).id.split(":", 1)[1]
    if hexd is not None:
        found = [e for e in all_entries if e["id"].split(":", 1)[-1].startswith(hexd)]
    elif os.path.isdir(ref):
        real = os.path.realpath(ref)
        found = [e for e in all_entries if os.path.realpath(e["prefix"]) == real]
    else:
        found = [e for e in all_entries if ref in e["tags"]]
    if not found and looks_like_path(ref) and not os.path.exists(ref):
        raise NotFoundError(f"no such archive or cache entry: {ref}")
    if not found:
        import shlex

        raise NotFoundError(
            f"no crate {ref} in {', '.join(map(str, caches))}{missing_hint(ref)}; "
            f"`envcrate ls --cache {shlex.quote(str(caches[0]))}` lists them"
        )
    ids = sorted({e["id"] for e in found})
    if len(ids) > 1:
        raise EnvcrateError(f"{ref} is ambiguous in the cache: {', '.join(ids)}; give more digits")
    return found


def verify(prefix: Path) -> dict:
    """Every file of an unpacked crate against its file table (and, for the
    files relocation rewrote, against the digests recorded then). First the
    table and the manifest must hash to the crate id the entry claims to be
    (its ready marker's): in a group-shared cache any member may add the
    entry of a crate not cached yet, and one whose own table describes
    other files would otherwise check out. Such an entry is not ok: its
    table and manifest are reported ``modified`` (and ``error`` says why)."""
    from ..crate.manifest import MANIFEST_MEMBER, Manifest, crate_id_of

    marker = read_marker(prefix) or {}
    local = marker.get("local", {})
    claimed = marker.get("id")
    table = read_bounded(prefix / FILES_MEMBER, ENTRY_FILE_BYTES)
    try:
        manifest = Manifest.from_bytes(read_bounded(prefix / MANIFEST_MEMBER, ENTRY_FILE_BYTES))
        content_id = crate_id_of(table, manifest.data)
    except (OSError, EnvcrateError) as e:
        content_id, why = None, f"its manifest cannot be read ({getattr(e, 'strerror', None) or e})"
    else:
        why = f"its file table and manifest are those of {content_id}"
    if content_id is None or content_id != claimed or manifest.id != claimed:
        return {
            "id": claimed,
            "prefix": str(prefix),
            "modified": sorted([FILES_MEMBER, MANIFEST_MEMBER]),
            "missing": [],
            "extra": [],
            "ok": False,
            "error": f"{prefix} is not the crate {claimed}: {why} (a planted or altered entry)",
        }
    rows = decode_table(table)
    modified, missing = [], []
    if _profile_differs(prefix, manifest.kind):
        modified.append(PROFILE)  # bootstrap scripts source it: it must be what fill wrote
    expected = set(local)
    for row in rows:
        expected.add(row.path)
        p = prefix / row.path
        if row.path in local:
            kind, want = local[row.path]
            got = _digest_or_target(p)
            if got != (kind, want):
                (missing if got is None else modified).append(row.path)
            continue
        got = _digest_or_target(p, row.type)
        if got is None:
            missing.append(row.path)
        elif row.type == "f" and (
            got[1] != row.digest or bool(os.stat(p).st_mode & 0o111) != (row.mode == "755")
        ):
            modified.append(row.path)
        elif row.type == "l" and got[1] != row.digest:
            modified.append(row.path)
    for rel, kind in local.items():
        if rel not in {r.path for r in rows} and _digest_or_target(prefix / rel) != tuple(kind):
            (missing if not os.path.lexists(prefix / rel) else modified).append(rel)
    extra = []
    for dirpath, dirnames, filenames in os.walk(prefix):
        rel_dir = os.path.relpath(dirpath, prefix)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != ".envcrate"]
            rel_dir = ""
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rel not in expected:
                extra.append(rel)
        for d in dirnames:
            rel = f"{rel_dir}/{d}" if rel_dir else d
            if rel not in expected and not os.path.islink(os.path.join(dirpath, d)):
                extra.append(rel + "/")
    return {
        "id": marker.get("id"),
        "prefix": str(prefix),
        "modified": sorted(modified),
        "missing": sorted(missing),
        "extra": sorted(extra),
        "ok": not (modified or missing or extra),
    }


def _profile_differs(prefix: Path, kind: str) -> bool:
    """Whether the entry's activation profile is not the one its files give
    (an entry filled before there were profiles has none: not a difference)."""
    from .activation import PROFILE, profile_sh

    try:
        have = read_bounded(prefix / PROFILE, ENTRY_FILE_BYTES)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return have != profile_sh(str(prefix), kind).encode("utf-8", "surrogateescape")


def _digest_or_target(p: Path, want_type: str | None = None):
    try:
        if os.path.islink(p):
            return ("l", os.readlink(p)) if want_type in (None, "l") else None
        if want_type == "d":
            return ("d", "") if p.is_dir() else None
        if want_type not in (None, "f") or not p.is_file():
            return None
        return ("f", sha256_file(p)[0])
    except OSError:
        return None


class Kept(EnvcrateError):
    """An entry that stays; the message says why, in a few words."""


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def remove(cache: Path, key: str, *, dry_run: bool = False) -> bool:
    """Remove an entry; True if it was (or would be) removed, False if it is
    not there. :class:`Kept` says why one stays: another user's, leased, or
    being leased right now."""
    import secrets

    cache = Path(cache)
    entry = cache / "e" / key
    try:
        owner = os.lstat(entry).st_uid
    except FileNotFoundError:
        return False
    me = os.geteuid()
    if me not in (0, owner):  # its tree can be made writable by its owner only
        raise Kept(f"owned by {_user(owner)}; only its owner (or root) can remove it")
    if dry_run:
        live = leases.holders(cache, key)
        if live:
            raise Kept(f"in use by {', '.join(live)}")
        return True
    try:
        lock = leases.lock_use(cache, key, exclusive=True)
    except leases.Busy:
        raise Kept("in use (a process is leasing it right now)") from None
    try:
        leases.mark_removing(cache, key)
        live = leases.holders(cache, key)
        if live:
            raise Kept(f"in use by {', '.join(live)}")
        trash = cache / "e" / f".{key}.trash-{secrets.token_hex(4)}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return False
        try:  # a process waiting for it finds it replaced, and takes the new one
            os.unlink(leases.use_lock_path(cache, key))
        except OSError:
            pass  # another member's (sticky locks/): gc removes it once old
    finally:
        leases.unmark_removing(cache, key)
        leases.unlock(lock)
    remove_tree(trash)
    try:
        os.unlink(cache / "used" / key)
    except OSError:
        pass
    return True


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?)(i?b?)\s*$", re.I)
_DURATION = re.compile(r"^\s*([0-9.]+)\s*([smhdw]?)\s*$", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise EnvcrateError(f"{text!r} is not a size; write e.g. 500M, 20G or 1T")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise EnvcrateError(f"{text!r} is not a duration; write e.g. 90m, 12h, 30d or 2w")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]
    return float(m.group(1)) * scale


def gc(
    caches: list[Path],
    *,
    max_size: int | None = None,
    unused_for: float | None = None,
    dry_run: bool = False,
) -> dict:
    """Remove least-recently-used entries until each cache is within
    ``max_size`` and none is unused for longer than ``unused_for``; skip
    leased ones; clean abandoned temporary directories, downloads and dead
    leases. Returns what was (or, with ``dry_run``, would be) freed."""
    now = time.time()
    removed, kept, cleaned = [], [], []
    freed = 0
    for cache in map(Path, caches):
        if not dry_run:
            prepare(cache)
        listed = sorted((e for e in entries([cache])), key=lambda e: e["last_use"])
        total = sum(e["size"] for e in listed)
        for e in listed:
            too_old = unused_for is not None and now - e["last_use"] > unused_for
            too_big = max_size is not None and total > max_size
            if not (too_old or too_big):
                continue
            if e["in_use"]:
                kept.append({"id": e["id"], "prefix": e["prefix"], "leases": e["in_use"]})
                continue
            try:
                done = remove(cache, e["key"], dry_run=dry_run)
            except Kept as why:
                kept.append({"id": e["id"], "prefix": e["prefix"], "error": str(why)})
                continue
            except OSError as err:
                where = f" ({err.filename})" if err.filename else ""
                error = f"{err.strerror or err}{where}"
                kept.append({"id": e["id"], "prefix": e["prefix"], "error": error})
                continue
            if done:
                removed.append({"id": e["id"], "prefix": e["prefix"], "size": e["size"]})
                freed += e["size"]
                total -= e["size"]
        cleaned += _clean(cache, now, dry_run)
    return {
        "removed": removed,
        "freed": freed,
        "kept": kept,
        "cleaned": cleaned,
        "dry_run": dry_run,
    }


def _unused_lock(cache: Path, lock: Path, now: float) -> bool:
    """An old lock file of a crate (``<id16>.lock``) or entry (``<key>.use``)
    that is not in this cache (a crate lock only saves duplicate work, and a
    use lock is taken again if it was removed meanwhile)."""
    head, _, kind = lock.name.rpartition(".")
    try:
        if now - lock.stat().st_mtime < ABANDONED:
            return False
        if kind == "use":
            return not (cache / "e" / head).exists()
        return not any(n.startswith(head) for n in os.listdir(cache / "e") if not n.startswith("."))
    except OSError:
        return False


def _unlink_if_free(lock: Path) -> None:
    import fcntl

    try:  # a symlink or FIFO planted under the name is not opened (only unlinked, as a name)
        fd = open_regular(lock, os.O_RDWR)
    except OSError:
        try:
            if not os.path.isfile(lock) or os.path.islink(lock):
                os.unlink(lock)
        except OSError:
            pass
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(lock)
    except OSError:
        pass  # held by a filler right now, or another member's (sticky locks/)
    finally:
        os.close(fd)


def _old(p: Path, now: float) -> bool:
    try:
        return now - p.lstat().st_mtime > ABANDONED
    except OSError:
        return False


def _clean(cache: Path, now: float, dry_run: bool) -> list[str]:
    """Abandoned fill directories, trash, partial downloads, stale holder
    files, unused locks, temporary files of index writes that a full disk
    interrupted, dead leases."""
    out = []

    def clean(p: Path, how=None) -> None:
        out.append(str(p))
        if dry_run:
            return
        try:
            (how or remove_tree)(p)
        except OSError:
            out.pop()  # another member's (sticky directories), or gone

    spots = [(cache / "e", (".envcrate-", ".trash-")), (cache / "dl", (".part", ".tar"))]
    spots += [(cache / "blobs", (".",)), (cache / "tags", (".",))]  # .<name>.<pid>[.tmp]
    for directory, marks in spots:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            p = directory / name
            if not name.startswith(".") or not any(m in name[1:] for m in marks):
                continue
            if ".trash-" in name or _old(p, now):
                clean(p)
    try:
        names = os.listdir(cache / "locks")
    except OSError:
        names = []
    for name in names:
        p = cache / "locks" / name
        if name.endswith((".lock", ".use")) and _unused_lock(cache, p, now):
            clean(p, _unlink_if_free)
        elif (name.endswith(".holder") or ".holder." in name) and _old(p, now):
            clean(p, os.unlink)  # stale, or the temporary file of an older envcrate
    try:
        keys = os.listdir(cache / "leases")
    except OSError:
        keys = []
    for key in keys:
        leases.holders(cache, key)  # drops dead leases
        out += _clean_lease_dir(cache, key, now, dry_run)
        if not (cache / "e" / key).exists() and not dry_run:
            try:
                os.rmdir(cache / "leases" / key)
            except OSError:
                pass
    return out + _clean_probe_memo(now, dry_run)


def _clean_lease_dir(cache: Path, key: str, now: float, dry_run: bool) -> list[str]:
    """A killed shell's lease in the making (``.lease.*``) and a killed gc's
    mark (``.removing``), older than an hour; through a descriptor of the
    lease directory that follows no symlink, as the leases themselves."""
    from ..fsutil import open_dir

    try:
        dfd = open_dir(leases.lease_dir(cache, key))
    except OSError:
        return []
    out = []
    try:
        for name in os.listdir(dfd):
            if not (name.startswith(".lease.") or name == leases.REMOVING):
                continue
            try:
                if now - os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime <= ABANDONED:
                    continue
                if not dry_run:
                    os.unlink(name, dir_fd=dfd)
                out.append(str(cache / "leases" / key / name))
            except OSError:
                pass
    finally:
        os.close(dfd)
    return out


def _clean_probe_memo(now: float, dry_run: bool) -> list[str]:
    """Temporary files (``<16 hex>.<pid>``) of interpreter-probe memos whose
    writer was interrupted (a full disk), in this user's memo directory."""
    try:
        from .compat import probe_memo

        memo = probe_memo()
        names = os.listdir(memo)
    except (OSError, ImportError):
        return []
    out = []
    for name in names:
        head, _, pid = name.partition(".")
        p = Path(memo, name)
        if len(head) == 16 and pid.isdigit() and _old(p, now):
            out.append(str(p))
            if not dry_run:
                try:
                    os.unlink(p)
                except OSError:
                    out.pop()
    return out
