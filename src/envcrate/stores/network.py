"""How long network stores may take, and retrying what failed on the way.

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

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import EnvcrateError, StoreError

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

    def expired(self, why: str = "") -> StoreError:
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


def retrying(attempt: Callable[[], T], deadline: Deadline) -> T:
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
