"""Shipping: crates go to a store, before a run, from the client.

``push`` publishes an archive already packed; ``ship`` works out the crate id
of an env first and uploads nothing (and packs nothing) when the store already
has the crate in that format.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .envs import load_env
from .errors import DigestMismatchError, EnvcrateError
from .packer import identify, pack_source, resolve_format
from .progress import bar
from .reading import detect_format
from .record import recorded_blob
from .stores import Store, check_tag, file_digest, open_store


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
    from .unpacker import read_manifest

    manifest = read_manifest(path)
    blob = file_digest(path)
    recorded = recorded_blob(path, fmt)
    if recorded and recorded != blob:
        raise DigestMismatchError(
            f"{path} has digest {blob} but was packed as {recorded}; it changed since: pack again"
        )
    size = path.stat().st_size
    with bar(size, f"pushing {path.name}", progress) as tick:
        uploaded = store.publish(path, manifest.data, fmt, blob, size, tag=tag, progress=tick)
    return Shipped(manifest.id, blob, size, fmt, store.url, uploaded, time.monotonic() - start)


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
    """Pack ``env`` and publish it, unless the store already has the crate."""
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
        with bar(crate.size, f"uploading {crate.archive.name}", progress) as tick:
            uploaded = store.publish(
                crate.archive,
                crate.manifest.data,
                fmt,
                crate.blob,
                crate.size,
                tag=tag,
                move=True,
                progress=tick,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Shipped(
        crate.id, crate.blob, crate.size, fmt, store.url, uploaded, time.monotonic() - start
    )
