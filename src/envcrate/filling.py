"""Filling the cache: the cold half of ``ensure`` (see :mod:`envcrate.cache`).

One process per crate takes the crate's lock, fetches the archive, extracts,
verifies and relocates it into a temporary directory beside the final entry,
writes the ready marker last and renames it into place; the others wait and
return the same entry. The rename, not the lock, decides: a filler that finds
the entry already there discards its copy.

Up to the lock, paths are plain strings (no pathlib, no json): every process
that only waits runs this much, hundreds of them at once.
"""

from __future__ import annotations

import errno
import os
import time

from .cache import READY, Ensured, entry_key, find_ready
from .errors import ArchiveError, EnvcrateError, NotFoundError
from .events import Events
from .fsutil import group_shared, make_dirs_under, unlink_quietly
from .ids import blob_digest, normalize_id

HEARTBEAT = 2.0  # seconds between a filler's holder-file touches
STALE = 30.0  # a holder silent this long (e.g. on a dead host) is ignored
LOCK_WAIT = 600.0  # seconds a waiter waits for a live holder at most, then fills itself
LOCK_WAIT_VAR = "ENVCRATE_LOCK_WAIT"  # overrides LOCK_WAIT (seconds)


def _lock_wait() -> float:
    try:
        return max(0.0, float(os.environ[LOCK_WAIT_VAR]))
    except (KeyError, ValueError):
        return LOCK_WAIT


def writable_cache(caches: list[str]) -> str:
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


def ensure_cold(
    ref: str,
    crate_id: str | None,
    store,
    caches: list[str],
    python: str | None,
    sha256: str | None,
    ev: Events,
    progress: bool,
) -> Ensured:
    """Fill the cache for ``ref``, whose crate id the warm path found (and
    found not ready) or could not know without the store."""
    caches = [os.path.abspath(c) for c in caches]
    source = _source(ref, crate_id, store, sha256)
    if crate_id is None and isinstance(source, _StoreCrate):
        crate_id = source.crate_id  # resolved in the store just now: maybe ready after all
        ev.crate = crate_id
        if normalize_id(ref) is None:
            _remember_tag(caches, ref, crate_id)
        found = find_ready(caches, crate_id, python)
        if found is not None:
            c, key, _ = found
            return Ensured(crate_id, os.path.join(c, "e", key), "HIT", c, key, 0)
    return _fill(source, crate_id, caches, python, ev, progress)


def _source(ref: str, crate_id: str | None, store, sha256: str | None) -> _Source:
    """Where the archive of ``ref`` comes from (a ref that names neither an
    archive nor a known crate is resolved in the store)."""
    if os.path.isfile(ref):
        return _ArchiveFile(ref, sha256)
    if ref.startswith(("http://", "https://", "file://")):
        if not sha256:
            raise EnvcrateError(
                f"{ref.split('?', 1)[0]} is an archive URL: give its digest with --sha256"
            )
        return _ArchiveUrl(ref, blob_digest(sha256))
    if crate_id is not None:
        return _StoreCrate(store, crate_id)
    from .stores import open_store

    opened = open_store(store)
    return _StoreCrate(opened, opened.resolve(ref))


def _remember_tag(caches: list[str], tag: str, crate_id: str) -> None:
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
    from .fsutil import make_temp, open_dir, write_all

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


# ---------------------------------------------------------------- sources of archives


class _Source:
    def manifest(self, dl: str, ev: Events):
        raise NotImplementedError

    def archive(self, dl: str, ev: Events, progress: bool) -> tuple[str, str | None, bool]:
        """(archive path, expected blob digest, whether the path is a download)."""
        raise NotImplementedError


class _ArchiveFile(_Source):
    def __init__(self, path: str, sha256: str | None):
        self.path = os.path.abspath(path)
        self.blob = blob_digest(sha256) if sha256 else None

    def manifest(self, dl, ev):
        from .unpacker import read_manifest

        return read_manifest(self.path)

    def archive(self, dl, ev, progress):
        if self.blob is None:
            from .record import recorded_blob

            self.blob = recorded_blob(self.path)
        return self.path, self.blob, False


class _ArchiveUrl(_Source):
    def __init__(self, url: str, blob: str):
        self.url = url
        self.blob = blob
        self.path: str | None = None

    def _download(self, dl: str, ev: Events, progress: bool) -> str:
        if self.path is None:
            if self.url.startswith("file://"):
                from urllib.parse import unquote, urlparse

                self.path = unquote(urlparse(self.url).path)
                return self.path
            from .progress import bar
            from .stores.http import download_url

            ev.emit("DOWNLOADING", url=self.url.split("?", 1)[0])
            name = f".{self.blob.split(':', 1)[1]}.{_me()}.tar"
            with bar(0, "downloading", progress) as tick:
                self.path = str(download_url(self.url, dl, name, self.blob, tick))
        return self.path

    def manifest(self, dl, ev):
        from .unpacker import read_manifest

        return read_manifest(self._download(dl, ev, False))

    def archive(self, dl, ev, progress):
        path = self._download(dl, ev, progress)
        return path, self.blob, not self.url.startswith("file://")


class _StoreCrate(_Source):
    def __init__(self, store, crate_id: str):
        self._store = store
        self.crate_id = crate_id
        self.record: dict | None = None

    @property
    def store(self):
        from .stores import open_store

        self._store = open_store(self._store)
        return self._store

    def manifest(self, dl, ev):
        from .record import manifest_of

        if self.record is None:
            self.record = self.store.record(self.crate_id)
            if self.record is None:
                raise NotFoundError(f"crate {self.crate_id} is not in {self.store.url}")
        return manifest_of(self.record)

    def archive(self, dl, ev, progress):
        from .stores import blob_key
        from .stores.base import preferred_archive

        archives = self.record.get("archives", [])
        if not archives:
            raise NotFoundError(f"{self.crate_id} has no archive in {self.store.url}")
        a = preferred_archive(archives)
        root = getattr(self.store, "root", None)
        if root is not None:  # a directory store: read the blob in place
            ev.emit("DOWNLOADING", bytes=a.get("size"), store=self.store.url)
            return os.path.join(root, blob_key(a["blob"])), a["blob"], False
        from .fsutil import make_temp
        from .progress import bar

        # A new file of an unguessable name (sticky dl/: nobody else may
        # replace it): no symlink planted in advance can be written through.
        fd, tmp = make_temp(dl, f".{a['blob'].split(':', 1)[1]}.{_me()}.", ".part", 0o600)
        os.close(fd)
        try:
            ev.emit("DOWNLOADING", bytes=a.get("size"), store=self.store.url)
            with bar(a.get("size", 0), "downloading", progress) as tick:
                self.store.download(blob_key(a["blob"]), tmp, tick, size=a["size"])
        except BaseException:
            unlink_quietly(tmp)
            raise
        return str(tmp), a["blob"], True


# --------------------------------------------------------------------------- filling


def _fill(
    source: _Source,
    crate_id: str | None,
    caches: list[str],
    python: str | None,
    ev: Events,
    progress: bool,
) -> Ensured:
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
    with _CrateLock(cache, name, ev, ready) as lock:
        found = ready()
        if found is not None:
            c, k, _ = found
            return Ensured(
                crate_id, os.path.join(c, "e", k), "WAITED" if lock.waited else "HIT", c, k, 0
            )
        from pathlib import Path  # only the filler gets here

        from .compat import check_host, probe_memo, require_supported_os
        from .unpacker import interpreter_for, read_head

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
                    from .unpacker import _check_blob

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
            from .unpacker import fill

            placed = fill(
                path,
                entry,
                manifest,
                interpreter,
                blob=blob,
                crate_id=crate_id,
                progress=progress,
                phase=ev.emit,
                seal=lambda tmp: _seal(tmp, manifest, blob, interp_path),
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


def _not_the_crate(source: _Source, got: str, crate_id: str):
    from .errors import DigestMismatchError

    return DigestMismatchError(
        f"{ref_of(source)} holds crate {got}, not {crate_id} (or its manifest differs from its "
        "record); it is corrupt or was replaced"
    )


def ref_of(source: _Source) -> str:
    """What ``source`` is, for a message."""
    for attr in ("url", "path"):
        value = getattr(source, attr, None)
        if value:
            return str(value).split("?", 1)[0]
    return "the archive"


def _index_blob(cache: str, blob: str, crate_id: str) -> None:
    """Remember blob digest -> crate, so an archive URL is a warm hit next time."""
    try:
        make_dirs_under(cache, os.path.join(cache, "blobs"), sticky=True)
        _write_index(os.path.join(cache, "blobs", blob.split(":", 1)[1]), crate_id)
    except OSError:
        pass  # a full disk, or (sticky blobs/) another member's file is there


def _seal(tmp: str, manifest, blob: str | None, interpreter: str | None) -> None:
    """Write the ready marker (with the digests of what relocation changed,
    for ``verify``), then make the tree read-only."""
    import socket

    from .fsutil import sha256_file

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
    make_read_only(tmp, [READY, *copies])


def make_read_only(root: str, files: list[str] = ()) -> None:
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
    from .fsutil import remove_tree

    for entry in os.listdir(os.path.join(cache, "e")):
        if entry.startswith(f".{name}") and ".envcrate-" in entry:
            try:
                remove_tree(os.path.join(cache, "e", entry))
            except PermissionError:
                pass  # another member's (sticky e/): theirs to clean, or gc's as them


def _me() -> str:
    """``<host>-<pid>``: names a download so that only its own host judges it."""
    from .leases import this_host

    return f"{this_host().replace('.', '_')}-{os.getpid()}"


def _clean_dead_downloads(dl: str) -> None:
    """Partial downloads (``.<blob>.<host>-<pid>.<random>.part``, or without
    ``<random>`` from an older envcrate) of this host's processes that are
    gone. Removing a name never follows a symlink."""
    try:
        names = os.listdir(dl)
    except OSError:
        return
    host = _me().rsplit("-", 1)[0]
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


class _Tick(Exception):
    """Raised by the SIGALRM handler to end a blocking wait for the lock."""


def _try_lock(fd: int, fcntl) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        return False


def _wait_for_lock(fd: int, fcntl, seconds: float) -> bool:
    """Wait at most ``seconds`` for the crate lock; True once it is held.

    In the main thread, when SIGALRM is nobody else's, the wait blocks in the
    kernel, which wakes the waiter the moment the filler lets go, and an
    interval timer ends it after ``seconds``. Elsewhere (another thread, or
    SIGALRM in use by the program) it tries the lock every 0.1 s: one
    ``lockf`` call a time, so hundreds of waiters cost the filler little.
    """
    import signal

    armed = True

    def tick(signum, frame):
        if armed:
            raise _Tick

    try:
        in_use = signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
        if in_use or signal.getitimer(signal.ITIMER_REAL)[0]:
            raise ValueError("SIGALRM is in use")
        signal.signal(signal.SIGALRM, tick)  # ValueError outside the main thread
    except ValueError:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if _try_lock(fd, fcntl):
                return True
        return False
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        armed = False
        return True
    except _Tick:
        armed = False
        # The tick may have come just after the lock was taken: a process
        # that holds a POSIX lock gets it again at once.
        return _try_lock(fd, fcntl)
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)  # before the default (which kills) is back
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


class _CrateLock:
    """The crate's POSIX record lock (fcntl.lockf, which NFS forwards to lockd), plus a holder file whose mtime is a
    heartbeat, for waiters on other hosts or where fcntl locks are node-local.
    ``ready()`` tells the waiters that they may stop waiting."""

    def __init__(self, cache: str, key: str, ev: Events, ready):
        self.cache = cache
        self.key = key
        self.ev = ev
        self.ready = ready
        self.lock_path = os.path.join(cache, "locks", f"{key}.lock")
        self.holder_path = os.path.join(cache, "locks", f"{key}.holder")
        self.held = False
        self.waited = False
        self._stop = None  # a threading.Event, made by the filler only: waiters skip the import
        self._beat = None
        self._holder_fd = None

    def __enter__(self) -> _CrateLock:
        # fcntl directly rather than filelock: importing filelock costs each of
        # the hundreds of processes that may start at once about 50 ms.
        import fcntl

        from .fsutil import create_file, shared_mode

        try:  # group-writable in a shared cache: lockf needs O_RDWR
            self._fd = create_file(self.lock_path, shared_mode(self.cache), os.O_RDWR)
        except OSError:
            # Another user's lock file that we may not open (made by an older
            # envcrate), or a symlink, FIFO... planted under its name: fill
            # without it; the rename decides.
            self._fd = None
        if self.ready() is not None:
            return self
        # A member may hold the lock and keep its heartbeat fresh forever:
        # after this long a waiter fills itself (the rename decides).
        give_up = time.monotonic() + _lock_wait()
        while self._fd is not None:
            if _try_lock(self._fd, fcntl):
                self.held = True
                break
            if not self.waited:
                self.waited = True
                self.ev.emit("WAITING", holder=self._holder())
            if _wait_for_lock(self._fd, fcntl, HEARTBEAT):
                self.held = True
                break
            # The lock stayed taken for a heartbeat period.
            if self.ready() is not None:  # filled from another host
                return self
            holder = self._holder()
            if holder is not None and time.time() - holder["beat"] > STALE:
                # A silent holder (another host died, or fcntl locks are
                # node-local here): fill ourselves; the rename decides.
                break
            if time.monotonic() >= give_up:
                break
        if self.ready() is None:
            import threading

            self._write_holder()
            self._stop = threading.Event()
            self._beat = threading.Thread(target=self._heartbeat, daemon=True)
            self._beat.start()
        return self

    def _holder(self) -> dict | None:
        """{"host", "pid", "beat"} of the filler; the file is two plain lines
        (waiters do not import json for it)."""
        from .fsutil import open_regular

        try:  # a regular file only, and only its start: nothing planted hangs or floods us
            fd = open_regular(self.holder_path)
            try:
                head = os.read(fd, 512)
                beat = os.fstat(fd).st_mtime
            finally:
                os.close(fd)
            host, pid = head.decode("utf-8", "replace").split("\n")[:2]
            return {"host": host, "pid": int(pid), "beat": beat}
        except (OSError, ValueError):
            return None

    def _write_holder(self) -> None:
        """Written in place, no temporary file: a sticky ``locks/`` forbids
        replacing another member's holder file by a rename, and a full disk
        would leave the temporary file behind. (Readers take a short or
        empty file for no holder, and read only its first two lines.) Never
        through a symlink or onto anything but a regular file; only a file
        of our own is truncated (another member's is overwritten from its
        start). The descriptor stays open for the heartbeat, which touches
        the file through it: a member who replaces the name by a symlink
        meanwhile touches nothing of ours."""
        from .fsutil import create_file, shared_mode, write_all_at

        try:
            fd = create_file(self.holder_path, shared_mode(self.cache), os.O_WRONLY, truncate=True)
        except OSError:
            return  # waiters elsewhere then see no heartbeat, and fill too
        try:
            write_all_at(fd, f"{os.uname().nodename}\n{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._holder_fd = fd

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self._holder_fd)
            except (OSError, TypeError):
                pass

    def __exit__(self, *exc) -> None:
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            if self._holder_fd is not None:
                os.close(self._holder_fd)
                self._holder_fd = None
            try:
                os.unlink(self.holder_path)
            except OSError:
                pass  # another member's file (sticky locks/), written in place
        if self._fd is None:
            return
        if self.held:
            import fcntl

            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
