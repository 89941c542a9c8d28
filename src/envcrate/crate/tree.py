"""The tree a crate's file table describes, checked before anything of it is
extracted.

A file table comes from the archive, so it is hostile until checked: its
digest is the crate id, which only says that it is the table the crate's
author wrote. :func:`check_table` refuses every row envcrate would not
write (types, modes, sizes, digests), every path that is not a plain
relative path or that lies in the crate's own metadata directory, rows out
of order or listed twice, any path below a link or a file, and every link
whose target, resolved against the links the table makes, leaves the
destination at any step. Extraction then only creates what the table lists,
below real directories, so no member can reach outside (links are made
last, relative to directory descriptors opened without following links).

:func:`check_against_table` binds the manifest's relocation records to the
table: every file relocation rewrites is a file of the table, and the
base-interpreter links are plain names under ``bin/`` that the table does
not list, in a ``bin/`` that is a directory.
"""

import re

from ..errors import ArchiveError, UnsafeArchiveError
from .manifest import MAX_FILE, META_DIR, FileRow, Manifest

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MODES = {"f": ("644", "755"), "d": ("755",), "l": ("777",)}
MAX_LINK_DEPTH = 40  # as the kernel's ELOOP limit
_META = META_DIR.encode()


def safe_path(path: str) -> bytes:
    """The bytes of a table path, refused unless it is a plain relative path
    (no empty, ``.`` or ``..`` component, no NUL) outside ``.envcrate/``."""
    name = encoded(path)
    if (
        name is None
        or not name
        or b"\0" in name
        or name[:1] == b"/"
        or name[-1:] == b"/"
        or b"//" in name
        or name == b"."
        or name == b".."
        or name.startswith((b"./", b"../"))
        or b"/./" in name
        or b"/../" in name
        or name.endswith((b"/.", b"/.."))
    ):
        raise UnsafeArchiveError(
            f"the crate's file table lists {_shown(path)}, which is not a plain relative path; "
            "refusing to extract"
        )
    if name == _META or name.startswith(_META + b"/"):
        raise UnsafeArchiveError(
            f"the crate's file table lists {_shown(path)}, inside envcrate's own {META_DIR}/; "
            "refusing to extract"
        )
    return name


def encoded(text: str) -> "bytes | None":
    """The bytes a table string stands for, or None when it is not the one
    spelling of them (a lone surrogate, or escapes of bytes that are valid
    UTF-8): two spellings of one name would be two paths to the checks and
    one on disk."""
    try:
        name = text.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return None
    return name if name.decode("utf-8", "surrogateescape") == text else None


def _shown(text: str) -> str:
    """A path as it can be printed on one line."""
    return (
        text.encode("utf-8", "backslashreplace")
        .decode("ascii", "backslashreplace")
        .replace("\n", "\\n")
    )


def check_row(row: "FileRow") -> None:
    """One row's fields are what envcrate writes (types, mode, size,
    digest or link target)."""
    t, path, mode, size, digest = row
    if type(path) is not str or t not in _MODES or type(mode) is not str or type(size) is not int:
        raise ArchiveError(
            f"a row of the crate's file table is malformed ({_shown(repr(row))[:200]})"
        )
    if mode not in _MODES[t]:
        raise ArchiveError(
            f"the crate's file table gives {_shown(path)} mode {_shown(mode)}; the crate is corrupt"
        )
    if t == "f":
        if not 0 <= size <= MAX_FILE or type(digest) is not str or not _HEX64.fullmatch(digest):
            raise ArchiveError(
                f"the crate's file table gives {_shown(path)} no valid size and sha256; "
                "the crate is corrupt"
            )
    elif size != 0 or type(digest) is not str:
        raise ArchiveError(f"the crate's file table row of {_shown(path)} is malformed")
    elif t == "d" and digest:
        raise ArchiveError(f"the crate's file table gives directory {_shown(path)} a digest")
    elif t == "l" and not _link_target_ok(digest):
        raise UnsafeArchiveError(
            f"link {_shown(path)} -> {_shown(digest)} is absolute or empty; refusing to extract"
        )


class Tree:
    """What a checked table lists: its rows, the type of every path, the
    links, and what extracting it takes on disk."""

    def __init__(
        self, rows: "list[FileRow]", kinds: "dict[str, str]", links: "list[tuple[str, str]]"
    ):
        self.rows = rows
        self.kinds = kinds
        self.links = links  # (path, target), in table order
        self.file_bytes = sum(r.size for r in rows if r.type == "f")
        self.file_count = sum(1 for t in kinds.values() if t == "f")
        # A lower bound of what extracting it takes on any filesystem: the
        # files' bytes (blocks, directories and inodes vary by filesystem).
        self.disk_bytes = self.file_bytes


# What no path of a table may contain, between NULs that stand for the
# ends of each path: a leading or trailing "/", an empty, "." or ".."
# component, or the metadata directory at the top (searched for one by
# one: bytes.find is ten times faster here than one regular expression).
_BAD_PATHS = [a + c + b for a in (b"\0", b"/") for c in (b".", b"..") for b in (b"/", b"\0")]
_BAD_PATHS += [b"\0/", b"/\0", b"\0\0", b"\0" + _META + b"/", b"\0" + _META + b"\0"]
_ROW_KINDS = {(t, m) for t, modes in _MODES.items() for m in modes}


def check_table(rows: "list[FileRow]") -> "Tree":
    """Refuse a table that lists anything envcrate would not extract (see the
    module docstring); the tree it describes. The rows are checked in bulk
    first (about 15 ms for 15,000 rows, against 70 one at a time); only a
    table that fails is gone through row by row, for the message."""
    if not _fine_in_bulk(rows):
        _refuse_row_by_row(rows)
    kinds: dict[str, str] = {}
    links: list[tuple[str, str]] = []
    get = kinds.get
    for t, path, _, _, digest in rows:
        # The nearest listed ancestor must be a directory (whose own
        # ancestors were checked when it was): nothing lies below a link.
        parent = path.rpartition("/")[0]
        while parent:
            kind = get(parent)
            if kind == "d":
                break
            if kind is not None:
                what = "a link" if kind == "l" else "a file"
                raise UnsafeArchiveError(
                    f"the crate's file table lists {_shown(path)} below {_shown(parent)}, "
                    f"which is {what}; refusing to extract"
                )
            parent = parent.rpartition("/")[0]
        kinds[path] = t
        if t == "l":
            links.append((path, digest))
    targets = dict(links)
    resolved: dict[str, list[str]] = {}
    for path, _ in links:
        _resolve_link(path, targets, kinds, resolved, 0)
    return Tree(rows, kinds, links)


def _fine_in_bulk(rows: "list[FileRow]") -> bool:
    """Whether every row is well formed, every path plain, and the paths
    strictly sorted, checked with a few passes in C."""
    if not rows:
        return True
    types, paths, modes, sizes, digests = zip(*rows)
    if set(map(type, paths)) != {str} or not set(zip(types, modes)) <= _ROW_KINDS:
        return False
    if set(map(type, sizes)) != {int} or set(map(type, digests)) != {str}:
        return False
    try:
        keys = [p.encode("utf-8", "surrogateescape") for p in paths]
    except UnicodeError:
        return False
    joined = b"\0" + b"\0".join(keys) + b"\0"
    if joined.count(b"\0") != len(keys) + 1 or any(bad in joined for bad in _BAD_PATHS):
        return False
    if joined.decode("utf-8", "surrogateescape") != "\0" + "\0".join(paths) + "\0":
        return False  # a name spelled in two ways (see encoded)
    if not all(map(bytes.__lt__, keys, keys[1:])):
        return False
    files = [(s, d) for t, s, d in zip(types, sizes, digests) if t == "f"]
    if files and not (0 <= min(s for s, _ in files) and max(s for s, _ in files) <= MAX_FILE):
        return False
    hexes = [d for _, d in files]
    if files and (
        set(map(len, hexes)) != {64}
        or "".join(hexes).encode("ascii", "replace").translate(None, b"0123456789abcdef")
    ):
        return False
    for t, s, d in zip(types, sizes, digests):
        if t != "f" and (s != 0 or (t == "d" and d) or (t == "l" and not _link_target_ok(d))):
            return False
    return True


def _link_target_ok(target: str) -> bool:
    return (
        bool(target)
        and "\0" not in target
        and not target.startswith("/")
        and encoded(target) is not None
    )


def _refuse_row_by_row(rows: "list[FileRow]") -> None:
    """Raise the error for the first row that is not fine."""
    prev = None
    for row in rows:
        check_row(row)
        key = safe_path(row.path)
        if prev is not None and key <= prev:
            raise ArchiveError(
                f"the crate's file table lists {_shown(row.path)} twice or out of order; "
                "the crate is corrupt"
            )
        prev = key
    raise ArchiveError("the crate's file table is malformed; the crate is corrupt")


def _resolve_link(
    path: str, targets: "dict[str, str]", kinds: "dict[str, str]", resolved: dict, depth: int
) -> "list[str]":
    """Where the link at ``path`` leads, as components below the
    destination, following the table's links as the kernel would; refused
    if any step leaves the destination."""
    done = resolved.get(path)
    if done is not None:
        return done
    if depth > MAX_LINK_DEPTH:
        raise UnsafeArchiveError(
            f"link {_shown(path)} starts a chain of more than {MAX_LINK_DEPTH} links; "
            "refusing to extract"
        )
    target = targets[path]
    parts = path.split("/")[:-1]
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise UnsafeArchiveError(
                    f"link {_shown(path)} -> {_shown(target)} leaves the destination; "
                    "refusing to extract"
                )
            parts.pop()
            continue
        parts.append(comp)
        here = "/".join(parts)
        if kinds.get(here) == "l":
            parts = list(_resolve_link(here, targets, kinds, resolved, depth + 1))
    resolved[path] = parts
    return parts


def check_against_table(manifest: "Manifest", tree: "Tree") -> None:
    """The manifest's relocation records name what the table holds: files to
    rewrite are files of the table, base-interpreter links are new names in
    a real ``bin/`` directory."""
    kinds = tree.kinds
    files = manifest.data["files"]
    if files["count"] != tree.file_count or files["bytes"] != tree.file_bytes:
        raise ArchiveError(
            "the crate manifest's file count or size differs from its file table; "
            "the archive is corrupt"
        )
    for rec in manifest.prefix_files:
        if kinds.get(rec["path"]) != "f":
            raise UnsafeArchiveError(
                f"the crate manifest lists {_shown(rec['path'])} for relocation, which is not "
                "a file of the crate; refusing to extract"
            )
    if manifest.kind != "venv":
        return
    links = manifest.venv.get("base_links", [])
    names = [b["path"] for b in links]
    if len(set(names)) != len(names):
        raise ArchiveError("the crate manifest lists a base-interpreter link twice")
    if links and kinds.get("bin", "d") != "d":
        raise UnsafeArchiveError(
            "the crate's bin is not a directory, but the manifest puts interpreter links in it; "
            "refusing to extract"
        )
    for name in names:
        if name in kinds:
            raise UnsafeArchiveError(
                f"{_shown(name)} is both a file of the crate and a base-interpreter link; "
                "refusing to extract"
            )
