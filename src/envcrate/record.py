"""Archive records: the manifest plus the archives that carry it.

The same shape is written beside a packed archive (``<archive>.json``) and,
in a store, as ``crates/<id>.json``: the manifest's keys plus ``archives``, a
list of ``{format, blob, size, created}``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from .manifest import Manifest


def archive_entry(fmt: str, blob: str, size: int) -> dict:
    return {
        "format": fmt,
        "blob": blob,
        "size": size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def with_archive(record: dict | None, manifest: dict, entry: dict) -> dict:
    """``record`` (or a new one from ``manifest``) listing ``entry``; an archive
    of the same format and blob keeps its first creation time."""
    out = dict(manifest)
    archives = [a for a in (record or {}).get("archives", []) if a.get("format") != entry["format"]]
    for a in (record or {}).get("archives", []):
        if a.get("format") == entry["format"] and a.get("blob") == entry["blob"]:
            entry = a
    out["archives"] = sorted([*archives, entry], key=lambda a: a["format"])
    return out


def encode_record(record: dict) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


def write_record(path: Path, manifest: Manifest, fmt: str, blob: str, size: int) -> dict:
    record = with_archive(None, manifest.data, archive_entry(fmt, blob, size))
    atomic_write(path, encode_record(record))
    return record


def read_record(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def recorded_blob(archive: str | os.PathLike, fmt: str | None = None) -> str | None:
    """The blob digest recorded beside a packed archive (``<archive>.json``),
    if there is one; ``fmt`` defaults to the archive's own format."""
    archive = os.fspath(archive)
    if fmt is None:
        from .reading import detect_format

        fmt = detect_format(archive)
    return blob_of(read_record(Path(archive + ".json")), fmt)


def manifest_of(record: dict) -> Manifest:
    """The manifest a crate record (``crates/<id>.json``) carries, its
    fields checked (:func:`envcrate.manifest.check_manifest`)."""
    return Manifest.from_data({k: v for k, v in record.items() if k != "archives"})


def blob_of(record: dict | None, fmt: str) -> str | None:
    for a in (record or {}).get("archives", []):
        if a.get("format") == fmt:
            return a.get("blob")
    return None


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
