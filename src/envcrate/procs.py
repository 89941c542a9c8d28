"""Forked worker processes that serve requests over pipes: packing's frame
compressors and unpacking's file writers.

Each child has an interpreter lock of its own, so its system calls wait on no
thread of the parent. Requests and answers are pickled, length-prefixed
messages on a pair of pipes per child; a thread per child takes the answers
as they come (a child blocked on writing a large answer while the parent is
blocked on sending it the next request would otherwise wait forever).
Shared memory for bulk data must be mapped before the fork.
"""

import os
import pickle
import signal
import struct
import threading
from typing import Callable

from .fsutil import hash_file, write_all


class ChildGone(Exception):
    """A child died (killed, out of memory) before it was sent a request."""


class Children:
    """``n`` forked children, each running ``serve(requests, answers)`` (two
    file descriptors) until its requests end; ``answered(i, message)`` is
    called on a thread of this process for each answer of child ``i``, and
    with None once the child is gone."""

    def __init__(self, n: int, serve: "Callable[[int, int], None]", answered: "Callable"):
        self.children: list[tuple[int, int, int]] = []  # (pid, requests, answers)
        self._readers: list[threading.Thread] = []
        try:
            for _ in range(n):
                self._fork(serve)
            for i, (_, _, answers) in enumerate(self.children):  # threads only after the forks
                reader = threading.Thread(
                    target=_take_answers,
                    args=(i, answers, answered),
                    name="envcrate-answers",
                    daemon=True,
                )
                reader.start()
                self._readers.append(reader)
        except BaseException:  # Ctrl-C included: no child is left unwaited
            self.close(abort=True)
            raise

    def __len__(self) -> int:
        return len(self.children)

    def _fork(self, serve: "Callable[[int, int], None]") -> None:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()

        def record(pid: int) -> None:
            os.close(req_r)
            os.close(ans_w)
            self.children.append((pid, req_w, ans_r))

        try:
            pid = fork(record)
        except OSError:
            for fd in (req_r, req_w, ans_r, ans_w):
                os.close(fd)
            raise
        if pid == 0:  # the child: serve until the requests end, never return
            status = 1
            try:
                for _, w, r in self.children:  # else a sibling would never see its end
                    os.close(w)
                    os.close(r)
                os.close(req_w)
                os.close(ans_r)
                serve(req_r, ans_w)
                status = 0
            finally:
                os._exit(status)

    def send(self, i: int, message) -> None:
        """Send child ``i`` a request; :class:`ChildGone` if it has died."""
        try:
            send(self.children[i][1], message)
        except BrokenPipeError:
            raise ChildGone from None

    def close(self, abort: bool = False) -> None:
        """End the requests and wait for every child (killed first with
        ``abort``: nothing it would still do is wanted)."""
        for pid, requests, _ in self.children:
            os.close(requests)  # the child sees the end and exits
            if abort:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid, _, _ in self.children:
            os.waitpid(pid, 0)
        for reader in self._readers:
            reader.join()
        for _, _, answers in self.children:
            os.close(answers)
        self.children, self._readers = [], []


def fork(record: "Callable[[int], None]") -> int:
    """``os.fork()``; 0 in the child. In the parent, ``record(pid)`` keeps the
    child before a Ctrl-C can unwind this call: an interrupt raised as the
    fork returns would lose the child, never to be waited for. (Interrupts
    are raised in the main thread only; there, one that comes meanwhile is
    held and raised again once the child is recorded.)

    The child dies with its parent (``PR_SET_PDEATHSIG``): a filler killed
    with SIGKILL must not leave writers extracting into a directory that the
    next filler is removing. (The signal comes when the forking *thread*
    ends: children are forked and waited for by one thread.)"""
    die_with_parent = _pdeathsig()  # looked up before the fork: the child only calls it
    parent = os.getpid()
    main = threading.current_thread() is threading.main_thread()
    held = []
    if main:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    pid = -1
    try:
        pid = os.fork()
        if pid == 0:
            if die_with_parent is not None:
                die_with_parent(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the call
                os._exit(1)
        else:
            record(pid)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
            if held and pid != 0:  # the child must not unwind its parent's calls
                os.kill(os.getpid(), signal.SIGINT)  # signal.raise_signal is 3.8
    return pid


_PR_SET_PDEATHSIG = 1
_prctl: list = []  # [libc's prctl, or None where there is none]


def _pdeathsig():
    """libc's ``prctl`` (Linux), loaded once per process (ctypes costs a few
    milliseconds to import; only a cold fill or a pack forks)."""
    if not _prctl:
        try:
            import ctypes

            _prctl.append(ctypes.CDLL(None, use_errno=True).prctl)
        except (ImportError, OSError, AttributeError):
            _prctl.append(None)
    return _prctl[0]


class BackgroundHash:
    """The sha256 of a file, computed by a forked child while this process
    goes on. ``envcrate unpack`` starts one before importing the unpacker:
    the archive is then hashed on the core that the imports and the reading
    of the head leave idle, instead of beside the file writers, which keep
    both cores busy."""

    def __init__(self, path: "str | os.PathLike"):
        import hashlib

        self._pid: int | None = None
        self._fd: int | None = None
        r, w = os.pipe()

        def record(pid: int) -> None:
            os.close(w)
            self._pid, self._fd = pid, r

        try:
            pid = fork(record)
        except OSError:
            os.close(r)
            os.close(w)
            return  # no child: result() is None and the caller hashes
        if pid == 0:  # the child: hash, write the digest, never return
            status = 1
            try:
                os.close(r)
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it at once
                digest = hashlib.sha256()
                hash_file(path, digest)
                write_all(w, digest.hexdigest().encode())
                status = 0
            finally:
                os._exit(status)

    def result(self) -> "str | None":
        """The hex digest, once the child is done; None if it could not hash
        the file (the caller then hashes it, and meets the error itself)."""
        if self._fd is None:
            return None
        data = b""
        for chunk in iter(lambda: os.read(self._fd, 128), b""):
            data += chunk
        self._end()
        return data.decode() if len(data) == 64 else None

    def cancel(self) -> None:
        """Stop the child if it still runs (nothing is left behind)."""
        if self._pid is not None:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._end()

    def _end(self) -> None:
        os.close(self._fd)
        os.waitpid(self._pid, 0)
        self._pid = self._fd = None


def _take_answers(i: int, answers: int, answered: "Callable") -> None:
    while True:
        try:
            message = receive(answers)
        except (EOFError, OSError):
            answered(i, None)  # the child is gone
            return
        answered(i, message)


def send(fd: int, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    write_all(fd, struct.pack("<Q", len(data)) + data)


def receive(fd: int):
    """The next message on ``fd``; EOFError once its writer is gone."""
    head = _read_exactly(fd, 8)
    return pickle.loads(_read_exactly(fd, struct.unpack("<Q", head)[0]))


def _read_exactly(fd: int, n: int) -> bytes:
    parts = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)
