"""Reading zstd with whatever decompressor the node has.

In order (design.md, Node side): the ``zstandard`` module (what envcrate
installs: frames in parallel, from a seekable crate's plan), the ``zstd``
command, Python 3.14's ``compression.zstd`` (or its backport
``backports.zstd``). The last two
read a crate as one stream (:func:`stream`), the way ``tar -I zstd -xf``
does: every member is still checked against the file table as it is
written, and every byte of the archive is hashed.

A node with none of them can still use a crate's ``tar.gz`` archive, which
needs only zlib (:func:`missing_message` says so).
"""

import os

_found = None  # memo of backend()


def backend() -> "str | None":
    """``zstandard``, ``command``, ``compression.zstd`` or None.
    ``ENVCRATE_ZSTD`` (one of those names) skips the ones before it: the
    tests and a user with a broken module use it."""
    global _found
    if _found is None:
        _found = _find(os.environ.get("ENVCRATE_ZSTD", "")) or ""
    return _found or None


_ORDER = ("zstandard", "command", "compression.zstd")


def _find(wanted: str) -> "str | None":
    order = _ORDER[_ORDER.index(wanted) :] if wanted in _ORDER else _ORDER
    for name in order:
        if name == "zstandard":
            try:
                import zstandard  # noqa: F401
            except ImportError:
                continue
            return name
        if name == "compression.zstd":
            if _module() is not None:
                return name
            continue
        if _command() is not None:
            return name
    return None


def _module():
    try:
        from compression import zstd  # novermin (Python 3.14)
    except ImportError:
        try:
            from backports import zstd  # the same module, on PyPI for 3.9-3.13
        except ImportError:
            return None
    return zstd


def _command() -> "str | None":
    import shutil

    return shutil.which("zstd")


def missing_message() -> str:
    return (
        "no zstd decompressor: install the zstandard module (pip install zstandard) or the "
        "zstd command, or use the crate's tar.gz archive (envcrate ship --format tar.gz)"
    )


def stream(f):
    """A reader of the decompressed bytes of every frame of ``f`` in turn
    (skippable frames skipped): ``readinto(buffer) -> int``, 0 at the end,
    and ``close()``. A corrupt stream raises ArchiveError."""
    name = backend()
    if name == "zstandard":
        import zstandard

        return _Guarded(zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True))
    if name == "compression.zstd":
        return _Guarded(_module().ZstdFile(f, "rb"))
    if name == "command":
        return _Command(f, _command())
    from ..errors import EnvcrateError

    raise EnvcrateError(missing_message())


class _Guarded:
    """A module's reader whose errors become ArchiveError."""

    def __init__(self, reader):
        self._reader = reader

    def readinto(self, buf) -> int:
        from ..errors import ArchiveError

        try:
            return self._reader.readinto(buf)
        except ArchiveError:
            raise
        except Exception as e:  # zstandard.ZstdError, compression.zstd.ZstdError, EOFError
            if isinstance(e, OSError) and e.errno is not None:
                raise  # reading the file failed, not decompressing it
            raise ArchiveError(f"cannot decompress the archive ({e})") from None

    def close(self) -> None:
        try:
            self._reader.close()
        except Exception:
            pass


class _Command:
    """``zstd -dcq`` fed from ``f`` by a thread (so that ``f`` may be a
    hashing wrapper), read from its stdout."""

    def __init__(self, f, exe: str):
        import subprocess
        import tempfile
        import threading

        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [exe, "-d", "-c", "-q"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            close_fds=True,
        )
        self._failed = None
        self._feeder = threading.Thread(target=self._feed, args=(f,), daemon=True)
        self._feeder.start()

    def _feed(self, f) -> None:
        try:
            while True:
                data = f.read(1 << 20)
                if not data:
                    break
                self._proc.stdin.write(data)
        except BrokenPipeError:
            pass  # zstd stopped (an error, or close()): readinto tells
        except BaseException as e:
            self._failed = e
        finally:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def readinto(self, buf) -> int:
        n = self._proc.stdout.readinto(buf)
        if n:
            return n
        self._feeder.join()
        code = self._proc.wait()
        if self._failed is not None:
            raise self._failed
        if code != 0:
            from ..errors import ArchiveError

            self._err.seek(0)
            said = self._err.read(4096).decode("utf-8", "replace").strip().splitlines()
            raise ArchiveError(
                "the zstd command cannot decompress the archive"
                + (f" ({said[-1]})" if said else f" (exit status {code})")
            )
        return 0

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.stdout.close()
        self._proc.wait()
        self._feeder.join()
        self._err.close()
