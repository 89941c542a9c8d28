"""Shipping: crates go to a store, before a run, from the client.

``push`` publishes an archive already packed; ``ship`` works out the crate id
of an env first and uploads nothing (and packs nothing) when the store already
has the crate in that format, intact. Both verify an archive completely
(structure, file table, every file's digest, blob digest) before anything of
it is published, and neither replaces an intact published archive of the
format by other bytes (:meth:`Store.publish`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .crate.container import detect_format
from .crate.record import recorded_blob
from .envs import load_env
from .errors import ArchiveError, EnvcrateError
from .packing import identify, pack_source, resolve_format
from .progress import bar
from .stores import Store, check_tag, open_store


@dataclass(frozen=True)
class Shipped:
    """A crate as published in a store."""

    id: str
    blob: str
    size: int
    format: str
    store: str
    uploaded: bool
    seconds: float
    kept: bool = False  # the store had the crate in this format with other bytes, intact


def _verified(path: Path, blob: str | None) -> str:
    """The blob digest of ``path``, computed while verifying it completely;
    a one-line ArchiveError saying nothing was published otherwise."""
    from .crate.verify import verify_archive

    try:
        return verify_archive(path, blob).blob
    except ArchiveError as e:
        where = "" if str(path) in str(e) else f"{path}: "
        raise type(e)(f"{where}{e}; nothing was published: pack the env again") from None


def push(
    archive: str | os.PathLike,
    store: Store | str | None = None,
    *,
    tag: str | None = None,
    progress: bool = False,
) -> Shipped:
    """Publish a packed archive: blob, then record, then tag."""
    start = time.monotonic()
    store = open_store(store)
    if tag is not None:
        check_tag(tag)
    path = Path(archive)
    fmt = detect_format(str(path))
    from .crate.head import read_manifest

    manifest = read_manifest(path)
    size = path.stat().st_size
    blob = _verified(path, recorded_blob(path, fmt))
    with bar(size, f"pushing {path.name}", progress) as tick:
        done = store.publish(path, manifest.data, fmt, blob, size, tag=tag, progress=tick)
    return Shipped(
        manifest.id,
        done.blob,
        done.size,
        fmt,
        store.url,
        done.uploaded,
        time.monotonic() - start,
        done.kept,
    )


def ship(
    env: str | os.PathLike | None = None,
    store: Store | str | None = None,
    *,
    tag: str | None = None,
    format: str | None = None,
    level: int | None = None,
    threads: int | None = None,
    exclude: tuple[str, ...] = (),
    allow=(),
    name: str | None = None,
    progress: bool = False,
) -> Shipped:
    """Pack ``env`` and publish it, unless the store already has the crate
    in that format with its blob intact (recorded size; for a directory store
    also its digest): a damaged or missing blob is packed and uploaded again."""
    start = time.monotonic()
    store = open_store(store)
    store.require_writable()
    if tag is not None:
        check_tag(tag)
    fmt = resolve_format(format, None)
    source = load_env(env, exclude, allow, name)
    crate_id = identify(source)
    have = store.archive(crate_id, fmt)
    if have is not None:
        if tag is not None:
            store.set_tag(crate_id, tag)
        return Shipped(
            crate_id, have["blob"], have["size"], fmt, store.url, False, time.monotonic() - start
        )
    staging = getattr(store, "staging_dir", None)
    work = Path(tempfile.mkdtemp(prefix=".envcrate-ship-", dir=staging() if staging else None))
    try:
        crate = pack_source(
            source, work, format=fmt, level=level, threads=threads, progress=progress
        )
        if crate.id != crate_id:
            raise EnvcrateError(f"{source.prefix} changed while it was being shipped; try again")
        blob = _verified(crate.archive, crate.blob)
        with bar(crate.size, f"uploading {crate.archive.name}", progress) as tick:
            done = store.publish(
                crate.archive,
                crate.manifest.data,
                fmt,
                blob,
                crate.size,
                tag=tag,
                move=True,
                progress=tick,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Shipped(
        crate.id,
        done.blob,
        done.size,
        fmt,
        store.url,
        done.uploaded,
        time.monotonic() - start,
        done.kept,
    )
