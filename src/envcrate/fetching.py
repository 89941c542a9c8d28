"""Fetching: ensure through a store, the client's side of ``ensure``.

The compute side (:mod:`envcrate.node`) reads only paths and URLs; this
module resolves a ref in a store (a tag, a prefix, an id) and hands
:func:`envcrate.node.ensure.ensure_crate` a source that reads the crate's
record and fetches its blob from the store. The warm path (a crate ready in
a cache) never opens the store; the store's modules are imported only when
it has to be.
"""

from __future__ import annotations

import os

from .errors import NotFoundError
from .fsutil import unlink_quietly
from .node.cache import Ensured
from .node.ensure import ensure_crate as _ensure_on_node
from .node.sources import Source, this_process


def ensure(ref: str, store=None, cache=None, **options):
    """The prefix (a Path) of a ready, relocated env for ``ref``; the options
    are :func:`ensure_crate`'s."""
    return ensure_crate(ref, store, cache, **options).prefix


def ensure_crate(ref: str, store=None, cache=None, **options) -> Ensured:
    """:func:`envcrate.node.ensure.ensure_crate` with ``store`` (a URL, a
    :class:`~envcrate.stores.Store`, or None for the default store) to
    resolve the ref in and fetch the crate from when no cache has it ready.
    The options: ``python``, ``sha256``, ``events``, ``lease``, ``progress``."""
    return _ensure_on_node(ref, cache, locate=locator(store), **options)


def locator(store):
    """The ``locate`` of :func:`~envcrate.node.ensure.ensure_crate` for
    ``store``: a crate id is fetched from it as it is, another ref is
    resolved in it first."""

    def locate(ref: str, crate_id: str | None) -> StoreCrate:
        if crate_id is not None:
            return StoreCrate(store, crate_id)
        from .stores import open_store

        opened = open_store(store)
        return StoreCrate(opened, opened.resolve(ref))

    return locate


class StoreCrate(Source):
    """A crate in a store: its record, then its preferred archive, read in
    place from a directory store, downloaded from the others."""

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
        from .crate.record import manifest_of

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
        fd, tmp = make_temp(dl, f".{a['blob'].split(':', 1)[1]}.{this_process()}.", ".part", 0o600)
        os.close(fd)
        try:
            ev.emit("DOWNLOADING", bytes=a.get("size"), store=self.store.url)
            with bar(a.get("size", 0), "downloading", progress) as tick:
                self.store.download(blob_key(a["blob"]), tmp, tick, size=a["size"])
        except BaseException:
            unlink_quietly(tmp)
            raise
        return str(tmp), a["blob"], True
