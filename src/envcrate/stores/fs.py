"""A store in a directory: a shared filesystem, a sandbox, the local default.

Every object is written under a temporary name in its final directory and
renamed into place, so readers never see a partial file. When the store's
root is group-writable (a project directory), new files and directories are
too, and directories inherit its set-group-id bit.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ..errors import NotFoundError, StoreError
from ..fsutil import current_umask, group_shared, make_dirs_under, sha256_file, unlink_quietly
from ..network import too_large
from .base import Progress, Store, Stored, too_big


class FsStore(Store):
    def __init__(self, root: str | os.PathLike, url: str | None = None):
        self.root = Path(root).expanduser().absolute()
        self.url = url or str(self.root)

    def check_present(self) -> None:
        if self.given and not self.root.is_dir():
            raise NotFoundError(
                f"no store at {self.url}: no such directory; check --store "
                "(`envcrate push` and `ship` create one)"
            )

    def _path(self, key: str) -> Path:
        # Keys are made from checked digests and tag names; this is the last
        # line of defence against one that would leave the store.
        parts = key.split("/")
        if (
            key.startswith("/")
            or any(p in ("", ".", "..") for p in parts[:-1])
            or parts[-1]
            in (
                ".",
                "..",
            )
        ):
            raise StoreError(f"{key!r} is not a key of the store {self.url}")
        return self.root / key

    def _fail(self, e: OSError, doing: str) -> StoreError:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StoreError(
                f"cannot {doing} in the store {self.url}: {e.strerror}; "
                "ask for write access or choose another --store"
            )
        if e.errno == errno.ENOSPC:
            return StoreError(f"cannot {doing} in the store {self.url}: disk full; free space")
        return StoreError(f"cannot {doing} in the store {self.url}: {e.strerror or e}")

    def _file_mode(self) -> int:
        """``0644 & ~umask``; group read/write too in a group-shared store."""
        return (0o644 & ~current_umask()) | (0o064 if group_shared(self.root) else 0)

    def _place(self, key: str, fill) -> None:
        """Create ``key`` through a temporary file in its directory."""
        final = self._path(key)
        try:
            make_dirs_under(self.root, final.parent)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        except OSError as e:
            raise self._fail(e, f"write {key}") from None
        try:
            try:
                fill(fd, tmp)
                os.chmod(tmp, self._file_mode())
                os.replace(tmp, final)
            except OSError as e:
                raise self._fail(e, f"write {key}") from None
        except BaseException:
            unlink_quietly(tmp)
            raise

    def read(self, key: str, limit: int | None = None) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                data = f.read() if limit is None else f.read(limit + 1)
            if limit is not None and len(data) > limit:
                raise too_big(f"{self.url}/{key}", limit)
            return data
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise self._fail(e, f"read {key}") from None

    def write(self, key: str, data: bytes) -> None:
        def fill(fd: int, tmp: str) -> None:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        self._place(key, fill)

    def upload(
        self, key: str, path: Path, digest: str, progress: Progress | None, move: bool = False
    ) -> None:
        def fill(fd: int, tmp: str) -> None:
            if move:
                try:
                    os.close(fd)
                    os.replace(path, tmp)  # same filesystem: no copy
                    return
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())

        self._place(key, fill)

    def download(
        self, key: str, dest: Path, progress: Progress | None, size: int | None = None
    ) -> None:
        try:
            with open(self._path(key), "rb") as src, open(dest, "wb") as out:
                if size is not None and os.fstat(src.fileno()).st_size > size:
                    raise too_large(f"{self.url}/{key}", size)
                while chunk := src.read(8 << 20):
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
        except FileNotFoundError:
            raise NotFoundError(f"{self.url}/{key} does not exist") from None
        except OSError as e:
            raise self._fail(e, f"read {key}") from None

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise self._fail(e, f"read {key}") from None

    def keys(self, prefix: str) -> list[str]:
        try:
            names = os.listdir(self._path(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise self._fail(e, f"list {prefix}") from None
        return sorted(prefix + n for n in names if not n.startswith("."))

    def walk(self, prefix: str) -> list[Stored]:
        out = []
        top = self._path(prefix.rstrip("/") or ".") if prefix.strip("/") else self.root

        def fail(e: OSError) -> None:
            if not isinstance(e, FileNotFoundError):
                raise self._fail(e, f"list {prefix}")

        try:
            for dirpath, dirnames, filenames in os.walk(top, onerror=fail):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = os.path.relpath(dirpath, self.root)
                for name in sorted(filenames):
                    if name.startswith("."):  # a writer's temporary file
                        continue
                    try:
                        st = os.lstat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    key = name if rel == "." else f"{rel}/{name}"
                    out.append(Stored(key, st.st_size, st.st_mtime))
        except OSError as e:
            raise self._fail(e, f"list {prefix}") from None
        return out

    def local_digest(self, key: str) -> str | None:
        try:
            return "sha256:" + sha256_file(self._path(key))[0]
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise self._fail(e, f"read {key}") from None

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._fail(e, f"remove {key}") from None

    def staging_dir(self) -> Path:
        """A directory on the store's filesystem for archives about to be moved
        in; staging directories and temporary files that killed writers left
        more than an hour ago are removed on the way."""
        make_dirs_under(self.root, self.root)
        self._clean_abandoned()
        return self.root

    def _clean_abandoned(self, age: float = 3600.0) -> None:
        import time

        from ..fsutil import remove_tree

        now = time.time()
        spots = [self.root] + [self.root / d for d in ("crates", "tags")]
        spots += list((self.root / "blobs" / "sha256").glob("??"))
        for d in spots:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if not (
                    name.startswith(".envcrate-ship-")
                    or (name.startswith(".") and name.endswith(".tmp"))
                ):
                    continue
                p = d / name
                try:
                    if now - p.lstat().st_mtime > age:
                        remove_tree(p)
                except OSError:
                    pass  # another user's, or gone already
