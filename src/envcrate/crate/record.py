"""Archive records: the manifest plus the archives that carry it.

The same shape is written beside a packed archive (``<archive>.json``) and,
in a store, as ``crates/<id>.json``: the manifest's keys plus ``archives``, a
list of ``{format, blob, size, created}``.
"""

import json
import os
import re
import tempfile
import time
from pathlib import Path

from ..errors import ArchiveError
from .manifest import Manifest

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")


def is_digest(value: object) -> bool:
    """Whether ``value`` is a full digest: ``sha256:`` and 64 lowercase hex."""
    return isinstance(value, str) and _DIGEST.match(value) is not None


def digests_named(data: "bytes | None") -> "set[str]":
    """The blob digests a record that may be malformed seems to list (to keep
    them from being taken for orphans, or to remove them with it)."""
    try:
        archives = json.loads(data or b"")["archives"]
        return {a["blob"] for a in archives if is_digest(a["blob"])}
    except (ValueError, TypeError, KeyError, AttributeError):
        return set()


def check_record(record: object) -> dict:
    """``record`` if it has the shape of a crate record (an ``id``, a list of
    archives with a format, a blob digest and a size, and a manifest part
    :func:`manifest_of` accepts); else ArchiveError naming the key.
    Records come from stores and from beside archives: untrusted input."""
    if not isinstance(record, dict):
        raise ArchiveError("the record is not a JSON object")
    if not is_digest(record.get("id")):
        raise ArchiveError("its 'id' is not a crate id (sha256: and 64 lowercase hex digits)")
    archives = record.get("archives")
    if not isinstance(archives, list) or not all(isinstance(a, dict) for a in archives):
        raise ArchiveError("its 'archives' is not a list of objects")
    for a in archives:
        if not isinstance(a.get("format"), str):
            raise ArchiveError("an archive's 'format' is missing or not a string")
        if not is_digest(a.get("blob")):
            raise ArchiveError(
                f"the {a['format']} archive's 'blob' is missing or not a digest "
                "(sha256: and 64 lowercase hex digits)"
            )
        size = a.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ArchiveError(f"the {a['format']} archive's 'size' is not a byte count")
        if not isinstance(a.get("created", ""), str):
            raise ArchiveError(f"the {a['format']} archive's 'created' is not a string")
    manifest = manifest_of(record)
    # The fields readers of a store record subscript (info, ensure's host
    # check); manifest_of validates the manifest as a whole.
    try:
        fields = {
            "kind": isinstance(manifest.kind, str),
            "platform": isinstance(manifest.platform, dict),
            "python": isinstance(manifest.data.get("python") or {}, dict),
            "files": isinstance(manifest.data.get("files"), dict)
            and all(
                isinstance(n, int) and not isinstance(n, bool)
                for n in (manifest.file_count, manifest.file_bytes)
            ),
        }
    except (KeyError, TypeError, AttributeError) as e:
        key = e.args[0] if isinstance(e, KeyError) else "files"
        key = key if key in ("kind", "platform") else "files"
        raise ArchiveError(f"its manifest lacks {key!r} or has it of the wrong type") from None
    for key, good in fields.items():
        if not good:
            raise ArchiveError(f"its manifest's {key!r} has the wrong type")
    return record


def archive_entry(fmt: str, blob: str, size: int) -> dict:
    return {
        "format": fmt,
        "blob": blob,
        "size": size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def with_archive(record: "dict | None", manifest: dict, entry: dict) -> dict:
    """``record`` (or a new one from ``manifest``) listing ``entry``; an archive
    of the same format and blob keeps its first creation time."""
    out = dict(manifest)
    archives = [a for a in (record or {}).get("archives", []) if a.get("format") != entry["format"]]
    for a in (record or {}).get("archives", []):
        if a.get("format") == entry["format"] and a.get("blob") == entry["blob"]:
            entry = dict(entry, created=a.get("created") or entry["created"])
    out["archives"] = sorted([*archives, entry], key=lambda a: a["format"])
    return out


def encode_record(record: dict) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


def write_record(path: Path, manifest: "Manifest", fmt: str, blob: str, size: int) -> dict:
    record = with_archive(None, manifest.data, archive_entry(fmt, blob, size))
    atomic_write(path, encode_record(record))
    return record


def read_record(path: Path) -> "dict | None":
    """The record at ``path``, or None when there is none or it is not a
    JSON object (a record beside an archive is untrusted too)."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recorded_blob(archive: "str | os.PathLike", fmt: "str | None" = None) -> "str | None":
    """The blob digest recorded beside a packed archive (``<archive>.json``),
    if there is one; ``fmt`` defaults to the archive's own format."""
    archive = os.fspath(archive)
    if fmt is None:
        from .container import detect_format

        fmt = detect_format(archive)
    return blob_of(read_record(Path(archive + ".json")), fmt)


def manifest_of(record: dict) -> "Manifest":
    """The manifest a crate record (``crates/<id>.json``) carries, its
    fields checked (:func:`envcrate.crate.manifest.check_manifest`)."""
    return Manifest.from_data({k: v for k, v in record.items() if k != "archives"})


def blob_of(record: "dict | None", fmt: str) -> "str | None":
    archives = (record or {}).get("archives")
    for a in archives if isinstance(archives, list) else []:
        if isinstance(a, dict) and a.get("format") == fmt:
            blob = a.get("blob")
            return blob if isinstance(blob, str) else None
    return None


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
