"""Checking an archive against its own records: blob digest and crate id."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from .errors import DigestMismatchError
from .manifest import Manifest, crate_id_of_table, decode_table, encode_table
from .reading import iter_rows, open_stream
from .record import recorded_blob


@dataclass(frozen=True)
class Verified:
    id: str
    blob: str
    blob_recorded: bool
    files: int


def verify_archive(archive: str | os.PathLike, blob: str | None = None) -> Verified:
    """Recompute the blob digest and every entry's digest; raise
    :class:`DigestMismatchError` naming the first mismatch."""
    archive = os.fspath(archive)
    if blob is None:
        blob = recorded_blob(archive)
    digest = hashlib.sha256()
    opened = open_stream(archive, digest)
    try:
        manifest = Manifest.from_bytes(opened.manifest_bytes)
        recorded = decode_table(opened.table_bytes)
        actual = []
        for i, row in enumerate(iter_rows(opened)):
            want = recorded[i] if i < len(recorded) else None
            if want != row:
                raise DigestMismatchError(
                    f"{archive}: entry {row.path} does not match the crate's file table"
                    + ("" if want is None or want.path != row.path else f" ({_diff(want, row)})")
                )
            actual.append(row)
        opened.finish()
        if len(actual) != len(recorded):
            raise DigestMismatchError(
                f"{archive}: entry {recorded[len(actual)].path} is missing from the archive"
            )
    finally:
        opened.close()
    computed = crate_id_of_table(encode_table(actual))
    if computed != manifest.id:
        raise DigestMismatchError(
            f"{archive}: the entries hash to {computed}, the manifest says {manifest.id}"
        )
    got = "sha256:" + digest.hexdigest()
    if blob and got != blob:
        raise DigestMismatchError(
            f"{archive}: the archive's digest is {got}, its record says {blob}"
        )
    return Verified(manifest.id, got, bool(blob), len(actual))


def _diff(want, got) -> str:
    if want.type != got.type:
        return f"type {got.type}, expected {want.type}"
    if want.size != got.size:
        return f"size {got.size}, expected {want.size}"
    if want.mode != got.mode:
        return f"mode {got.mode}, expected {want.mode}"
    return "content differs"
