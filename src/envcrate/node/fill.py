"""Filling the cache: the cold half of ``ensure`` (see :mod:`envcrate.node.ensure`).

One process per crate takes the crate's lock, fetches the archive, extracts,
verifies and relocates it into a temporary directory beside the final entry,
writes the ready marker last and renames it into place; the others wait and
return the same entry. The rename, not the lock, decides: a filler that finds
the entry already there discards its copy.

Up to the lock, paths are plain strings (no pathlib, no json): every process
that only waits runs this much, hundreds of them at once.
"""

import os
import time

from ..errors import ArchiveError, EnvcrateError
from ..fsutil import group_shared, make_dirs_under, unlink_quietly
from .cache import READY, Ensured, entry_key, find_ready
from .events import Events
from .lock import CrateLock
from .sources import Source, ref_of, this_process


def writable_cache(caches: "list[str]") -> str:
    for cache in caches:
        probe = cache
        while not os.path.exists(probe) and probe != os.path.dirname(probe):
            probe = os.path.dirname(probe)
        e = os.path.join(cache, "e")
        if os.access(probe, os.W_OK | os.X_OK) and (
            not os.path.exists(e) or os.access(e, os.W_OK | os.X_OK)
        ):
            return cache
    raise EnvcrateError(
        f"no writable cache among {', '.join(map(str, caches))}; "
        "pass a writable --cache DIR (or set ENVCRATE_CACHE)"
    )


def remember_tag(caches: "list[str]", tag: str, crate_id: str) -> None:
    for c in caches:
        try:
            make_dirs_under(c, os.path.join(c, "tags"))
            _write_index(os.path.join(c, "tags", tag), crate_id)
            return
        except OSError:
            continue


def _write_index(path: str, crate_id: str) -> None:
    """Write a small index file (``0644``, whatever the umask) through a
    temporary file of a random name beside it (made new, ``O_EXCL``: no
    name another member could plant a symlink under), which a failure (a
    full disk) removes. The directory is opened without following a
    symlink, and the temporary file is renamed relative to it."""
    from ..fsutil import make_temp, open_dir, write_all

    d, name = os.path.split(path)
    dfd = open_dir(d)
    try:
        fd, tmp = make_temp(d, f".{name}.", ".tmp", 0o644, dir_fd=dfd)
        try:
            try:
                write_all(fd, (crate_id + "\n").encode())
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
    finally:
        os.close(dfd)


def fill_cache(
    source: "Source",
    crate_id: "str | None",
    caches: "list[str]",
    python: "str | None",
    ev: "Events",
    progress: bool,
) -> "Ensured":
    cache = writable_cache(caches)
    dl = os.path.join(cache, "dl")
    for d in ("dl", "e", "locks"):  # sticky when shared: see cache_layout.md
        make_dirs_under(cache, os.path.join(cache, d), sticky=True)
    if crate_id is None:  # an archive URL not seen before: its manifest names it
        # (unchecked here: the fill refuses an archive that is not that crate)
        crate_id = source.manifest(dl, ev).id
        ev.crate = crate_id
    name = crate_id.split(":", 1)[1][:16]

    def ready():
        return find_ready(caches, crate_id, python)

    # One lock per crate, taken before the interpreter is probed: the
    # processes that only wait never start a Python to probe.
    with CrateLock(cache, name, ev, ready) as lock:
        found = ready()
        if found is not None:
            c, k, _ = found
            return Ensured(
                crate_id, os.path.join(c, "e", k), "WAITED" if lock.waited else "HIT", c, k, 0
            )
        from pathlib import Path  # only the filler gets here

        from ..crate.head import read_head
        from ..crate.platform import require_supported_os
        from .compat import check_host, probe_memo
        from .unpack import interpreter_for

        require_supported_os()
        manifest = source.manifest(dl, ev)
        if manifest.id != crate_id:
            raise _not_the_crate(source, manifest.id, crate_id)
        check_host(manifest.platform)
        if lock.held:
            _clean_abandoned(cache, name)
        _clean_dead_downloads(dl)
        path, blob, downloaded = source.archive(dl, ev, progress)
        try:
            # The archive's head, checked against the crate id, before the
            # interpreter its manifest names is looked for (a store record
            # alone is not checked against anything).
            try:
                head = read_head(path)
            except ArchiveError:
                if blob:  # say what is wrong with the bytes, not where it showed first
                    from .unpack import _check_blob

                    _check_blob(path, blob)
                raise
            if head.id != crate_id or head.data != manifest.data:
                raise _not_the_crate(source, head.id, crate_id)
            interpreter = interpreter_for(manifest, python, probe_memo())
            interp_path = interpreter.executable if interpreter is not None else None
            found = find_ready(caches, crate_id, interp_path)  # --python named a venv's python
            if found is not None:
                c, k, _ = found
                state = "WAITED" if lock.waited else "HIT"
                return Ensured(crate_id, os.path.join(c, "e", k), state, c, k, 0)
            key = entry_key(crate_id, interp_path)
            entry = Path(cache, "e", key)
            from .unpack import fill

            placed = fill(
                path,
                entry,
                manifest,
                interpreter,
                blob=blob,
                crate_id=crate_id,
                progress=progress,
                phase=ev.emit,
                seal=lambda tmp: _seal(tmp, manifest, blob, interp_path, str(entry)),
                read_only=True,
                group=group_shared(cache),
            )
        finally:
            if downloaded:
                unlink_quietly(path)
        if not placed and find_ready([cache], crate_id, interp_path) is None:
            # Something else sits at the entry's name (another member's, in a
            # shared cache, that only its owner can remove).
            raise EnvcrateError(
                f"{entry} exists but is not a ready entry of {crate_id}; "
                "remove it (envcrate gc --cache, as its owner) or use another --cache"
            )
        if blob:
            _index_blob(cache, blob, crate_id)
        return Ensured(crate_id, str(entry), "READY" if placed else "WAITED", cache, key, 0)


def _not_the_crate(source: "Source", got: str, crate_id: str):
    from ..errors import DigestMismatchError

    return DigestMismatchError(
        f"{ref_of(source)} holds crate {got}, not {crate_id} (or its manifest differs from its "
        "record); it is corrupt or was replaced"
    )


def _index_blob(cache: str, blob: str, crate_id: str) -> None:
    """Remember blob digest -> crate, so an archive URL is a warm hit next time."""
    try:
        make_dirs_under(cache, os.path.join(cache, "blobs"), sticky=True)
        _write_index(os.path.join(cache, "blobs", blob.split(":", 1)[1]), crate_id)
    except OSError:
        pass  # a full disk, or (sticky blobs/) another member's file is there


def _seal(tmp: str, manifest, blob: "str | None", interpreter: "str | None", entry: str) -> None:
    """Write the activation profile for bootstrap scripts and the ready
    marker (with the digests of what relocation changed, for ``verify``),
    then make the tree read-only."""
    from .activation import PROFILE, profile_sh

    with open(os.path.join(tmp, PROFILE), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(profile_sh(entry, manifest.kind, tmp))
    import socket

    from ..fsutil import sha256_file

    local = {}
    copies = (
        [link["path"] for link in manifest.venv.get("base_links", [])]
        if manifest.kind == "venv"
        else []
    )
    changed = {r["path"] for r in manifest.prefix_files} | {"pyvenv.cfg", *copies}
    for rel in sorted(changed):
        p = os.path.join(tmp, rel)
        if os.path.islink(p):
            local[rel] = ["l", os.readlink(p)]
        elif os.path.isfile(p):
            local[rel] = ["f", sha256_file(p)[0]]
    marker = {
        "id": manifest.id,
        "blob": blob,
        "name": manifest.data.get("name"),
        "kind": manifest.kind,
        "interpreter": interpreter,
        "bytes": manifest.file_bytes,
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "local": local,
    }
    import json

    with open(os.path.join(tmp, READY), "w", encoding="utf-8", errors="surrogateescape") as f:
        # Plain lines read by the warm path (cache.read_ready), then JSON.
        f.write(f"{manifest.id}\n{interpreter or ''}\n{blob or ''}\n")
        json.dump(marker, f, sort_keys=True)
    make_read_only(tmp, [READY, PROFILE, *copies])


def make_read_only(root: str, files: "list[str]" = ()) -> None:
    """Directories ``0555`` (found by ``d_type``, no stat per file); of the
    files only ``files`` are changed: the extracted ones have no write bits
    already, and relocation keeps the mode of what it rewrites."""
    for rel in files:
        p = os.path.join(root, rel)
        if os.path.isfile(p) and not os.path.islink(p):
            os.chmod(p, 0o555 if os.stat(p).st_mode & 0o111 else 0o444)

    def visit(d: str) -> None:
        with os.scandir(d) as it:
            subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
        for sub in subdirs:
            visit(sub)
        os.chmod(d, 0o555)

    visit(root)


def _clean_abandoned(cache: str, name: str) -> None:
    """Leftovers of killed fillers of this crate (we hold its lock)."""
    from ..fsutil import remove_tree

    for entry in os.listdir(os.path.join(cache, "e")):
        if entry.startswith(f".{name}") and ".envcrate-" in entry:
            try:
                remove_tree(os.path.join(cache, "e", entry))
            except PermissionError:
                pass  # another member's (sticky e/): theirs to clean, or gc's as them


def _clean_dead_downloads(dl: str) -> None:
    """Partial downloads (``.<blob>.<host>-<pid>.<random>.part``, or without
    ``<random>`` from an older envcrate) of this host's processes that are
    gone. Removing a name never follows a symlink."""
    try:
        names = os.listdir(dl)
    except OSError:
        return
    host = this_process().rsplit("-", 1)[0]
    for name in names:
        parts = name.split(".")
        if len(parts) not in (4, 5) or parts[-1] not in ("part", "tar"):
            continue
        who, _, pid = parts[2].rpartition("-")
        if who != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(dl, name))
            except OSError:
                pass  # gone, or another member's (sticky dl/)
        except OSError:
            pass
