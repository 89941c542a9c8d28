"""Checking an archive completely without extracting it: everything
unpacking would refuse, every file's digest, the crate id and the blob
digest."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ..errors import ArchiveError, DigestMismatchError
from ..fsutil import sha256_file
from . import tar
from .extract import check_member, content_mismatch
from .manifest import Manifest, crate_id_of, decode_table
from .reading import open_stream
from .record import recorded_blob
from .tree import check_against_table, check_table


@dataclass(frozen=True)
class Verified:
    id: str
    blob: str
    blob_recorded: bool
    files: int


def verify_archive(archive: str | os.PathLike, blob: str | None = None) -> Verified:
    """Read ``archive`` from start to end as unpacking would (the same checks
    of the manifest, the file table and every member) and hash every file;
    raise a one-line :class:`~envcrate.errors.ArchiveError` naming the first
    problem, a :class:`DigestMismatchError` when the archive's digest is not
    ``blob`` (by default the one recorded beside it)."""
    archive = os.fspath(archive)
    if blob is None:
        blob = recorded_blob(archive)
    try:
        v = _verify(archive, blob)
    except ArchiveError:
        if blob:  # say what is wrong with the bytes, not where it showed first
            got = "sha256:" + sha256_file(archive)[0]
            if got != blob:
                raise _blob_mismatch(archive, got, blob) from None
        raise
    return v


def _blob_mismatch(archive: str, got: str, blob: str) -> DigestMismatchError:
    return DigestMismatchError(f"{archive}: the archive's digest is {got}, its record says {blob}")


def _verify(archive: str, blob: str | None) -> Verified:
    digest = hashlib.sha256()
    opened = open_stream(archive, digest)
    try:
        manifest = Manifest.from_bytes(opened.manifest_bytes)
        computed = crate_id_of(opened.table_bytes, manifest.data)
        if computed != manifest.id:
            raise DigestMismatchError(
                f"{archive}: the file table and manifest hash to {computed}, the manifest "
                f"says {manifest.id}"
            )
        tree = check_table(decode_table(opened.table_bytes))
        check_against_table(manifest, tree)
        rows = iter(tree.rows)
        stream = opened.stream
        for member in iter(stream.next_member, None):
            row = next(rows, None)
            path = check_member(member, row)
            if row.type == "f":
                h = hashlib.sha256()
                stream.pipe(member.size, h.update)
                stream.skip(tar.padding(member.size))
                if h.hexdigest() != row.digest:
                    raise content_mismatch(path)
        missing = next(rows, None)
        if missing is not None:
            raise DigestMismatchError(
                f"{archive}: entry {missing.path} is missing from the archive"
            )
        opened.finish()
    finally:
        opened.close()
    got = "sha256:" + digest.hexdigest()
    if blob and got != blob:
        raise _blob_mismatch(archive, got, blob)
    return Verified(manifest.id, got, bool(blob), len(tree.rows))
