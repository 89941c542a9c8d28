"""Reading the env's files for the writer: straight into a frame's buffer
(``preadv``, no copy), and in batches ahead of ``identify``."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import EnvcrateError
from ..fsutil import read_file
from .entry import Entry
from .pyc import rewritten

if TYPE_CHECKING:
    pass


def read_into(view: memoryview, path: str, offset: int, size: int) -> None:
    """Read ``len(view)`` bytes of the file at ``path`` from ``offset``; the
    file must still have the ``size`` the walk saw.

    Every system call lets go of the interpreter lock and must take it back,
    which other threads delay: a whole file is read with open, one read and
    close (a spare byte tells that it grew), pieces of large files check the
    size with fstat."""
    whole = offset == 0 and len(view) == size
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise EnvcrateError(f"cannot read {path}: {e.strerror}") from None
    try:
        if not whole and os.fstat(fd).st_size != size:
            raise EnvcrateError(f"{path} changed while it was being packed; pack again")
        got = 0
        while True:
            k = os.preadv(fd, [view[got:], _SPARE] if whole else [view[got:]], offset + got)
            got += k
            if got > len(view):
                raise EnvcrateError(f"{path} grew while it was being packed; pack again")
            if got == len(view):
                return
            if k == 0:
                raise EnvcrateError(f"{path} shrank while it was being packed; pack again")
    except OSError as e:
        raise EnvcrateError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)


_SPARE = bytearray(1)  # written to by readers, never read


PREFETCH_MAX_FILE = 1 << 20


def _prefetched(e: Entry) -> bool:
    return e.loader is not None or (e.type == "f" and (e.pyc or e.size <= PREFETCH_MAX_FILE))


def _load_batch(entries: list[Entry]) -> list[bytes]:
    """Archived content of each entry."""
    out: list[bytes] = []
    for e in entries:
        if e.loader is not None:
            data = e.loader()
        else:
            try:
                data, _ = read_file(e.source, nofollow=True)
            except OSError as err:
                raise EnvcrateError(f"cannot read {e.source}: {err.strerror}") from None
            if len(data) != e.size:
                raise EnvcrateError(f"{e.source} changed while it was being packed; pack again")
        out.append(rewritten(data, e.source) if e.pyc else data)
    return out


def prefetch(
    entries: list[Entry], threads: int = 2, window: int = 8
) -> Iterator[tuple[Entry, bytes | None]]:
    """Yield ``(entry, content)`` in order, the archived content of small
    files, pycs and loader entries loaded ahead by worker threads (their
    syscalls overlap the caller's work; ``identify`` hashes them as they
    come); other entries come with ``None``."""
    batches: list[list[Entry]] = []
    batch: list[Entry] = []
    size = 0
    for e in entries:
        batch.append(e)
        if _prefetched(e):
            size += e.size
        if len(batch) >= 64 or size >= (4 << 20):
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)

    def submit(pool, b: list[Entry]):
        return b, pool.submit(_load_batch, [e for e in b if _prefetched(e)])

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="envcrate-read") as pool:
        it = iter(batches)
        futures = deque(submit(pool, b) for b in itertools.islice(it, window))
        while futures:
            b, fut = futures.popleft()
            nxt = next(it, None)
            if nxt is not None:
                futures.append(submit(pool, nxt))
            loaded = iter(fut.result())
            for e in b:
                if not _prefetched(e):
                    yield e, None
                else:
                    yield e, next(loaded)
