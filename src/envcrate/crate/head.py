"""An archive's head, read and checked: the manifest alone (its first frame),
or the manifest with the file table, which must hash to the crate id the
manifest names (:func:`envcrate.crate.manifest.crate_id_of`)."""

import os

from ..errors import DigestMismatchError
from .container import read_manifest_bytes
from .manifest import Manifest, crate_id_of
from .plan import read_plan
from .reading import open_stream


def read_manifest(archive: "str | os.PathLike") -> "Manifest":
    """The manifest of ``archive`` (its first frame only), its fields
    checked; not yet checked against the file table (see :func:`read_head`)."""
    return Manifest.from_bytes(read_manifest_bytes(os.fspath(archive)))


def read_head(archive: "str | os.PathLike") -> "Manifest":
    """The manifest of ``archive``, checked against its file table: the crate
    id it names is what the table and the manifest hash to. Reads only the
    head of a seekable crate."""
    return read_head_and_table(archive)[0]


def read_head_and_table(archive: "str | os.PathLike") -> "tuple[Manifest, bytes]":
    """:func:`read_head`'s manifest and the file table it was checked against."""
    archive = os.fspath(archive)
    plan = read_plan(archive)
    if plan is not None:
        manifest_bytes, table = plan.manifest_bytes, plan.table_bytes
    else:
        opened = open_stream(archive)
        try:
            manifest_bytes, table = opened.manifest_bytes, opened.table_bytes
        finally:
            opened.close()
    manifest = Manifest.from_bytes(manifest_bytes)
    check_id(archive, manifest, table, None)
    return manifest, table


def check_id(archive: str, manifest: "Manifest", table: bytes, crate_id: "str | None") -> None:
    got = crate_id_of(table, manifest.data)
    if got != manifest.id:
        raise DigestMismatchError(
            f"{archive}: its file table and manifest do not hash to the crate id it names "
            f"({manifest.id}); the archive is corrupt or was tampered with"
        )
    if crate_id is not None and got != crate_id:
        raise DigestMismatchError(f"{archive} holds crate {got}, not {crate_id}")
