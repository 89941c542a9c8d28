"""``ensure``: a ref becomes the prefix of a ready, relocated env, the cache
filled once however many processes ask.

The story: know the crate id without a store where possible (a crate id, a
cached prefix of one, an archive's checked head, an archive URL whose digest
was seen before) and look for a ready entry in each cache (the warm path:
:mod:`envcrate.node.cache`, no lock, almost no imports). Otherwise find the
archive (a path, a URL, or what the caller's ``locate`` returns, such as a
store's) and fill the cache (:mod:`envcrate.node.fill`). A lease, when asked
for, is taken before the prefix is returned, so no ``gc`` removes it between.
"""

import os
import time

from ..errors import EnvcrateError, NotFoundError
from ..ids import ARCHIVE_SUFFIXES, blob_digest, looks_like_path, missing_hint, normalize_id
from .cache import Ensured, cache_list, find_ready, known_id, read_ready, stamp
from .events import Events

URL_SCHEMES = ("http://", "https://", "file://")


def ensure_crate(
    ref: str,
    cache=None,
    *,
    locate=None,
    python: "str | None" = None,
    sha256: "str | None" = None,
    events: "str | os.PathLike | None" = None,
    lease: "int | str | None" = None,
    progress: "bool | None" = False,
    report: "str | None" = None,
) -> "Ensured":
    """Materialise ``ref`` (an archive path, an archive URL with ``sha256``, a
    crate id or 12+ hex prefix, or a tag) into the first writable of
    ``cache`` (a directory or a list, searched in order) and return where.

    ``locate(ref, crate_id)`` returns the :class:`~envcrate.node.sources.Source`
    of a ref that is neither an archive nor a URL (``crate_id`` None: not
    known yet), for instance from a store; without it such a ref must be
    ready in a cache. With ``lease`` (a pid), the entry is leased for that
    process before it is returned. ``progress`` None: shown when stderr is
    a terminal. ``report``: a report location that also gets the events
    (:mod:`envcrate.node.report`)."""
    start = time.monotonic()
    ev = Events(events, report)
    caches = cache_list(cache)
    ev.emit("RESOLVING", ref=ref)
    try:
        crate_id = known_id(ref, caches, sha256)
        ev.crate = crate_id  # every later event names it
        url = ref.startswith(URL_SCHEMES)
        for _ in range(5):
            found = (
                find_ready(caches, crate_id, python, blob_digest(sha256) if url else None)
                if crate_id
                else None
            )
            if found is not None:
                c, key, _ = found
                done = Ensured(crate_id, os.path.join(c, "e", key), "HIT", c, key, 0)
            else:
                done = _cold(ref, crate_id, locate, caches, python, sha256, ev, progress)
            if lease is None or _lease(done, lease):
                return _done(ev, done, start)
            crate_id = done.id  # gc removed it just before the lease: ensure again
        raise EnvcrateError(f"{done.path} was removed (by gc) each time it was leased; try again")
    except BaseException as e:
        if isinstance(e, (EnvcrateError, OSError)):
            ev.emit("FAILED", error=str(e))
        raise


def _cold(ref, crate_id, locate, caches, python, sha256, ev, progress) -> "Ensured":
    """Fill the cache for ``ref``, whose crate id the warm path found (and
    found not ready) or could not know without the store."""
    from ..progress import wanted
    from .fill import fill_cache, remember_tag

    caches = [os.path.abspath(c) for c in caches]
    source = _source(ref, crate_id, locate, sha256, caches)
    if crate_id is None and getattr(source, "crate_id", None):
        crate_id = source.crate_id  # resolved in the store just now: maybe ready after all
        ev.crate = crate_id
        if normalize_id(ref) is None:
            remember_tag(caches, ref, crate_id)
        found = find_ready(caches, crate_id, python)
        if found is not None:
            c, key, _ = found
            return Ensured(crate_id, os.path.join(c, "e", key), "HIT", c, key, 0)
    return fill_cache(source, crate_id, caches, python, ev, wanted(progress))


def _source(ref: str, crate_id: "str | None", locate, sha256: "str | None", caches: "list[str]"):
    """Where the archive of ``ref`` comes from."""
    from .sources import ArchiveFile, ArchiveUrl

    if os.path.isfile(ref):
        return ArchiveFile(ref, sha256)
    if ref.startswith(URL_SCHEMES):
        if not sha256:
            raise EnvcrateError(
                f"{ref.split('?', 1)[0]} is an archive URL: give its digest with --sha256"
            )
        return ArchiveUrl(ref, blob_digest(sha256))
    if looks_like_path(ref) or (locate is None and ref.endswith(ARCHIVE_SUFFIXES)):
        raise NotFoundError(f"no such archive: {ref}")
    if locate is None:
        raise NotFoundError(
            f"{ref} is not ready in {', '.join(caches)}{missing_hint(ref)} and there is no "
            "store to fetch it from"
        )
    return locate(ref, crate_id)


def _lease(done: "Ensured", lease: "int | str") -> bool:
    """Lease the entry for ``lease`` (a pid, or a name such as ``ttl-<pid>``)
    under its shared use lock, then check it is still the entry found: False
    (and no lease) if ``gc`` removed it meanwhile. A cache this process may
    not write gets no lease, with a warning: the entry is used all the same."""
    from . import leases

    fd = leases.lock_use(done.cache, done.key, exclusive=False)
    try:
        try:
            done.lease = leases.add(done.cache, done.key, lease)
        except OSError as e:
            import sys

            print(
                f"envcrate: warning: cannot lease {done.path} ({e.strerror}): "
                "the cache's owner may remove it while it is in use",
                file=sys.stderr,
            )
            return read_ready(done.path) is not None
        ready = read_ready(done.path)
        if ready is None or ready[0] != done.id:
            leases.drop(done.lease)
            done.lease = None
            return False
        return True
    finally:
        leases.unlock(fd)


def _done(ev: "Events", done: "Ensured", start: float) -> "Ensured":
    stamp(done.cache, done.key)
    ev.crate = done.id
    ev.emit(done.state if done.state != "WAITED" else "READY", prefix=done.path)
    done.seconds = time.monotonic() - start
    return done
