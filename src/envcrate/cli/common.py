"""What the command groups share: their common options and how they print.

Cheap to import (argparse is imported only when a parser is built)."""

from __future__ import annotations

import sys

from . import emit  # noqa: F401 (the groups import it from here or from the package)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show progress on stderr even when it is not a terminal",
    )


def add_pack_options(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument(
        "--format",
        choices=["tar.zst", "tar.gz"],
        help="archive format (default: from -o's name, else tar.zst)"
        if output
        else "archive format (default: tar.zst)",
    )
    p.add_argument(
        "--level",
        type=int,
        help="compression level: zstd 1-22 (default: a tuned fast setting close to level 3's ratio), gzip 1-9 (default 6)",
    )
    p.add_argument("--threads", type=int, help="compression threads (default: all cores)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out matching paths (repeatable)",
    )
    p.add_argument(
        "--name", metavar="NAME", help="the conda env of this name (found without running conda)"
    )
    from ..envs import ALLOWANCES

    for what, text in ALLOWANCES.items():
        p.add_argument(
            f"--allow-{what}", dest="allow", action="append_const", const=what, help=text
        )


def add_store(
    p: argparse.ArgumentParser,
    text: str = "directory, file://, s3:// or https:// store (default: $ENVCRATE_STORE, "
    "then the local store in the user data directory)",
) -> None:
    p.add_argument("--store", metavar="URL", help=text)


def add_cache(p: argparse.ArgumentParser, many: bool = True) -> None:
    p.add_argument(
        "--cache",
        action="append",
        default=[],
        metavar="DIR",
        help="cache directory, searched in order"
        + (" (repeatable)" if many else "")
        + " (default: $ENVCRATE_CACHE, then the user cache directory)",
    )


def add_ensure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ref",
        metavar="REF",
        nargs="?",
        help="crate id, 12+ hex prefix, tag, archive path or archive URL",
    )
    p.add_argument(
        "--recipe",
        metavar="RECIPE",
        help="instead of REF: the crate `envcrate build RECIPE` made (its build key, from the "
        "recipe and its lock, looked up in the store; nothing is built)",
    )
    add_store(p)
    add_cache(p)
    p.add_argument("--python", help="base interpreter for a venv crate")
    p.add_argument("--sha256", metavar="DIGEST", help="blob digest of an archive URL or file")
    p.add_argument("--events", metavar="FILE", help="append bootstrap events (JSON lines) to FILE")
    p.add_argument(
        "--report",
        metavar="URL",
        help="also send each event to a report location (a directory or s3:// prefix) "
        "that `envcrate report URL` reads",
    )


def fail(message: str) -> None:
    print(f"envcrate: error: {message}", file=sys.stderr)
    sys.exit(1)


def pack_options(args) -> dict:
    from ..progress import wanted

    return dict(
        format=args.format,
        level=args.level,
        threads=args.threads,
        exclude=tuple(args.exclude),
        allow=tuple(args.allow or ()),
        name=args.name,
        progress=wanted(args.progress),
    )


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows))


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def os_error_message(e: OSError) -> str:
    """One line: what failed (the error, the path) and what to do about it."""
    import errno

    path = e.filename if e.filename is not None else ""
    where = f" ({path})" if path else ""
    what = f"{e.strerror or e}{where}"
    hint = {
        errno.ENOSPC: "free space on that filesystem and try again",
        errno.EACCES: "you lack permission on that path: ask its owner for access, "
        "or choose another path (e.g. --cache DIR of your own)",
        errno.EROFS: "that path is on a read-only filesystem: choose a writable one "
        "(e.g. --cache DIR)",
        errno.EDQUOT: "your disk quota is used up: free space within it, "
        "or choose another filesystem (e.g. --cache DIR)",
        errno.ENOENT: "that path does not exist: create it or fix the path",
    }
    hint[errno.EPERM] = hint[errno.EACCES]
    return f"{what}; {hint.get(e.errno, 'fix the path and try again')}"
