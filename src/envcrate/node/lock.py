"""The crate lock: one filler per crate, however many processes ask.

A POSIX record lock (``fcntl.lockf``, which NFS forwards to lockd) on
``locks/<key>.lock``, plus a holder file whose mtime is a heartbeat, for
waiters on other hosts or where fcntl locks are node-local. Waiters block
in the kernel (or poll, where SIGALRM is taken) and give up on a silent
holder. Layout: ``cache_layout.md``.
"""

import errno
import os
import time

from .events import Events

HEARTBEAT = 2.0  # seconds between a filler's holder-file touches
STALE = 30.0  # a holder silent this long (e.g. on a dead host) is ignored
LOCK_WAIT = 600.0  # seconds a waiter waits for a live holder at most, then fills itself
LOCK_WAIT_VAR = "ENVCRATE_LOCK_WAIT"  # overrides LOCK_WAIT (seconds)


def _lock_wait() -> float:
    try:
        return max(0.0, float(os.environ[LOCK_WAIT_VAR]))
    except (KeyError, ValueError):
        return LOCK_WAIT


class _Tick(Exception):
    """Raised by the SIGALRM handler to end a blocking wait for the lock."""


def _try_lock(fd: int, fcntl) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        return False


def _wait_for_lock(fd: int, fcntl, seconds: float) -> bool:
    """Wait at most ``seconds`` for the crate lock; True once it is held.

    In the main thread, when SIGALRM is nobody else's, the wait blocks in the
    kernel, which wakes the waiter the moment the filler lets go, and an
    interval timer ends it after ``seconds``. Elsewhere (another thread, or
    SIGALRM in use by the program) it tries the lock every 0.1 s: one
    ``lockf`` call a time, so hundreds of waiters cost the filler little.
    """
    import signal

    armed = True

    def tick(signum, frame):
        if armed:
            raise _Tick

    try:
        in_use = signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
        if in_use or signal.getitimer(signal.ITIMER_REAL)[0]:
            raise ValueError("SIGALRM is in use")
        signal.signal(signal.SIGALRM, tick)  # ValueError outside the main thread
    except ValueError:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if _try_lock(fd, fcntl):
                return True
        return False
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        armed = False
        return True
    except _Tick:
        armed = False
        # The tick may have come just after the lock was taken: a process
        # that holds a POSIX lock gets it again at once.
        return _try_lock(fd, fcntl)
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)  # before the default (which kills) is back
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


class CrateLock:
    """The crate's POSIX record lock (fcntl.lockf, which NFS forwards to lockd), plus a holder file whose mtime is a
    heartbeat, for waiters on other hosts or where fcntl locks are node-local.
    ``ready()`` tells the waiters that they may stop waiting."""

    def __init__(self, cache: str, key: str, ev: "Events", ready):
        self.cache = cache
        self.key = key
        self.ev = ev
        self.ready = ready
        self.lock_path = os.path.join(cache, "locks", f"{key}.lock")
        self.holder_path = os.path.join(cache, "locks", f"{key}.holder")
        self.held = False
        self.waited = False
        self._stop = None  # a threading.Event, made by the filler only: waiters skip the import
        self._beat = None
        self._holder_fd = None

    def __enter__(self) -> "CrateLock":
        # fcntl directly rather than filelock: importing filelock costs each of
        # the hundreds of processes that may start at once about 50 ms.
        import fcntl

        from ..fsutil import create_file, shared_mode

        try:  # group-writable in a shared cache: lockf needs O_RDWR
            self._fd = create_file(self.lock_path, shared_mode(self.cache), os.O_RDWR)
        except OSError:
            # Another user's lock file that we may not open (made by an older
            # envcrate), or a symlink, FIFO... planted under its name: fill
            # without it; the rename decides.
            self._fd = None
        if self.ready() is not None:
            return self
        # A member may hold the lock and keep its heartbeat fresh forever:
        # after this long a waiter fills itself (the rename decides).
        give_up = time.monotonic() + _lock_wait()
        while self._fd is not None:
            if _try_lock(self._fd, fcntl):
                self.held = True
                break
            if not self.waited:
                self.waited = True
                self.ev.emit("WAITING", holder=self._holder())
            if _wait_for_lock(self._fd, fcntl, HEARTBEAT):
                self.held = True
                break
            # The lock stayed taken for a heartbeat period.
            if self.ready() is not None:  # filled from another host
                return self
            holder = self._holder()
            if holder is not None and time.time() - holder["beat"] > STALE:
                # A silent holder (another host died, or fcntl locks are
                # node-local here): fill ourselves; the rename decides.
                break
            if time.monotonic() >= give_up:
                break
        if self.ready() is None:
            import threading

            self._write_holder()
            self._stop = threading.Event()
            self._beat = threading.Thread(target=self._heartbeat, daemon=True)
            self._beat.start()
        return self

    def _holder(self) -> "dict | None":
        """{"host", "pid", "beat"} of the filler; the file is two plain lines
        (waiters do not import json for it)."""
        from ..fsutil import open_regular

        try:  # a regular file only, and only its start: nothing planted hangs or floods us
            fd = open_regular(self.holder_path)
            try:
                head = os.read(fd, 512)
                beat = os.fstat(fd).st_mtime
            finally:
                os.close(fd)
            host, pid = head.decode("utf-8", "replace").split("\n")[:2]
            return {"host": host, "pid": int(pid), "beat": beat}
        except (OSError, ValueError):
            return None

    def _write_holder(self) -> None:
        """Written in place, no temporary file: a sticky ``locks/`` forbids
        replacing another member's holder file by a rename, and a full disk
        would leave the temporary file behind. (Readers take a short or
        empty file for no holder, and read only its first two lines.) Never
        through a symlink or onto anything but a regular file; only a file
        of our own is truncated (another member's is overwritten from its
        start). The descriptor stays open for the heartbeat, which touches
        the file through it: a member who replaces the name by a symlink
        meanwhile touches nothing of ours."""
        from ..fsutil import create_file, shared_mode, write_all_at

        try:
            fd = create_file(self.holder_path, shared_mode(self.cache), os.O_WRONLY, truncate=True)
        except OSError:
            return  # waiters elsewhere then see no heartbeat, and fill too
        try:
            write_all_at(fd, f"{os.uname().nodename}\n{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._holder_fd = fd

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self._holder_fd)
            except (OSError, TypeError):
                pass

    def __exit__(self, *exc) -> None:
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            if self._holder_fd is not None:
                os.close(self._holder_fd)
                self._holder_fd = None
            try:
                os.unlink(self.holder_path)
            except OSError:
                pass  # another member's file (sticky locks/), written in place
        if self._fd is None:
            return
        if self.held:
            import fcntl

            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
