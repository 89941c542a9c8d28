"""The cold path of a bootstrap script (``envcrate bootstrap``): what the
script's embedded Python runs on a node where no cache has the crate ready.

It is :func:`envcrate.node.ensure.ensure_crate`, with a ``locate`` that picks
the archive from the places the script names: an archive staged beside the
script (or in ``$ENVCRATE_BOOT_DIR``, or the current directory), a directory
store's blob path (a shared filesystem), or URLs (an HTTP(S) store, presigned
S3). The blob digest is the script's, checked before anything becomes
visible. ``tar.zst`` is taken when the node can decompress zstd
(:mod:`envcrate.crate.zstdio`), else ``tar.gz`` when the store has one.

Runs under Python 3.6+ with the standard library only; :mod:`envcrate.bootstrap`
writes the script and the modules it carries.
"""

import os
import sys

from ..errors import EnvcrateError, NotFoundError
from .sources import ArchiveFile, ArchiveUrl


def main(config: dict, argv: "list[str]") -> int:
    """``argv``: mode (``prefix``, ``run``, ``activate``, or ``event``), the
    pid of the script's shell (for ``event``: the state), the caches
    (``:``-separated) and the script's directory (or empty). Prints the
    prefix, and for ``activate`` also the shell's lease (taken here, under
    the entry's use lock)."""
    mode, arg, caches, here = (argv + ["", "", "", ""])[:4]
    if mode == "event":
        return _event(config, arg)
    cache_dirs = [c for c in caches.split(":") if c]
    if any("\n" in c for c in cache_dirs):
        print("envcrate: error: a cache path holds a newline; use another", file=sys.stderr)
        return 1
    # run: the shell execs the command (same pid); activate: it is the shell
    # that sourced the script, whose lease deactivate removes
    lease = int(arg) if mode in ("run", "activate") else None
    from .ensure import ensure_crate

    try:
        done = ensure_crate(
            config["id"],
            cache_dirs,
            locate=lambda ref, crate_id: locate(config, here),
            python=config.get("python"),
            lease=lease,
            progress=None,
            report=config.get("report"),
        )
    except KeyboardInterrupt:
        print("envcrate: interrupted", file=sys.stderr)
        return 130
    except (EnvcrateError, OSError) as e:
        print("envcrate: error: %s" % _message(e), file=sys.stderr)
        return 1
    out = done.path + "\n"
    if mode == "activate" and done.lease:
        out += done.lease + "\n"  # the shell's own: deactivate removes it
    sys.stdout.write(out)
    return 0


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, EnvcrateError):
        where = " (%s)" % e.filename if getattr(e, "filename", None) else ""
        return "%s%s" % (e.strerror or e, where)
    return str(e)


def locate(config: dict, here: str):
    """The :class:`~envcrate.node.sources.Source` of the crate's archive: a
    staged or shared-filesystem file first, then a URL; ``tar.zst`` first
    when zstd can be decompressed here."""
    from ..crate.zstdio import backend, missing_message

    archives = config["archives"]
    usable = [a for a in archives if a["format"] == "tar.gz" or backend() is not None]
    if not usable:
        raise EnvcrateError(missing_message() if archives else "the script names no archive")
    usable.sort(key=lambda a: a["format"] != "tar.zst")
    dirs = [d for d in (os.environ.get("ENVCRATE_BOOT_DIR"), here, os.getcwd()) if d]
    looked = []
    for a in usable:
        names = [os.path.join(d, a["staged"]) for d in dirs] if a.get("staged") else []
        for path in names + list(a.get("paths", ())):
            looked.append(path)
            if _has_size(path, a.get("size")):  # junk under the name is passed over
                return ArchiveFile(path, a["blob"])
    for a in usable:
        for url in a.get("urls", ()):
            return ArchiveUrl(url, a["blob"])
    raise NotFoundError(
        "no archive of %s here: none of %s exists (stage one beside the script, or mount "
        "the store)" % (config["id"], ", ".join(looked) or "the script's paths")
    )


def _has_size(path: str, size) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_mode & 0o170000 == 0o100000 and (size is None or st.st_size == size)


def _event(config: dict, state: str) -> int:
    """One event from the script's warm path, for a report sh cannot write
    (``s3://``: the upload is signed)."""
    from .events import Events

    ev = Events(None, config.get("report"))
    ev.crate = config["id"]
    ev.emit(state, prefix=os.environ.get("_ENVCRATE_ENTRY") or None)
    return 0
