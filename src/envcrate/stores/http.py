"""A read-only store over HTTP(S): a web server or a public bucket serving the
store layout. It cannot list, so refs are full crate ids or tags. Also the
download of a single archive URL (for example a presigned one) whose digest
the caller knows.

Every request is retried with backoff while it fails in a way another attempt
may not (a lost or stalled connection, HTTP 5xx), until the deadline of
:mod:`.network`; a download that loses its connection mid-body goes on with a
``Range`` request from the byte it had (from the start again if the server
ignores ranges). A download is bounded by the size its record says.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import DigestMismatchError, NotFoundError, StoreError
from ..fsutil import unlink_quietly
from ..ids import blob_digest
from .base import Progress, Store, Stored, too_big, too_large
from .network import RETRY_STATUS, Deadline, Transient, retrying

_CHUNK = 1 << 20


def _open(url: str, deadline: Deadline, method: str = "GET", start: int = 0):
    headers = {"User-Agent": "envcrate"}
    if start:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, method=method, headers=headers)
    return urllib.request.urlopen(req, timeout=deadline.read_timeout())


def _shown(url: str) -> str:
    return url.split("?", 1)[0]  # a presigned URL's query is a credential


def _fail(url: str, e: Exception) -> Exception:
    """A one-line error for a failed request: Transient when worth retrying."""
    if isinstance(e, urllib.error.HTTPError):
        if e.code == 404:
            return NotFoundError(f"{_shown(url)} does not exist (HTTP 404)")
        what = f"{_shown(url)} answered HTTP {e.code} {e.reason}"
        if e.code in RETRY_STATUS:
            return Transient(f"{what}; try again later")
        return StoreError(f"{what}; check the URL and access")
    if isinstance(e, (urllib.error.URLError, OSError, http.client.HTTPException)):
        reason = getattr(e, "reason", None) or e or type(e).__name__
        return Transient(f"cannot reach {_shown(url)}: {reason}; check the URL and the network")
    return e


def _stream(
    url: str,
    out,
    progress: Progress | None,
    *,
    size: int | None = None,
    digest=None,
) -> str | None:
    """Write what ``url`` serves to ``out`` (a new file opened for writing),
    resuming where a lost connection left off; at most ``size`` bytes. With
    ``digest`` (a hashlib constructor), the hex digest of what was written."""
    deadline = Deadline(f"downloading {_shown(url)}")
    got = 0
    hashed = digest() if digest else None

    def restart() -> None:
        nonlocal got, hashed
        out.seek(0)
        out.truncate()
        hashed = digest() if digest else None
        got = 0

    def attempt() -> None:
        nonlocal got
        try:
            resp = _open(url, deadline, start=got)
        except urllib.error.HTTPError as e:
            if e.code == 416 and got:  # asked from the end: lost after the last byte?
                total = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
                if total is not None and int(total.group(1)) == got:
                    return
                restart()
                raise Transient(f"{_shown(url)} refused the range from byte {got}") from None
            raise _fail(url, e) from None
        except Exception as e:
            raise _fail(url, e) from None
        with resp:
            if got and resp.status != 206:
                restart()  # the server ignored the Range: all of it again
            elif got:
                answered = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if answered is None or int(answered.group(1)) != got:
                    restart()
                    raise Transient(f"{_shown(url)} answered another range than asked for")
            length = resp.headers.get("Content-Length")
            end = got + int(length) if length is not None and length.isdigit() else None
            if size is not None and end is not None and end > size:
                raise too_large(_shown(url), size)
            try:
                # read1: what has arrived, so that bytes before a lost
                # connection are kept and the next attempt starts after them
                while chunk := resp.read1(_CHUNK):
                    if size is not None and got + len(chunk) > size:
                        raise too_large(_shown(url), size)
                    out.write(chunk)
                    if hashed is not None:
                        hashed.update(chunk)
                    got += len(chunk)
                    if progress:
                        progress(len(chunk))
                    deadline.moved(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                reason = str(e) or type(e).__name__
                raise Transient(
                    f"lost the connection to {_shown(url)} after {got} bytes ({reason})"
                ) from None
            out.flush()
            if end is not None and got < end:  # a clean close before the end
                raise Transient(f"lost the connection to {_shown(url)} after {got} of {end} bytes")

    retrying(attempt, deadline)
    return hashed.hexdigest() if hashed is not None else None


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
                with _open(url, deadline, method) as resp:
                    return answer(resp)
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                raise _fail(url, e) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                raise _fail(url, e) from None

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
            _stream(self._url(key), out, progress, size=size)

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
    the blob digest ``sha256``; nothing is left under the final name unless it
    matches."""
    want = blob_digest(sha256)
    final = Path(dest_dir) / name
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            got = "sha256:" + _stream(url, out, progress, digest=hashlib.sha256)
        if got != want:
            raise DigestMismatchError(
                f"the archive at {_shown(url)} has digest {got}, expected {want}; "
                "check the URL and --sha256"
            )
        os.replace(tmp, final)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return final
