"""The store: where crates are shipped, one layout for every backend::

    blobs/sha256/<2 hex>/<blob hex>   archive bytes
    crates/<crate hex>.json           crate record: manifest + archives; written last = published
    tags/<name>.json                  {"crate": "sha256:..."}

A backend implements a few primitives on keys (read, write, upload, download,
size, keys, delete); crates, records, refs and tags are handled here, once.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import DigestMismatchError, EnvcrateError, NotFoundError, StoreError
from ..fsutil import sha256_file, unlink_quietly
from ..ids import normalize_id, short_id
from ..record import archive_entry, encode_record, with_archive

Progress = Callable[[int], None]

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def check_tag(name: str) -> str:
    if not _TAG.match(name) or normalize_id(name) is not None:
        raise EnvcrateError(
            f"{name!r} cannot be a tag: use letters, digits and . _ : + - (up to 128, no '/'), "
            "and nothing that looks like a crate id (12 or more hex digits)"
        )
    return name


def blob_key(blob: str) -> str:
    hexd = blob.split(":", 1)[-1]
    return f"blobs/sha256/{hexd[:2]}/{hexd}"


def record_key(crate_id: str) -> str:
    return f"crates/{crate_id.split(':', 1)[-1]}.json"


def tag_key(name: str) -> str:
    return f"tags/{name}.json"


def preferred_archive(archives: list[dict]) -> dict:
    """The archive to fetch when any will do: the first format of
    ``archive.FORMATS`` (tar.zst, faster to unpack), whatever order the
    record lists them in."""
    from ..archive import FORMATS

    def rank(a: dict) -> int:
        fmt = a.get("format")
        return FORMATS.index(fmt) if fmt in FORMATS else len(FORMATS)

    return min(archives, key=rank)


class Store:
    """A place crates are shipped to. Subclasses implement the primitives."""

    url: str
    can_list = True
    writable = True
    can_presign = False  # can hand out URLs that need no credentials

    # ------------------------------------------------------------- primitives

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        """Store a small object atomically."""
        raise NotImplementedError

    def upload(
        self, key: str, path: Path, digest: str, progress: Progress | None, move: bool = False
    ) -> None:
        """Store the file at ``path`` (sha256 ``digest``) atomically; ``move``
        allows taking the file itself."""
        raise NotImplementedError

    def download(self, key: str, dest: Path, progress: Progress | None) -> None:
        """Write the object to the new file ``dest``; NotFoundError if missing."""
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        raise NotImplementedError

    def keys(self, prefix: str) -> list[str]:
        """Keys directly below ``prefix`` (a "directory" ending in /)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def presign(self, key: str, expires: int) -> str:
        raise StoreError(f"{self.url} cannot make presigned URLs; use an s3:// store")

    def require_writable(self) -> None:
        if not self.writable:
            raise StoreError(
                f"{self.url} is read-only (HTTP); push to the filesystem or S3 store it serves"
            )

    # ------------------------------------------------------------- crates

    def _json(self, key: str) -> dict | None:
        data = self.read(key)
        if data is None:
            return None
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise ValueError
            return obj
        except ValueError:
            raise StoreError(
                f"{self.url}/{key} is corrupt (not a JSON object); publish the crate again "
                "or remove it with `envcrate rm ... --force`"
            ) from None

    def record(self, crate_id: str) -> dict | None:
        """The crate's record, or None when it is not published here."""
        rec = self._json(record_key(crate_id))
        if rec is not None and rec.get("id") != crate_id:
            raise StoreError(
                f"{self.url}/{record_key(crate_id)} describes {rec.get('id')}, not {crate_id}; "
                "publish the crate again or remove it with `envcrate rm ... --force`"
            )
        return rec

    def archive(self, crate_id: str, fmt: str) -> dict | None:
        """The record's archive entry for ``fmt`` if its blob is really there."""
        rec = self.record(crate_id)
        for a in (rec or {}).get("archives", []):
            if a.get("format") == fmt and self.size(blob_key(a["blob"])) == a.get("size"):
                return a
        return None

    def listed_archive(self, crate_id: str, fmt: str | None = None) -> tuple[dict, dict]:
        """(record, archive entry) of a published crate: the ``fmt`` archive,
        or the preferred one (:func:`preferred_archive`); NotFoundError when
        there is none."""
        rec = self.record(crate_id)
        if rec is None:
            raise NotFoundError(f"crate {crate_id} is not in {self.url}")
        archives = [a for a in rec.get("archives", []) if fmt in (None, a.get("format"))]
        if not archives:
            raise NotFoundError(f"{crate_id} has no {fmt} archive in {self.url}")
        return rec, preferred_archive(archives)

    def publish(
        self,
        archive: Path,
        manifest: dict,
        fmt: str,
        blob: str,
        size: int,
        *,
        tag: str | None = None,
        move: bool = False,
        progress: Progress | None = None,
    ) -> bool:
        """Blob first, then the record, then the tag; True if bytes were uploaded.

        Two publishers of the same crate race harmlessly: the blob key is its
        content, and the record is merged and read back until it lists ours."""
        self.require_writable()
        if tag is not None:
            check_tag(tag)
        crate_id = manifest["id"]
        uploaded = False
        if self.size(blob_key(blob)) != size:
            self.upload(blob_key(blob), archive, blob, progress, move=move)
            uploaded = True
        entry = archive_entry(fmt, blob, size)
        for _ in range(5):
            try:
                current = self.record(crate_id)
            except StoreError:
                current = None  # a corrupt record is replaced
            if any(
                a.get("format") == fmt and a.get("blob") == blob
                for a in (current or {}).get("archives", [])
            ):
                break
            self.write(record_key(crate_id), encode_record(with_archive(current, manifest, entry)))
            # and read back: another publisher may have written at the same time
        else:
            raise StoreError(
                f"could not publish {crate_id} to {self.url}: its record kept changing; try again"
            )
        if tag is not None:
            self.write(tag_key(tag), encode_record({"crate": crate_id}))
        return uploaded

    def tags(self) -> dict[str, str]:
        """Every tag and the crate it points at."""
        out = {}
        for key in self.keys("tags/"):
            if key.endswith(".json"):
                obj = self._json(key) or {}
                if isinstance(obj.get("crate"), str):
                    out[key[len("tags/") : -len(".json")]] = obj["crate"]
        return out

    def crate_ids(self) -> list[str]:
        return sorted(
            "sha256:" + k[len("crates/") : -len(".json")]
            for k in self.keys("crates/")
            if k.endswith(".json") and normalize_id(k[len("crates/") : -len(".json")])
        )

    def resolve(self, ref: str) -> str:
        """A full crate id for ``ref``: a full id, a unique prefix of 12+ hex
        digits, or a tag."""
        hexd = normalize_id(ref)
        if hexd is not None and len(hexd) == 64:
            crate_id = "sha256:" + hexd
            if self.record(crate_id) is None:
                raise NotFoundError(f"crate {crate_id} is not in {self.url}")
            return crate_id
        if hexd is not None:
            if not self.can_list:
                raise EnvcrateError(
                    f"{self.url} cannot be listed (HTTP): give a full crate id or a tag"
                )
            found = [c for c in self.crate_ids() if c.split(":", 1)[1].startswith(hexd)]
            if not found:
                raise NotFoundError(f"no crate {ref} in {self.url}; `envcrate ls` lists them")
            if len(found) > 1:
                raise EnvcrateError(
                    f"{ref} is ambiguous in {self.url}: {', '.join(found)}; give more digits"
                )
            return found[0]
        check_tag(ref)
        obj = self._json(tag_key(ref))
        if obj is None:
            raise NotFoundError(f"no crate or tag {ref!r} in {self.url}; `envcrate ls` lists them")
        crate_id = obj.get("crate", "")
        if normalize_id(crate_id) is None or self.record(crate_id) is None:
            raise NotFoundError(
                f"tag {ref} in {self.url} points at {crate_id or 'nothing'}, which is not there; "
                "tag another crate"
            )
        return crate_id

    def set_tag(self, ref: str, name: str) -> str:
        self.require_writable()
        check_tag(name)
        crate_id = self.resolve(ref)
        self.write(tag_key(name), encode_record({"crate": crate_id}))
        return crate_id

    def listing(self) -> list[dict]:
        """Every published crate: id, tags, kind, python, size, created."""
        tags = self.tags()
        out = []
        for crate_id in self.crate_ids():
            rec = self.record(crate_id)
            if rec is None:
                continue  # removed while listing
            archives = rec.get("archives", [])
            out.append(
                {
                    "id": crate_id,
                    "tags": sorted(t for t, c in tags.items() if c == crate_id),
                    "name": rec.get("name"),
                    "kind": rec.get("kind"),
                    "python": (rec.get("python") or {}).get("version"),
                    "formats": [a.get("format") for a in archives],
                    "size": min((a.get("size", 0) for a in archives), default=0),
                    "created": min((a.get("created", "") for a in archives), default=""),
                }
            )
        return out

    def remove(self, ref: str, force: bool = False) -> dict:
        """Unpublish a crate: tags (only with ``force``), record, then blobs."""
        self.require_writable()
        crate_id = self.resolve(ref)
        tagged = sorted(t for t, c in self.tags().items() if c == crate_id)
        if tagged and not force:
            raise EnvcrateError(
                f"{crate_id} is tagged {', '.join(tagged)} in {self.url}; "
                "move or remove the tags first, or pass --force to remove them too"
            )
        rec = self.record(crate_id) or {}
        for t in tagged:
            self.delete(tag_key(t))
        self.delete(record_key(crate_id))
        blobs = [a["blob"] for a in rec.get("archives", []) if a.get("blob")]
        for b in blobs:
            self.delete(blob_key(b))
        return {"id": crate_id, "tags": tagged, "blobs": blobs}

    def fetch(
        self,
        crate_id: str,
        dest_dir: Path,
        fmt: str | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Download the crate's archive into ``dest_dir`` (``fmt``, or the
        preferred one: tar.zst when there is one), check its digest, and return its path; nothing is left under
        the final name unless it matches."""
        rec, a = self.listed_archive(crate_id, fmt)
        final = Path(dest_dir) / f"{rec.get('name', 'env')}-{short_id(crate_id)}.{a['format']}"
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{final.name}.", suffix=".part")
        os.close(fd)
        try:
            self.download(blob_key(a["blob"]), Path(tmp), progress)
            got = file_digest(Path(tmp))
            if got != a["blob"]:
                raise DigestMismatchError(
                    f"{self.url}/{blob_key(a['blob'])} has digest {got}, its record says "
                    f"{a['blob']}; the store's copy is damaged: push the crate again"
                )
            os.replace(tmp, final)
        except BaseException:
            unlink_quietly(tmp)
            raise
        return final


def file_digest(path: Path) -> str:
    """The blob digest of a file: ``sha256:<hex>``."""
    return "sha256:" + sha256_file(path)[0]
