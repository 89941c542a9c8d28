"""A read-only store over HTTP(S): a web server or a public bucket serving the
store layout. It cannot list, so refs are full crate ids or tags. Requests
and downloads go through :mod:`envcrate.network` (retries, deadlines,
``Range`` resume); a download is bounded by the size its record says.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import StoreError
from ..network import Deadline, open_url, request_error, retrying, stream_url
from .base import Progress, Store, Stored, too_big


class HttpStore(Store):
    can_list = False
    writable = False
    can_presign = True  # its URLs are already fetchable as they are

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _url(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _ask(self, key: str, method: str, answer):
        """``answer(response)``, or None when the object does not exist."""
        url = self._url(key)
        deadline = Deadline(f"{method} {url}")

        def attempt():
            try:
                with open_url(url, deadline, method) as resp:
                    return answer(resp)
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                raise request_error(url, e) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                raise request_error(url, e) from None

        return retrying(attempt, deadline)

    def read(self, key: str, limit: int | None = None) -> bytes | None:
        def whole(resp) -> bytes:
            if limit is None:
                return resp.read()
            data = resp.read(limit + 1)
            if len(data) > limit:
                raise too_big(self._url(key), limit)
            return data

        return self._ask(key, "GET", whole)

    def write(self, key: str, data: bytes) -> None:
        self.require_writable()

    def upload(self, key, path, digest, progress, move=False) -> None:
        self.require_writable()

    def delete(self, key: str) -> None:
        self.require_writable()

    def download(
        self, key: str, dest: Path, progress: Progress | None, size: int | None = None
    ) -> None:
        # The part file its caller made (new, a random name): opened again
        # without following a symlink, never created here under a name
        # another member of a shared cache could have planted one at.
        fd = os.open(dest, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "wb") as out:
            stream_url(self._url(key), out, progress, size=size)

    def size(self, key: str) -> int | None:
        def length(resp) -> int | None:
            value = resp.headers.get("Content-Length")
            return int(value) if value is not None else None

        return self._ask(key, "HEAD", length)

    def presign(self, key: str, expires: int) -> str:
        return self._url(key)

    def keys(self, prefix: str) -> list[str]:
        raise StoreError(f"{self.url} cannot be listed (HTTP); list the store it serves instead")

    def walk(self, prefix: str) -> list[Stored]:
        return self.keys(prefix)  # type: ignore[return-value]  (raises)
