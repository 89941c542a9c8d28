"""The writer's workers: each fills a frame's buffer with the tar stream of
its entries, rewrites timestamp pycs, scans for the prefix and compresses it,
in forked processes (threads when forking is not safe)."""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import EnvcrateError
from .inputs import read_into
from .pyc import HEADER as PYC_HEADER
from .pyc import source_of, unchecked_header

if TYPE_CHECKING:
    from concurrent.futures import Future


@dataclass
class Frame:
    """One frame's share of the tar stream: what the planning thread laid out
    in it, filled in by a worker (see :func:`pack_frame`)."""

    slot: int  # which pair of buffers
    buf: mmap.mmap  # its tar stream
    out: mmap.mmap  # its compressed bytes
    limit: int  # bytes of tar stream this frame takes
    used: int = 0
    # Files to read into it: (position, path, offset in the file, length, file size)
    reads: list = field(default_factory=list)
    pycs: list = field(default_factory=list)  # (position, path): pyc headers to rewrite
    whole: list = field(default_factory=list)  # (row, start, end, entry): files all in this frame
    pieces: list = field(default_factory=list)  # (row, start, end, entry, first, last)
    content: int = 0  # file bytes, for progress
    rows_end: int = 0  # rows before this one are final once this frame is hashed
    start_member: tuple[int, int] = (0, 0)


def pack_frame(buf, out, reads, pycs, whole, used, codec, scanner, report):
    """A worker's job: read the files laid out in ``buf`` (``reads``:
    position, path, offset, length, size), rewrite the headers of the pycs
    starting in it (``pycs``: position, path), hash and scan the files that
    lie whole in it (``whole``: row, start, end, what the scanner needs) and
    ``report`` that: ([(row, sha256)], findings); then compress it into
    ``out`` and return the compressed length. (Reporting before compressing
    lets the head of the archive be made while the last frames compress.)"""
    view = memoryview(buf)
    for pos, path, offset, n, size in reads:
        read_into(view[pos : pos + n], path, offset, size)
    if pycs:
        _rewrite_pycs(view, pycs, reads)
    hashes = [(row, hashlib.sha256(view[s:e]).hexdigest()) for row, s, e, _ in whole]
    found = []
    if scanner is not None:
        found = [scanner.whole(meta, buf, s, e) for _, s, e, meta in whole]
    report((hashes, found))
    return codec.compress_into(view[:used], out)


def _rewrite_pycs(view: memoryview, pycs, reads) -> None:
    """Make the pycs laid out in a frame unchecked-hash pycs, hashing their
    sources from the frame where they lie whole in it (a module's source
    mostly sorts next to its ``__pycache__``), else from the file."""
    here = {path: (pos, n) for pos, path, offset, n, size in reads if offset == 0 and n == size}
    for pos, path in pycs:
        at = here.get(source_of(path))
        code = None if at is None else view[at[0] : at[0] + at[1]]
        header = unchecked_header(bytes(view[pos : pos + PYC_HEADER]), path, code)
        if header is not None:
            view[pos : pos + PYC_HEADER] = header


USE_PROCESSES = True  # tests turn it off to check that threads give the same archive


def start_workers(n: int, bufs, outs, codec, scanner):
    """Worker processes where forking is safe (no other thread is running:
    a forked child inherits the locks other threads hold), else threads."""
    if USE_PROCESSES and hasattr(os, "fork") and threading.active_count() == 1:
        try:
            return _ProcessWorkers(n, bufs, outs, codec, scanner)
        except OSError:  # no more processes allowed (ulimit -u): threads will do
            pass
    return _ThreadWorkers(n, bufs, outs, codec, scanner)


class _ThreadWorkers:
    def __init__(self, n: int, bufs, outs, codec, scanner):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(n, thread_name_prefix="envcrate-zstd")
        self._args = bufs, outs, codec, scanner

    def submit(self, k: int, slot: int, reads, pycs, whole, used: int):
        from concurrent.futures import Future

        bufs, outs, codec, scanner = self._args
        filled: Future = Future()

        def job():
            try:
                return pack_frame(
                    bufs[slot],
                    outs[slot],
                    reads,
                    pycs,
                    whole,
                    used,
                    codec,
                    scanner,
                    filled.set_result,
                )
            except BaseException as e:
                if not filled.done():
                    filled.set_exception(e)
                raise

        return filled, self._pool.submit(job)

    def filled(self, handle):
        return handle[0].result()

    def result(self, handle):
        return handle[1].result()

    def close(self, abort: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=abort)


class _ProcessWorkers:
    """Forked worker processes (see :mod:`envcrate.procs`), frame ``k`` to
    worker ``k % n``; the frame buffers are shared memory mapped before the
    fork. Reading files, which hands the interpreter lock back and forth at
    every system call, then waits on no other thread."""

    def __init__(self, n: int, bufs, outs, codec, scanner):
        from ..procs import Children

        self.answers: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n)]
        self._got: dict[tuple[int, str], object] = {}  # answers by (frame, kind)
        # Loaded once here rather than in each worker after the fork
        # (importing zstandard takes about 20 ms there).
        codec.ready()
        self.children = Children(
            n,
            functools.partial(_serve, bufs=bufs, outs=outs, codec=codec, scanner=scanner),
            lambda i, message: self.answers[i].put(message),
        )

    def submit(self, k: int, slot: int, reads, pycs, whole, used: int):
        from ..procs import ChildGone

        try:
            self.children.send(k % len(self.children), (k, slot, reads, pycs, whole, used))
        except ChildGone:
            raise _worker_died() from None
        return k

    def filled(self, k: int):
        """What frame ``k``'s worker reported before compressing it."""
        return self._answer(k, "filled")

    def result(self, k: int):
        """Frame ``k``'s compressed length."""
        return self._answer(k, "done")

    def _answer(self, k: int, kind: str):
        answers = self.answers[k % len(self.answers)]
        while True:
            if (k, "error") in self._got:
                raise self._got[k, "error"]
            if (k, kind) in self._got:
                return self._got.pop((k, kind))
            got = answers.get()
            if got is None:
                raise _worker_died()
            frame, what, value = got
            self._got[frame, what] = value

    def close(self, abort: bool = False) -> None:
        self.children.close(abort)


def _worker_died() -> EnvcrateError:
    return EnvcrateError(
        "a packing worker process died (out of memory?); pack again, or with --threads 1"
    )


def _serve(requests: int, results: int, bufs, outs, codec, scanner) -> None:
    """A worker process: for each frame asked for, send (frame, "filled",
    digests and findings) then (frame, "done", compressed length), or
    (frame, "error", the error)."""
    from ..procs import receive, send

    while True:
        try:
            k, slot, *job = receive(requests)
        except EOFError:
            return

        def report(filled, k=k) -> None:
            send(results, (k, "filled", filled))

        try:
            answer = (k, "done", pack_frame(bufs[slot], outs[slot], *job, codec, scanner, report))
        except BaseException as e:
            error = e if isinstance(e, EnvcrateError) else EnvcrateError(f"packing: {e!r}")
            answer = (k, "error", error)
        send(results, answer)
