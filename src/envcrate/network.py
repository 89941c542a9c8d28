"""HTTP(S) transfers with deadlines, retries and resume: how long network
stores may take, and retrying what failed on the way. Standard library only
(urllib): the compute side downloads archive URLs with it too.

Two settings, read from the environment each time they are needed:

- ``ENVCRATE_NETWORK_TIMEOUT`` (seconds, default 60): how long one connect or
  one read may wait without a byte arriving; a stalled connection is given up
  after it (and retried).
- ``ENVCRATE_NETWORK_DEADLINE`` (seconds, default 120): how long one
  operation (a download, an upload, a request) may go on without moving a
  MiB, retries included; after it envcrate gives up with one line. A
  transfer that keeps moving data is never cut, however long it takes.

Failures that another attempt may not meet (a lost connection, a stalled
read, HTTP 500/502/503/504) are :class:`Transient` and retried with
exponential backoff until the deadline; the others fail at once.
"""

import hashlib
import http.client
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import DigestMismatchError, EnvcrateError, NotFoundError, StoreError
from .fsutil import unlink_quietly
from .ids import blob_digest

Progress = Callable[[int], None]

DEFAULT_TIMEOUT = 60.0
DEFAULT_DEADLINE = 120.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
        if seconds > 0:
            return seconds
    except ValueError:
        pass
    raise EnvcrateError(f"{name}={value!r} is not a number of seconds above 0; fix or unset it")


def timeout() -> float:
    """Seconds one connect or read may stall (``ENVCRATE_NETWORK_TIMEOUT``)."""
    return _seconds("ENVCRATE_NETWORK_TIMEOUT", DEFAULT_TIMEOUT)


def deadline_seconds() -> float:
    """Seconds one operation may go without progress, retries included
    (``ENVCRATE_NETWORK_DEADLINE``)."""
    return _seconds("ENVCRATE_NETWORK_DEADLINE", DEFAULT_DEADLINE)


class Transient(Exception):
    """A failure worth another attempt; its message is one line for the user."""


class Deadline:
    """When one operation gives up: ``ENVCRATE_NETWORK_DEADLINE`` seconds after
    it started or last moved a byte."""

    def __init__(self, what: str):
        self.what = what
        self.seconds = deadline_seconds()
        self.start = time.monotonic()
        self.end = self.start + self.seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self, why: str = "") -> "StoreError":
        why = f" ({why})" if why else ""
        return StoreError(
            f"gave up on {self.what} after {time.monotonic() - self.start:.1f} s{why}, "
            f"{self.seconds:g} s without progress (ENVCRATE_NETWORK_DEADLINE); check the network and "
            "the server, then try again (or raise the deadline)"
        )

    PROGRESS = 1 << 20  # bytes that count as progress: a trickle does not

    def moved(self, n: int) -> None:
        """``n`` bytes moved: once a MiB has since the deadline was last set,
        it counts from now (it bounds the time spent without progress, not
        how long a large transfer takes; a connection that stalls after every
        few hundred bytes does not keep it off)."""
        self._moved = getattr(self, "_moved", 0) + n
        if self._moved >= self.PROGRESS:
            self._moved = 0
            self.end = time.monotonic() + self.seconds

    def read_timeout(self) -> float:
        """The stall timeout, but no longer than what is left."""
        return max(0.05, min(timeout(), self.left()))


def retrying(attempt: "Callable[[], T]", deadline: "Deadline") -> "T":
    """``attempt()`` until it returns: a :class:`Transient` failure is tried
    again after a backoff (0.1 s, doubling up to 5 s, jittered) while the
    deadline allows; then the last failure is the error."""
    delay = 0.1
    while True:
        try:
            return attempt()
        except Transient as e:
            last = str(e)
        pause = delay * random.uniform(0.5, 1.0)
        if deadline.left() <= pause:
            raise deadline.expired(last)
        time.sleep(pause)  # backoff: the server or the network needs a moment
        delay = min(delay * 2, 5.0)


def too_large(where: str, size: int) -> "StoreError":
    """The error for an object larger than its record says."""
    return StoreError(
        f"{where} is larger than the {size} bytes its record says; the store's copy is "
        "damaged or not this crate's: push the crate again (`envcrate fsck` finds such blobs)"
    )


CHUNK = 1 << 20


def open_url(url: str, deadline: "Deadline", method: str = "GET", start: int = 0):
    headers = {"User-Agent": "envcrate"}
    if start:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, method=method, headers=headers)
    return urllib.request.urlopen(req, timeout=deadline.read_timeout())


def shown(url: str) -> str:
    return url.split("?", 1)[0]  # a presigned URL's query is a credential


def request_error(url: str, e: "Exception") -> "Exception":
    """A one-line error for a failed request: Transient when worth retrying."""
    if isinstance(e, urllib.error.HTTPError):
        if e.code == 404:
            return NotFoundError(f"{shown(url)} does not exist (HTTP 404)")
        what = f"{shown(url)} answered HTTP {e.code} {e.reason}"
        if e.code in RETRY_STATUS:
            return Transient(f"{what}; try again later")
        return StoreError(f"{what}; check the URL and access")
    if isinstance(e, (urllib.error.URLError, OSError, http.client.HTTPException)):
        reason = getattr(e, "reason", None) or e or type(e).__name__
        return Transient(f"cannot reach {shown(url)}: {reason}; check the URL and the network")
    return e


def stream_url(
    url: str,
    out,
    progress: "Progress | None",
    *,
    size: "int | None" = None,
    digest=None,
) -> "str | None":
    """Write what ``url`` serves to ``out`` (a new file opened for writing),
    resuming where a lost connection left off; at most ``size`` bytes. With
    ``digest`` (a hashlib constructor), the hex digest of what was written."""
    deadline = Deadline(f"downloading {shown(url)}")
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
            resp = open_url(url, deadline, start=got)
        except urllib.error.HTTPError as e:
            if e.code == 416 and got:  # asked from the end: lost after the last byte?
                total = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
                if total is not None and int(total.group(1)) == got:
                    return
                restart()
                raise Transient(f"{shown(url)} refused the range from byte {got}") from None
            raise request_error(url, e) from None
        except Exception as e:
            raise request_error(url, e) from None
        with resp:
            if got and resp.status != 206:
                restart()  # the server ignored the Range: all of it again
            elif got:
                answered = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if answered is None or int(answered.group(1)) != got:
                    restart()
                    raise Transient(f"{shown(url)} answered another range than asked for")
            length = resp.headers.get("Content-Length")
            end = got + int(length) if length is not None and length.isdigit() else None
            if size is not None and end is not None and end > size:
                raise too_large(shown(url), size)
            try:
                # read1: what has arrived, so that bytes before a lost
                # connection are kept and the next attempt starts after them
                for chunk in iter(lambda: resp.read1(CHUNK), b""):
                    if size is not None and got + len(chunk) > size:
                        raise too_large(shown(url), size)
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
                    f"lost the connection to {shown(url)} after {got} bytes ({reason})"
                ) from None
            out.flush()
            if end is not None and got < end:  # a clean close before the end
                raise Transient(f"lost the connection to {shown(url)} after {got} of {end} bytes")

    retrying(attempt, deadline)
    return hashed.hexdigest() if hashed is not None else None


def download_url(
    url: str, dest_dir: Path, name: str, sha256: str, progress: "Progress | None" = None
) -> Path:
    """Fetch a single archive URL into ``dest_dir/name``, checking it against
    the blob digest ``sha256``; nothing is left under the final name unless it
    matches."""
    want = blob_digest(sha256)
    final = Path(dest_dir) / name
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            got = "sha256:" + stream_url(url, out, progress, digest=hashlib.sha256)
        if got != want:
            raise DigestMismatchError(
                f"the archive at {shown(url)} has digest {got}, expected {want}; "
                "check the URL and --sha256"
            )
        os.replace(tmp, final)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return final
