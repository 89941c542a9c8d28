"""Unpacking: a crate archive becomes a working env at a destination.

The story: read the manifest (first frame only), check that this host and an
interpreter can run the crate, extract into a temporary directory beside the
destination while the archive's digest is computed, relocate for the final
path, and rename into place. On any failure the temporary directory is
removed, so the destination either holds a complete env or nothing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .compat import Interpreter, check_host, find_interpreter, probe_memo, require_supported_os
from .errors import ArchiveError, DigestMismatchError, EnvcrateError
from .extract import extract
from .frames import extract_frames, read_plan
from .fsutil import current_umask, remove_tree
from .manifest import Manifest, crate_id_of_table, iter_table
from .procs import BackgroundHash
from .progress import bar
from .reading import open_stream, read_manifest_bytes
from .record import recorded_blob
from .relocate import relocate


def read_manifest(archive: str | os.PathLike) -> Manifest:
    return Manifest.from_bytes(read_manifest_bytes(os.fspath(archive)))


def interpreter_for(
    manifest: Manifest, python: str | None, memo: str | None = None
) -> Interpreter | None:
    """The base interpreter a venv crate will use (None for conda crates);
    ``memo``: see :func:`compat.probe`."""
    if manifest.kind != "venv":
        return None
    venv = manifest.venv
    hints = [link.get("target", "") for link in venv.get("base_links", [])]
    cfg = venv.get("cfg", {})
    hints += [cfg.get("base-executable", ""), cfg.get("executable", "")]
    version = ".".join(manifest.python.get("version", "").split(".")[:2])
    if cfg.get("home"):
        hints.append(os.path.join(cfg["home"], f"python{version}"))
    return find_interpreter(manifest.python, python, [h for h in hints if h], memo)


def unpack(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    python: str | None = None,
    blob: str | None = None,
    progress: bool = False,
    hashed: BackgroundHash | None = None,
) -> Path:
    """Extract and relocate ``archive`` into ``dest`` (which must not exist or
    be empty). ``blob`` is the expected archive digest; by default the one
    recorded beside the archive (``<archive>.json``) is checked when present.
    ``hashed``: the archive's hash, started by the caller (who cancels it)."""
    require_supported_os()
    archive = os.fspath(archive)
    manifest = read_manifest(archive)
    check_host(manifest.platform)
    interpreter = interpreter_for(manifest, python, probe_memo())

    final = Path(dest).expanduser().absolute()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise EnvcrateError(
            f"{final} exists and is not empty; choose a new destination or remove it"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(final.parent).free
    if free < manifest.file_bytes:
        raise EnvcrateError(
            f"not enough free space in {final.parent}: the crate needs {manifest.file_bytes >> 20} MiB, "
            f"{free >> 20} MiB are free"
        )
    if blob is None:
        blob = recorded_blob(archive)
    if final.exists():
        final.rmdir()  # empty, checked above
    fill(archive, final, manifest, interpreter, blob=blob, progress=progress, hashed=hashed)
    return final


def _check_blob(archive: str, blob: str, got: str | None = None) -> None:
    """Refuse ``archive`` unless its digest (``got``, else hashed now) is ``blob``."""
    if got is None:
        from .stores import file_digest

        got = file_digest(Path(archive))
    if got != blob:
        raise DigestMismatchError(
            f"{archive} has digest {got}, expected {blob}; the archive is corrupt "
            "or was replaced: fetch it again"
        ) from None


def _check_head(archive: str, manifest: Manifest, manifest_bytes: bytes, table: bytes) -> None:
    if Manifest.from_bytes(manifest_bytes).data != manifest.data:
        raise DigestMismatchError(f"{archive}: the manifest changed while it was being read")
    if crate_id_of_table(table) != manifest.id:
        raise DigestMismatchError(
            f"{archive}: the file table does not match crate id {manifest.id}"
        )


def _extract(archive: str, tmp: str, manifest: Manifest, digest, tick, read_only: bool) -> None:
    """Extract ``archive`` into ``tmp``, hashing it into ``digest``: frame by
    frame where it has a seek table and an index, else as one stream."""
    plan = read_plan(archive)
    if plan is not None:
        _check_head(archive, manifest, plan.manifest_bytes, plan.table_bytes)
        if extract_frames(archive, plan, tmp, digest, tick, read_only=read_only):
            return
    opened = open_stream(archive, digest)
    try:
        _check_head(archive, manifest, opened.manifest_bytes, opened.table_bytes)
        extract(opened, iter_table(opened.table_bytes), tmp, tick, read_only=read_only)
        opened.finish()
    finally:
        opened.close()


def fill(
    archive: str,
    final: Path,
    manifest: Manifest,
    interpreter: Interpreter | None,
    *,
    blob: str | None,
    progress: bool = False,
    phase: Callable[[str], None] | None = None,
    seal: Callable[[str], None] | None = None,
    read_only: bool = False,
    hashed: BackgroundHash | None = None,
) -> bool:
    """Extract ``archive`` into a temporary directory beside ``final`` while
    checking ``blob`` (hashing the archive meanwhile, unless ``hashed`` does),
    relocate it for ``final``, let ``seal`` finish it, and rename it into
    place. Returns False when ``final`` appeared meanwhile (another filler
    won): this copy is then discarded."""
    phase = phase or (lambda state: None)
    digest = hashlib.sha256() if blob and hashed is None else None
    tmp = tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.envcrate-")
    try:
        phase("EXTRACTING")
        try:
            with bar(
                manifest.file_bytes, f"unpacking {manifest.data.get('name', '')}", progress
            ) as tick:
                _extract(archive, tmp, manifest, digest, tick, read_only)
        except ArchiveError:
            if blob:  # say what is wrong with the bytes, not where it showed first
                _check_blob(archive, blob)
            raise
        if blob:
            phase("VERIFYING")
            got = digest.hexdigest() if digest is not None else hashed.result()
            # None: the background hash failed, and the file is hashed here.
            _check_blob(archive, blob, None if got is None else "sha256:" + got)
        phase("RELOCATING")
        relocate(tmp, str(final), manifest, interpreter)
        os.chmod(tmp, 0o755 & ~current_umask())
        if seal is not None:
            seal(tmp)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir():
                remove_tree(tmp)
                return False
            raise
    except BaseException:
        remove_tree(tmp)
        raise
    return True
