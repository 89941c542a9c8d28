"""Unpacking: a crate archive becomes a working env at a destination.

The story: read the manifest (first frame only), check that this host and an
interpreter can run the crate, then read the manifest and the file table,
check that they hash to the crate id and that the table describes nothing
envcrate would not extract (:mod:`envcrate.crate.tree`), check the free space the
table needs, extract into a temporary directory beside the destination
(every file's bytes checked against the table as they are written, the
archive's digest computed meanwhile), relocate for the final path, and
rename into place. On any failure the temporary directory is removed, so
the destination either holds a complete env or nothing.
"""

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from ..crate.extract import extract
from ..crate.frames import extract_frames
from ..crate.head import check_id, read_head, read_manifest  # noqa: F401 (also the CLI's)
from ..crate.manifest import Manifest, decode_table
from ..crate.plan import read_plan
from ..crate.platform import require_supported_os
from ..crate.reading import open_stream
from ..crate.record import recorded_blob
from ..crate.tree import Tree, check_against_table, check_table
from ..errors import ArchiveError, DigestMismatchError, EnvcrateError
from ..fsutil import current_umask, remove_tree
from ..procs import BackgroundHash
from ..progress import bar
from .compat import Interpreter, check_host, find_interpreter, probe_memo
from .relocate import relocate


def interpreter_for(
    manifest: "Manifest", python: "str | None", memo: "str | None" = None
) -> "Interpreter | None":
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
    archive: "str | os.PathLike",
    dest: "str | os.PathLike",
    *,
    python: "str | None" = None,
    blob: "str | None" = None,
    progress: bool = False,
    hashed: "BackgroundHash | None" = None,
) -> Path:
    """Extract and relocate ``archive`` into ``dest`` (which must not exist or
    be empty). ``blob`` is the expected archive digest; by default the one
    recorded beside the archive (``<archive>.json``) is checked when present.
    ``hashed``: the archive's hash, started by the caller (who cancels it)."""
    require_supported_os()
    archive = os.fspath(archive)
    # Checked against the table before the interpreter it names is looked for.
    manifest = read_head(archive)
    check_host(manifest.platform)
    interpreter = interpreter_for(manifest, python, probe_memo())

    final = Path(dest).expanduser().absolute()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise EnvcrateError(
            f"{final} exists and is not empty; choose a new destination or remove it"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    if blob is None:
        blob = recorded_blob(archive)
    if final.exists():
        final.rmdir()  # empty, checked above
    fill(archive, final, manifest, interpreter, blob=blob, progress=progress, hashed=hashed)
    return final


def _check_blob(archive: str, blob: str, got: "str | None" = None) -> None:
    """Refuse ``archive`` unless its digest (``got``, else hashed now) is ``blob``."""
    if got is None:
        from ..fsutil import sha256_file

        got = "sha256:" + sha256_file(archive)[0]
    if got != blob:
        raise DigestMismatchError(
            f"{archive} has digest {got}, expected {blob}; the archive is corrupt "
            "or was replaced: fetch it again"
        ) from None


def check_head(
    archive: str, manifest: "Manifest", manifest_bytes: bytes, table: bytes, crate_id: "str | None"
) -> "Tree":
    """The tree of the crate whose head (manifest and table) was read from
    ``archive``, checked: the manifest is ``manifest`` (the one the host and
    interpreter were checked with), manifest and table hash to its id (and
    to ``crate_id``, the one asked for, if given), the table lists only what
    can be extracted safely and the manifest's relocation records name it."""
    head = Manifest.from_bytes(manifest_bytes)
    if head.data != manifest.data:
        raise DigestMismatchError(
            f"{archive}: the manifest in the archive differs from the one it was described "
            "with (its record); the archive or its record is corrupt"
        )
    check_id(archive, head, table, crate_id)
    tree = check_table(decode_table(table))
    check_against_table(head, tree)
    return tree


def check_space(where: str, tree: "Tree") -> None:
    """Refuse to start when the filesystem of ``where`` lacks the space or
    the inodes that the crate's table says extracting it takes."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if free < tree.disk_bytes:
        raise EnvcrateError(
            f"not enough free space in {os.path.dirname(where)}: the crate needs "
            f"{tree.disk_bytes >> 20} MiB, {free >> 20} MiB are free; free space or choose "
            "another destination"
        )
    if st.f_files and st.f_favail < len(tree.rows):
        raise EnvcrateError(
            f"not enough free inodes in {os.path.dirname(where)}: the crate has "
            f"{len(tree.rows)} entries, {st.f_favail} inodes are free; remove files or choose "
            "another destination"
        )


def _extract(
    archive: str, tmp: str, manifest: "Manifest", crate_id, digest, tick, read_only: bool
) -> None:
    """Extract ``archive`` into ``tmp``, hashing it into ``digest``: frame by
    frame where it has a seek table and an index, else as one stream."""
    plan = read_plan(archive)
    if plan is not None:
        tree = check_head(archive, manifest, plan.manifest_bytes, plan.table_bytes, crate_id)
        check_space(tmp, tree)
        if extract_frames(archive, plan, tmp, digest, tree.links, tick, read_only=read_only):
            return
    opened = open_stream(archive, digest)
    try:
        tree = check_head(archive, manifest, opened.manifest_bytes, opened.table_bytes, crate_id)
        check_space(tmp, tree)
        extract(opened, tree.rows, tmp, tick, read_only=read_only)
        opened.finish()
    finally:
        opened.close()


def fill(
    archive: str,
    final: Path,
    manifest: "Manifest",
    interpreter: "Interpreter | None",
    *,
    blob: "str | None",
    crate_id: "str | None" = None,
    progress: bool = False,
    phase: "Callable[[str], None] | None" = None,
    seal: "Callable[[str], None] | None" = None,
    read_only: bool = False,
    hashed: "BackgroundHash | None" = None,
    group: bool = False,
) -> bool:
    """Extract ``archive`` into a temporary directory beside ``final`` while
    checking ``blob`` (hashing the archive meanwhile, unless ``hashed`` does)
    and that it is crate ``crate_id`` (if given), relocate it for ``final``,
    let ``seal`` finish it, and rename it into place. Returns False when
    ``final`` appeared meanwhile (another filler won): this copy is then
    discarded. ``group``: the tree is for a group-shared cache, so it is
    made group-readable whatever the umask (which is narrowed for the fill,
    in this process: its writers are forked from it)."""
    if group:
        mask = os.umask(0)
        os.umask(mask & ~0o050)
        try:
            return fill(
                archive,
                final,
                manifest,
                interpreter,
                blob=blob,
                crate_id=crate_id,
                progress=progress,
                phase=phase,
                seal=seal,
                read_only=read_only,
                hashed=hashed,
            )
        finally:
            os.umask(mask)
    phase = phase or (lambda state: None)
    digest = hashlib.sha256() if blob and hashed is None else None
    tmp = tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.envcrate-")
    try:
        phase("EXTRACTING")
        try:
            with bar(
                manifest.file_bytes, f"unpacking {manifest.data.get('name', '')}", progress
            ) as tick:
                _extract(archive, tmp, manifest, crate_id, digest, tick, read_only)
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
