"""A read-only store over HTTP(S): a web server or a public bucket serving the
store layout. It cannot list, so refs are full crate ids or tags. Also the
download of a single archive URL (for example a presigned one) whose digest
the caller knows.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import DigestMismatchError, NotFoundError, StoreError
from ..fsutil import unlink_quietly
from ..ids import blob_digest
from .base import Progress, Store, Stored

_TIMEOUT = 60


def _open(url: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "envcrate"})
    return urllib.request.urlopen(req, timeout=_TIMEOUT)


def _fail(url: str, e: Exception) -> Exception:
    if isinstance(e, urllib.error.HTTPError):
        if e.code == 404:
            return NotFoundError(f"{url} does not exist (HTTP 404)")
        return StoreError(f"{url} answered HTTP {e.code} {e.reason}; check the URL and access")
    if isinstance(e, (urllib.error.URLError, OSError)):
        reason = getattr(e, "reason", None) or e
        return StoreError(f"cannot reach {url}: {reason}; check the URL and the network")
    return e


def _stream(url: str, out, progress: Progress | None, digest=None) -> None:
    try:
        with _open(url) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                if digest is not None:
                    digest.update(chunk)
                if progress:
                    progress(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise _fail(url, e) from None


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
        try:
            with _open(url, method) as resp:
                return answer(resp)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise _fail(url, e) from None
        except (urllib.error.URLError, OSError) as e:
            raise _fail(url, e) from None

    def read(self, key: str) -> bytes | None:
        return self._ask(key, "GET", lambda resp: resp.read())

    def write(self, key: str, data: bytes) -> None:
        self.require_writable()

    def upload(self, key, path, digest, progress, move=False) -> None:
        self.require_writable()

    def delete(self, key: str) -> None:
        self.require_writable()

    def download(
        self, key: str, dest: Path, progress: Progress | None, size: int | None = None
    ) -> None:
        with open(dest, "wb") as out:
            _stream(self._url(key), out, progress)

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


def download_url(
    url: str, dest_dir: Path, name: str, sha256: str, progress: Progress | None = None
) -> Path:
    """Fetch a single archive URL into ``dest_dir/name``, checking it against
    the blob digest ``sha256`` while it streams; nothing is left under the
    final name unless it matches."""
    want = blob_digest(sha256)
    final = Path(dest_dir) / name
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, progress, digest)
        got = "sha256:" + digest.hexdigest()
        if got != want:
            raise DigestMismatchError(
                f"the archive at {url.split('?', 1)[0]} has digest {got}, expected {want}; "
                "check the URL and --sha256"
            )
        os.replace(tmp, final)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return final
