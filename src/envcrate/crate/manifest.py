"""Manifests, file tables, crate ids and canonical JSON.

The *file table* is one canonical JSON array per entry, sorted by path:
``[type, mode, size, digest_or_target, path]`` where type is ``f`` (file),
``d`` (directory) or ``l`` (symlink), mode is ``"755"`` or ``"644"``, size is
the archived size of a file (0 otherwise) and the fourth field is the sha256
hex of a file's archived bytes, a link's target or ``""`` for a directory.
The crate id (:func:`crate_id_of`) is ``sha256:`` + the sha256 of a version
line, the manifest's relocation spec and the table's bytes, so it depends on
the entries as archived and on what relocation does with them, and on
nothing else (no mtimes, owners, format or compression settings).
"""

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

from ..ids import normalize_id, short_id  # noqa: F401  (re-exported)

# The crate format. 2: the crate id covers the relocation spec too (crate_id_of).
# 3: venvs are archived with a placeholder for their prefix (envs.venv), and
# the format is in the id. Crates of format 2 are still read.
SCHEMA = 3
OLDEST_SCHEMA = 2
META_DIR = ".envcrate"
MANIFEST_MEMBER = f"{META_DIR}/manifest.json"
FILES_MEMBER = f"{META_DIR}/files.jsonl"


class FileRow(NamedTuple):
    """One entry of the file table, as archived. A named tuple: unpacking
    decodes one per entry before extracting, and tuples are made 5x faster
    than frozen dataclass instances (15,000 rows: 15 ms instead of 55)."""

    type: str  # "f", "d" or "l"
    path: str
    mode: str = "644"
    size: int = 0
    digest: str = ""  # sha256 hex for files, link target for links

    def encode(self) -> bytes:
        return canonical_json([self.type, self.mode, self.size, self.digest, self.path])

    @classmethod
    def decode(cls, line: bytes) -> "FileRow":
        t, mode, size, digest, path = json.loads(line)
        return cls(type=t, path=path, mode=mode, size=size, digest=digest)


def canonical_json(obj: "Any") -> bytes:
    """Deterministic compact JSON: sorted keys, ASCII only (lone surrogates
    from non-UTF-8 file names survive the round trip)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def encode_table(rows: "Iterable[FileRow]") -> bytes:
    # The same bytes as FileRow.encode() per row (tested), without json.dumps's
    # per-call cost: 13,000 rows take 10 ms instead of 90.
    q = encode_basestring_ascii
    return "".join(
        f"[{q(r.type)},{q(r.mode)},{r.size:d},{q(r.digest)},{q(r.path)}]\n" for r in rows
    ).encode()


def decode_table(data: bytes) -> "list[FileRow]":
    return list(iter_table(data))


def iter_table(data: bytes, block: int = 1024) -> "Iterator[FileRow]":
    """The rows of a file table, decoded ``block`` lines at a time: one
    json.loads per block (per-line calls cost ~20 µs each), and extraction
    starts after the first block instead of after the whole table (50 ms
    for 15,000 rows)."""
    lines = table_lines(data)
    for i in range(0, len(lines), block):
        yield from decode_rows(lines[i : i + block], i)


def table_lines(data: bytes) -> "list[bytes]":
    """A file table's lines, one per row."""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def decode_rows(lines: "list[bytes]", first: int = 0) -> "list[FileRow]":
    """The rows of these lines of a file table (``first``: the number of
    lines before them, for the error)."""
    new = tuple.__new__
    try:
        rows = json.loads(b"[" + b",".join(lines) + b"]")
        return [new(FileRow, (t, path, mode, size, digest)) for t, mode, size, digest, path in rows]
    except (ValueError, TypeError):
        from ..errors import ArchiveError

        raise ArchiveError(
            f"line {first + 1}.. of the crate's file table is not a valid row; the crate is corrupt"
        ) from None


def crate_id_of(table: bytes, manifest: dict) -> str:
    """The crate id: sha256 over a line naming the manifest's format, its
    relocation spec (see :func:`relocation_spec`) and the file table. Both are content: the id
    pins every byte extracted and everything relocation does with them."""
    schema = manifest.get("schema")
    h = hashlib.sha256(b"envcrate crate %d\n" % (schema if type(schema) is int else 0))
    h.update(relocation_spec(manifest))
    h.update(b"\n")
    h.update(table)
    return "sha256:" + h.hexdigest()


def relocation_spec(manifest: dict) -> bytes:
    """The parts of a manifest that drive relocation and interpreter set-up,
    as canonical JSON: the kind, the Python it needs (implementation,
    major.minor, ABI flags), each file that embeds a placeholder (path,
    placeholder, text or binary), and for venvs the names and kinds of the
    base-interpreter links and the ``pyvenv.cfg`` keys relocation writes.
    Not the original prefix, nor the build host's interpreter paths (hints
    for finding an interpreter here, never trusted as more): they would make
    the id depend on where the env was built."""
    py = manifest.get("python") or {}
    venv = manifest.get("venv") or {}
    version = py.get("version", "")
    spec = {
        "kind": manifest.get("kind"),
        "python": [
            py.get("implementation", ""),
            ".".join(version.split(".")[:2]) if isinstance(version, str) else version,
            py.get("abiflags", ""),
        ],
        "prefix_files": sorted(
            [r.get("path"), r.get("placeholder"), r.get("mode")]
            for r in manifest.get("prefix_files", [])
        ),
        "base_links": sorted([b.get("path"), b.get("kind")] for b in venv.get("base_links", [])),
        "cfg": sorted(venv.get("cfg", {})),
    }
    return canonical_json(spec)


def sort_key(path: str) -> bytes:
    """Entries are sorted by the bytes of their path, so a directory comes
    right before everything below it."""
    return path.encode("utf-8", "surrogateescape")


class Manifest:
    """The content description of a crate; serialised as canonical JSON.

    Only content lives here: no blob digest, size of the archive or creation
    time (those are in the archive record beside it). Every manifest read is
    checked by :func:`check_manifest` first: its fields can then be used
    without further type checks.
    """

    __slots__ = ("data",)

    def __init__(self, data: dict) -> None:
        self.data = data

    def __eq__(self, other) -> bool:
        return type(other) is Manifest and other.data == self.data

    __hash__ = None  # as a dict's

    def __repr__(self) -> str:
        return f"Manifest({self.data!r})"

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def prefix(self) -> str:
        return self.data["prefix"]

    @property
    def python(self) -> dict:
        return self.data.get("python") or {}

    @property
    def platform(self) -> dict:
        return self.data["platform"]

    @property
    def prefix_files(self) -> "list[dict]":
        return self.data.get("prefix_files", [])

    @property
    def venv(self) -> dict:
        return self.data.get("venv") or {}

    @property
    def pins(self) -> "list[dict]":
        return self.data.get("pins", [])

    @property
    def file_count(self) -> int:
        return self.data["files"]["count"]

    @property
    def file_bytes(self) -> int:
        return self.data["files"]["bytes"]

    def to_bytes(self) -> bytes:
        return canonical_json(self.data)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Manifest":
        from ..errors import ArchiveError

        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ArchiveError(f"the crate manifest is not valid JSON ({_one_line(e)})") from None
        manifest = cls.from_data(data)
        if manifest.to_bytes() != bytes(raw):
            # One manifest, one spelling: what unpacking writes is what was read.
            raise ArchiveError(
                "the crate manifest is not in envcrate's canonical JSON; the archive is corrupt "
                "or was not made by envcrate"
            )
        return manifest

    @classmethod
    def from_data(cls, data) -> "Manifest":
        """A manifest from its decoded JSON, checked (:func:`check_manifest`)."""
        check_manifest(data)
        return cls(data)


def _one_line(e: "BaseException") -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


MAX_MANIFEST = 64 << 20  # bytes; a larger manifest member is refused before it is read
MAX_TABLE = 256 << 20  # bytes of file table (about 2.5 million entries)
MAX_FILE = 1 << 44  # bytes; a larger file is refused (16 TiB)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"sha256:[0-9a-f]{64}")
_VERSION = re.compile(r"\d{1,9}(\.\d{1,9}){0,9}")
# What a base-interpreter link may be called: bin/python, bin/python3.11, bin/pypy3, bin/python3.13t...
BASE_LINK = re.compile(r"bin/(python|pypy|\U0001d70bthon)(\d+(\.\d+)?)?t?")


def check_manifest(data) -> None:
    """Refuse a manifest whose fields are not what envcrate writes (types,
    shapes, a crate id, a known kind and schema): a one-line
    :class:`ArchiveError` naming the field. What the fields mean is checked
    against the file table later (:func:`check_against_table`)."""
    from ..errors import ArchiveError

    def bad(field: str, what: str) -> "ArchiveError":
        return ArchiveError(
            f"the crate manifest's {field} {what}; the archive is corrupt or was not made by envcrate"
        )

    if not isinstance(data, dict):
        raise ArchiveError(
            "the crate manifest is not a JSON object; this is not an envcrate archive"
        )
    odd = _odd_string(data)
    if odd is not None:
        raise bad("text", f"holds a string that is not a file name's one spelling ({odd[:60]!a})")
    schema = data.get("schema")
    if type(schema) is not int:
        raise bad("schema", "is not a number")
    if schema > SCHEMA:
        raise ArchiveError(
            f"the crate uses format {schema}, newer than this envcrate understands ({SCHEMA}); "
            "upgrade envcrate"
        )
    if schema < OLDEST_SCHEMA:
        raise ArchiveError(
            f"the crate uses format {schema}, written by an older envcrate, whose crate id does not "
            "cover how the crate is relocated; pack the env again with this envcrate"
        )
    if not isinstance(data.get("id"), str) or not _ID.fullmatch(data["id"]):
        raise bad("id", "is not a crate id (sha256:<64 hex>)")
    if data.get("kind") not in ("venv", "conda"):
        raise bad("kind", "is neither venv nor conda")
    for key in ("name", "prefix", "envcrate"):
        if key in data and not isinstance(data[key], str):
            raise bad(key, "is not a string")
    if not isinstance(data.get("prefix"), str) or not data["prefix"].startswith("/"):
        raise bad("prefix", "is not an absolute path")
    _check_strings(data.get("prefix_aliases", []), bad, "prefix_aliases")
    platform = data.get("platform")
    if not isinstance(platform, dict) or not all(
        isinstance(platform.get(k), str) for k in ("os", "machine")
    ):
        raise bad("platform", "lacks its os or machine")
    libc = platform.get("libc", {})
    if not (
        isinstance(libc, dict)
        and isinstance(libc.get("family", ""), str)
        and (
            libc.get("version") is None
            or (isinstance(libc["version"], str) and _VERSION.fullmatch(libc["version"]))
        )
    ):
        raise bad("platform.libc", "is not a libc family and version")
    python = data.get("python", {})
    if not (
        isinstance(python, dict)
        and all(
            isinstance(python.get(k, ""), str) for k in ("implementation", "version", "abiflags")
        )
        and (not python.get("version") or _VERSION.fullmatch(python["version"]))
    ):
        raise bad("python", "is not an implementation, version and ABI flags")
    if data["kind"] == "venv" and not (python or {}).get("version"):
        raise bad("python", "lacks the version a venv needs")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
        type(files.get(k)) is int and files[k] >= 0 for k in ("count", "bytes")
    ):
        raise bad("files", "lacks its count or bytes")
    if "entries" in files and not (type(files["entries"]) is int and files["entries"] >= 0):
        raise bad("files.entries", "is not a count")
    prefix_files = data.get("prefix_files", [])
    if not isinstance(prefix_files, list) or not all(
        isinstance(r, dict)
        and isinstance(r.get("path"), str)
        and isinstance(r.get("placeholder"), str)
        and r["placeholder"]
        and "\0" not in r["placeholder"]
        and r.get("mode") in ("text", "binary")
        and _plain(r["path"])
        for r in prefix_files
    ):
        raise bad("prefix_files", "are not (relative path, placeholder, text or binary) records")
    venv = data.get("venv")
    if data["kind"] == "venv" and not isinstance(venv, dict):
        raise bad("venv", "is missing")
    if venv is not None:
        links = venv.get("base_links", []) if isinstance(venv, dict) else None
        if not isinstance(links, list) or not all(
            isinstance(b, dict)
            and isinstance(b.get("path"), str)
            and BASE_LINK.fullmatch(b["path"])
            and b.get("kind") in ("link", "copy")
            and isinstance(b.get("target", ""), str)
            for b in links
        ):
            raise bad("venv.base_links", "are not interpreter links named bin/python*")
        cfg = venv.get("cfg", {})
        if not isinstance(cfg, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in cfg.items()
        ):
            raise bad("venv.cfg", "is not a table of strings")
    pins = data.get("pins", [])
    if not isinstance(pins, list) or not all(
        isinstance(p, dict)
        and isinstance(p.get("name"), str)
        and all(isinstance(p.get(k, ""), str) for k in ("version", "kind", "url", "md5"))
        and isinstance(p.get("source") or {}, dict)
        and all(isinstance(v, str) for v in (p.get("source") or {}).values())
        for p in pins
    ):
        raise bad("pins", "are not name and version records")
    for key in ("flags", "conda"):
        if key in data and not isinstance(data[key], dict):
            raise bad(key, "is not an object")


def _odd_string(obj, depth: int = 0) -> "str | None":
    """A string in ``obj`` (JSON) that does not stand for one sequence of
    bytes: a lone surrogate, or escapes of bytes that are valid UTF-8 (names
    and prefixes are bytes on disk; two spellings of one would compare
    unequal and land as one)."""
    if isinstance(obj, str):
        try:
            back = obj.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
        except UnicodeError:
            return obj
        return None if back == obj else obj
    if depth > 20:
        return "(nested too deeply)"
    if isinstance(obj, dict):
        obj = [*obj.keys(), *obj.values()]
    if isinstance(obj, list):
        for item in obj:
            odd = _odd_string(item, depth + 1)
            if odd is not None:
                return odd
    return None


def _plain(path: str) -> bool:
    """A relative path without empty, ``.`` or ``..`` components."""
    return (
        bool(path) and "\0" not in path and all(p not in ("", ".", "..") for p in path.split("/"))
    )


def _check_strings(value, bad, field: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(field, "is not a list of strings")
