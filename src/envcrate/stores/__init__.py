"""Stores crates are shipped to: a directory, S3, or HTTP (read-only).

``open_store(url)`` picks the backend from the URL; without one it uses
``$ENVCRATE_STORE``, then the embedded local store in the user data directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import StoreError
from .base import Store, blob_key, check_tag, file_digest, record_key, tag_key

__all__ = ["Store", "blob_key", "check_tag", "default_store_url", "file_digest", "open_store"]
__all__ += ["record_key", "tag_key"]


def default_store_url() -> str:
    env = os.environ.get("ENVCRATE_STORE")
    if env:
        return env
    from platformdirs import user_data_dir

    return str(Path(user_data_dir("envcrate", appauthor=False)) / "store")


def open_store(url: str | os.PathLike | Store | None = None) -> Store:
    """The store at ``url``: ``s3://bucket/prefix``, ``http(s)://...``,
    ``file:///path`` or a directory path (a Store is returned as it is)."""
    if isinstance(url, Store):
        return url
    if url is None and not os.environ.get("ENVCRATE_STORE"):
        store = open_store(default_store_url())
        store.given = False  # the local default: not there until the first ship
        return store
    if url is None:
        url = default_store_url()
    url = os.fspath(url)
    scheme = urlparse(url).scheme
    if scheme == "s3":
        from .s3 import S3Store

        return S3Store(url)
    if scheme in ("http", "https"):
        from .http import HttpStore

        return HttpStore(url)
    from .fs import FsStore

    if scheme == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{url}: file URLs must name a local path (file:///path)")
        return FsStore(unquote(parsed.path), url)
    if scheme and len(scheme) > 1:
        raise StoreError(f"unknown store {url}: use a directory, file://, s3:// or https:// URL")
    return FsStore(url)
