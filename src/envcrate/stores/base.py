"""The store: where crates are shipped, one layout for every backend::

    blobs/sha256/<2 hex>/<blob hex>   archive bytes
    crates/<crate hex>.json           crate record: manifest + archives; written last = published
    tags/<name>.json                  {"crate": "sha256:..."}

A backend implements a few primitives on keys (read, write, upload, download,
size, keys, walk, delete, and local_digest where hashing an object is cheap);
crates, records, refs and tags are handled here, once.

Everything read from a store is untrusted: records and tags are checked
before their contents become keys, paths or answers, and an archive that is
already published in a format is never replaced by other bytes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..crate.record import (
    archive_entry,
    check_record,
    encode_record,
    is_digest,
    with_archive,
)
from ..errors import ArchiveError, DigestMismatchError, EnvcrateError, NotFoundError, StoreError
from ..fsutil import sha256_file, unlink_quietly
from ..ids import ARCHIVE_SUFFIXES, looks_like_path, missing_hint, normalize_id, short_id

Progress = Callable[[int], None]

# Records and tags are read whole into memory: a store's object larger than
# this is refused (the largest records, of conda envs with thousands of
# files embedding their prefix, are a few MB).
MAX_RECORD = 64 << 20

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def check_tag(name: str) -> str:
    if not _TAG.match(name) or normalize_id(name) is not None:
        raise EnvcrateError(
            f"{name!r} cannot be a tag: use letters, digits and . _ : + - (up to 128, no '/'), "
            "and nothing that looks like a crate id (12 or more hex digits)"
        )
    return name


def check_digest(value: object, what: str = "blob digest") -> str:
    """``value`` if it is ``sha256:`` and 64 lowercase hex digits: digests
    become keys and paths, so nothing else may (a ``..`` would read any file)."""
    if not is_digest(value):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise StoreError(f"{shown} is not a {what} (sha256: and 64 lowercase hex digits)")
    return value  # type: ignore[return-value]


def blob_key(blob: str) -> str:
    hexd = check_digest(blob)[len("sha256:") :]
    return f"blobs/sha256/{hexd[:2]}/{hexd}"


def record_key(crate_id: str) -> str:
    return f"crates/{check_digest(crate_id, 'crate id')[len('sha256:') :]}.json"


def tag_key(name: str) -> str:
    return f"tags/{name}.json"


def build_key(key: str) -> str:
    """``builds/<hex>.json``: the record of a build key (``envcrate build``)."""
    return f"builds/{check_digest(key, 'build key')[len('sha256:') :]}.json"


def preferred_archive(archives: list[dict]) -> dict:
    """The archive to fetch when any will do: the first format of
    ``archive.FORMATS`` (tar.zst, faster to unpack), whatever order the
    record lists them in."""
    from ..crate.container import FORMATS

    def rank(a: dict) -> int:
        fmt = a.get("format")
        return FORMATS.index(fmt) if fmt in FORMATS else len(FORMATS)

    return min(archives, key=rank)


@dataclass(frozen=True)
class Published:
    """What :meth:`Store.publish` did: the archive the store now lists for the
    format (``blob``, ``size``), whether bytes were uploaded, and whether an
    intact archive of other bytes was already there and kept."""

    blob: str
    size: int
    uploaded: bool
    kept: bool = False


@dataclass(frozen=True)
class Stored:
    """One object found by :meth:`Store.walk`."""

    key: str
    size: int
    mtime: float  # seconds since the epoch


class Store:
    """A place crates are shipped to. Subclasses implement the primitives."""

    url: str
    can_list = True
    writable = True
    can_presign = False  # can hand out URLs that need no credentials
    given = True  # named by the user (not the default store): open_store clears it

    # ------------------------------------------------------------- primitives

    def read(self, key: str, limit: int | None = None) -> bytes | None:
        """The object's bytes, or None when it does not exist; with
        ``limit``, an object larger than that is an error (:func:`too_big`)
        read no further."""
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

    def download(
        self, key: str, dest: Path, progress: Progress | None, size: int | None = None
    ) -> None:
        """Write the object to the new file ``dest``; NotFoundError if missing.
        With ``size`` (the record's), an object that turns out larger is an
        error as soon as that is known: input is bounded by what the record says."""
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        raise NotImplementedError

    def keys(self, prefix: str) -> list[str]:
        """Keys directly below ``prefix`` (a "directory" ending in /)."""
        raise NotImplementedError

    def walk(self, prefix: str) -> list[Stored]:
        """Every object below ``prefix``, at any depth, with size and mtime."""
        raise NotImplementedError

    def local_digest(self, key: str) -> str | None:
        """The object's blob digest where the backend can compute it without a
        download (a directory store), else None."""
        return None

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
        data = self.read(key, MAX_RECORD)
        if data is None:
            return None
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise ValueError
            return obj
        except ValueError:
            if key.startswith("tags/"):
                raise StoreError(
                    f"{self.url}/{key} is a corrupt tag (not a JSON object); point it again "
                    f"with `envcrate tag REF {key[5:-5]}`, or remove broken tags with "
                    f"`envcrate fsck --store {self.url} --repair`"
                ) from None
            raise StoreError(
                f"{self.url}/{key} is corrupt (not a JSON object); publish the crate again "
                f"or remove it with `envcrate rm ID --force`; `envcrate fsck --store {self.url}` "
                "lists all such problems"
            ) from None

    def _malformed(self, key: str, what: str) -> StoreError:
        return StoreError(
            f"{self.url}/{key} is malformed: {what}; push the crate again or remove it with "
            f"`envcrate rm ID --force`; `envcrate fsck --store {self.url}` lists all such problems"
        )

    def record(self, crate_id: str) -> dict | None:
        """The crate's record, checked (:func:`check_record`), or None when
        it is not published here."""
        key = record_key(crate_id)
        rec = self._json(key)
        if rec is None:
            return None
        if rec.get("id") != crate_id:
            shown = repr(rec.get("id"))[:80]
            raise self._malformed(key, f"it describes {shown}, not {crate_id}")
        try:
            return check_record(rec)
        except ArchiveError as e:
            raise self._malformed(key, str(e)) from None

    def blob_state(self, entry: dict) -> str:
        """``"ok"``, ``"missing"`` or ``"damaged"``: whether the blob of an
        archive entry is there with its recorded size (and, where the backend
        can hash without a download, its digest)."""
        key = blob_key(entry["blob"])
        size = self.size(key)
        if size is None:
            return "missing"
        if size != entry["size"]:
            return "damaged"
        digest = self.local_digest(key)
        if digest is not None and digest != entry["blob"]:
            return "damaged"
        return "ok"

    def archive(self, crate_id: str, fmt: str) -> dict | None:
        """The record's archive entry for ``fmt`` if its blob is really there
        and intact (:meth:`blob_state`)."""
        rec = self.record(crate_id)
        for a in (rec or {}).get("archives", []):
            if a["format"] == fmt and self.blob_state(a) == "ok":
                return a
        return None

    def listed_archive(self, crate_id: str, fmt: str | None = None) -> tuple[dict, dict]:
        """(record, archive entry) of a published crate: the ``fmt`` archive,
        or the preferred one (:func:`preferred_archive`); NotFoundError when
        there is none."""
        rec = self.record(crate_id)
        if rec is None:
            raise NotFoundError(f"crate {crate_id} is not in {self.url}")
        archives = [a for a in rec["archives"] if fmt in (None, a["format"])]
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
    ) -> Published:
        """Blob first, then the record, then the tag. The caller has verified
        the archive (:func:`envcrate.crate.verify.verify_archive`).

        An intact archive of the crate already listed in ``fmt`` is kept, even
        when its bytes differ from ours (another compression level): nothing
        is uploaded. It is replaced only when its blob is missing or damaged.
        Two publishers of the same crate race harmlessly: the blob key is its
        content, and the record is merged and read back until it lists an
        intact archive of the format."""
        self.require_writable()
        if tag is not None:
            check_tag(tag)
        check_digest(blob)
        crate_id = check_digest(manifest["id"], "crate id")
        replaceable: set[str] = set()  # blobs of fmt found missing or damaged

        def listed() -> tuple[dict | None, dict | None]:
            try:
                current = self.record(crate_id)
            except StoreError:
                return None, None  # a corrupt record is replaced
            have = next(
                (a for a in (current or {}).get("archives", []) if a["format"] == fmt), None
            )
            return current, have

        def kept(have: dict, uploaded: bool) -> Published:
            if tag is not None:
                self.write(tag_key(tag), encode_record({"crate": crate_id}))
            return Published(have["blob"], have["size"], uploaded, kept=have["blob"] != blob)

        current, have = listed()
        if have is not None:
            if self.blob_state(have) == "ok":
                return kept(have, False)
            replaceable.add(have["blob"])
        uploaded = False
        if have is None or have["blob"] != blob or blob in replaceable:
            ours = {"blob": blob, "size": size}
            if blob in replaceable or self.blob_state(ours) != "ok":
                self.upload(blob_key(blob), archive, blob, progress, move=move)
                uploaded = True
        entry = archive_entry(fmt, blob, size)
        for _ in range(5):
            if have is not None and have["blob"] == blob and have["size"] == size:
                break
            if have is not None and have["blob"] not in replaceable:
                if self.blob_state(have) == "ok":  # another publisher's, meanwhile
                    return kept(have, uploaded)
                replaceable.add(have["blob"])
            self.write(record_key(crate_id), encode_record(with_archive(current, manifest, entry)))
            # and read back: another publisher may have written at the same time
            current, have = listed()
        else:
            raise StoreError(
                f"could not publish {crate_id} to {self.url}: its record kept changing; try again"
            )
        if tag is not None:
            self.write(tag_key(tag), encode_record({"crate": crate_id}))
        return Published(blob, size, uploaded)

    def tag_target(self, name: str) -> str | None:
        """The crate id a tag names (not checked to exist), or None when
        there is no such tag; a malformed tag is a StoreError."""
        key = tag_key(check_tag(name))
        obj = self._json(key)
        if obj is None:
            return None
        crate_id = obj.get("crate")
        if not is_digest(crate_id):
            shown = repr(crate_id)[:80]
            raise StoreError(
                f"{self.url}/{key} is a malformed tag: its 'crate' is {shown}, not a crate id; "
                f"point it again with `envcrate tag REF {name}`, or remove broken tags with "
                f"`envcrate fsck --store {self.url} --repair`"
            )
        return crate_id

    def build_target(self, key: str) -> str | None:
        """The crate a build key maps to, when the store has that crate
        (a record naming a crate that is not there, or a malformed record,
        counts as none: the build is made again and the record replaced).
        Like a tag, a build record is only as trustworthy as the store."""
        try:
            obj = self._json(build_key(key))
        except StoreError:
            return None
        crate_id = obj.get("crate") if obj is not None else None
        if not is_digest(crate_id) or self.record(crate_id) is None:
            return None
        return crate_id

    def set_build(self, key: str, crate_id: str, recipe: str) -> None:
        """Record that build ``key`` (of the recipe named ``recipe``) made
        ``crate_id`` (written after the crate is published)."""
        self.require_writable()
        self.write(build_key(key), encode_record({"crate": crate_id, "recipe": recipe}))

    def tag_names(self) -> list[str]:
        return [
            k[len("tags/") : -len(".json")]
            for k in self.keys("tags/")
            if k.endswith(".json") and _TAG.match(k[len("tags/") : -len(".json")])
        ]

    def tags(self, problems: list[str] | None = None) -> dict[str, str]:
        """Every tag and the crate it points at. A malformed tag raises, or,
        with ``problems``, is described there and left out."""
        out = {}
        for name in self.tag_names():
            try:
                crate_id = self.tag_target(name)
            except StoreError as e:
                if problems is None:
                    raise
                problems.append(str(e))
                continue
            if crate_id is not None:
                out[name] = crate_id
        return out

    def crate_ids(self) -> list[str]:
        names = (k[len("crates/") : -len(".json")] for k in self.keys("crates/"))
        return sorted("sha256:" + n for n in names if is_digest("sha256:" + n))

    def check_present(self) -> None:
        """Raise NotFoundError if the store given is plainly not there (a
        directory that does not exist); the others find out when asked."""

    def ls_hint(self) -> str:
        """The command that lists this store."""
        if not self.given:
            return "`envcrate ls`"
        import shlex

        return f"`envcrate ls --store {shlex.quote(self.url)}`"

    def resolve(self, ref: str) -> str:
        """A full crate id for ``ref``: a full id, a unique prefix of 12+ hex
        digits, or a tag."""
        self.check_present()
        if looks_like_path(ref):
            raise NotFoundError(
                f"no such archive: {ref} (no file there; a crate id, prefix or tag has no '/')"
            )
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
                raise NotFoundError(f"no crate {ref} in {self.url}; {self.ls_hint()} lists them")
            if len(found) > 1:
                raise EnvcrateError(
                    f"{ref} is ambiguous in {self.url}: {', '.join(found)}; give more digits"
                )
            return found[0]
        crate_id = self.tag_target(ref)
        if crate_id is None and ref.endswith(ARCHIVE_SUFFIXES):
            raise NotFoundError(f"no such archive: {ref}, nor a tag of that name in {self.url}")
        if crate_id is None:
            raise NotFoundError(
                f"no crate or tag {ref!r} in {self.url}{missing_hint(ref)}; "
                f"{self.ls_hint()} lists them"
            )
        if self.record(crate_id) is None:
            raise NotFoundError(
                f"tag {ref} in {self.url} points at {crate_id}, which is not there; "
                "tag another crate"
            )
        return crate_id

    def set_tag(self, ref: str, name: str) -> str:
        self.require_writable()
        check_tag(name)
        crate_id = self.resolve(ref)
        self.write(tag_key(name), encode_record({"crate": crate_id}))
        return crate_id

    def listing(self, problems: list[str] | None = None) -> list[dict]:
        """Every published crate: id, tags, kind, python, size, created. A
        malformed record or tag raises, or, with ``problems``, is described
        there and left out (one bad object does not hide the rest)."""
        self.check_present()
        tags = self.tags(problems)
        out = []
        for crate_id in self.crate_ids():
            try:
                rec = self.record(crate_id)
            except StoreError as e:
                if problems is None:
                    raise
                problems.append(str(e))
                continue
            if rec is None:
                continue  # removed while listing
            archives = rec["archives"]
            python = rec.get("python")
            version = python.get("version") if isinstance(python, dict) else None
            name = rec.get("name")
            out.append(
                {
                    "id": crate_id,
                    "tags": sorted(t for t, c in tags.items() if c == crate_id),
                    "name": name if isinstance(name, str) else None,
                    "kind": rec["kind"],
                    "python": version if isinstance(version, str) else None,
                    "formats": [a["format"] for a in archives],
                    "size": min((a["size"] for a in archives), default=0),
                    "created": min((a.get("created", "") for a in archives), default=""),
                }
            )
        return out

    def remove(self, ref: str, force: bool = False) -> dict:
        """Unpublish a crate: tags (only with ``force``), record, then blobs.
        With ``force``, a full crate id whose record is malformed is removed
        too; the blobs it seems to list are left to ``fsck``, which knows
        whether another record lists them (a malformed record is no
        authority to delete)."""
        self.require_writable()
        hexd = normalize_id(ref)
        rec: dict = {}
        if force and hexd is not None and len(hexd) == 64:
            crate_id = "sha256:" + hexd
            try:
                rec = self.record(crate_id) or {}
            except StoreError:
                rec = {"archives": []}
            if not rec:
                raise NotFoundError(f"crate {crate_id} is not in {self.url}")
        else:
            crate_id = self.resolve(ref)
        tagged = sorted(t for t, c in self.tags([]).items() if c == crate_id)
        if tagged and not force:
            raise EnvcrateError(
                f"{crate_id} is tagged {', '.join(tagged)} in {self.url}; "
                "move or remove the tags first, or pass --force to remove them too"
            )
        rec = rec or self.record(crate_id) or {}
        for t in tagged:
            self.delete(tag_key(t))
        self.delete(record_key(crate_id))
        blobs = [a["blob"] for a in rec.get("archives", [])]
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
        preferred one: tar.zst when there is one), check its size and digest,
        and return its path; nothing is left under the final name unless it
        matches."""
        rec, a = self.listed_archive(crate_id, fmt)
        final = Path(dest_dir) / archive_name(rec, crate_id, a["format"])
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{final.name}.", suffix=".part")
        os.close(fd)
        try:
            self.download(blob_key(a["blob"]), Path(tmp), progress, size=a["size"])
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


def archive_name(rec: dict, crate_id: str, fmt: str) -> str:
    """``<name>-<id12>.<format>``: what a fetched (or staged) archive is called."""
    name = rec.get("name")
    name = name if isinstance(name, str) and _TAG.match(name) else "env"
    fmt_name = fmt if fmt in ("tar.zst", "tar.gz") else "archive"
    return f"{name}-{short_id(crate_id)}.{fmt_name}"


def too_big(where: str, limit: int) -> StoreError:
    """The error for a record or tag larger than any record is."""
    return StoreError(
        f"{where} is larger than {limit} bytes, more than any record or tag; it is not one: "
        "remove it (`envcrate fsck` lists such problems)"
    )


def file_digest(path: Path) -> str:
    """The blob digest of a file: ``sha256:<hex>``."""
    return "sha256:" + sha256_file(path)[0]
