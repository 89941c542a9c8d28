"""Packing: a source env becomes a crate archive.

The story: walk the env's entries and stream them, as they are found, once
into compressed frames (hashing and scanning each file on the way); once the
walk ends, check the free space and leave room for the head in front of the
body; derive the crate id from the file table, build the manifest, and put
manifest and table into that room. Nothing is visible under the final name
until it is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .crate.container import DEFAULT_LEVEL, FORMATS, format_of_name, head_frames
from .crate.inputs import prefetch
from .crate.manifest import SCHEMA, Manifest, crate_id_of, encode_table, short_id
from .crate.platform import host_platform, libc_record, require_supported_os
from .crate.record import write_record
from .crate.scan import Findings, Scanner
from .crate.writer import BodyWriter, assemble_copy, row_of
from .envs import load_env
from .envs.base import SourceEnv, as_bytes
from .errors import EnvcrateError
from .fsutil import current_umask, sha256_file, unlink_quietly
from .progress import bar


@dataclass(frozen=True)
class Crate:
    """A packed crate: its archive and what identifies it."""

    id: str
    blob: str
    size: int
    format: str
    archive: Path
    manifest: Manifest
    seconds: float = 0.0


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pack(
    env: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    format: str | None = None,
    level: int | None = None,
    threads: int | None = None,
    exclude: tuple[str, ...] = (),
    allow=(),
    name: str | None = None,
    progress: bool = False,
) -> Crate:
    """Pack a venv or conda env (default: the active one; ``name``: the conda
    env of that name) into ``output`` (a file, a directory, or the current
    directory) and return the :class:`Crate`. ``format`` defaults to the one
    ``output``'s name ends with, else tar.zst. ``allow`` lists what to pack
    anyway that is refused by default (``envcrate.envs.ALLOWANCES``)."""
    start = time.monotonic()
    require_supported_os()
    format = resolve_format(format, output)
    source = load_env(env, exclude, allow, name)
    return pack_source(
        source, output, format=format, level=level, threads=threads, progress=progress, start=start
    )


def resolve_format(format: str | None, output) -> str:
    if format is None:
        format = (format_of_name(os.fspath(output)) if output is not None else None) or "tar.zst"
    if format not in FORMATS:
        raise EnvcrateError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    return format


def pack_source(
    source: SourceEnv,
    output: str | os.PathLike | None,
    *,
    format: str,
    level: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    start: float | None = None,
) -> Crate:
    """Pack an already loaded source env (see :func:`pack`)."""
    start = time.monotonic() if start is None else start
    level = DEFAULT_LEVEL[format] if level is None else level
    if level is not None:
        _check_level(format, level)
    threads = threads or default_threads()
    out_dir, out_name = _output_place(output, format)
    scanner = _scanner(source)
    # Written under a temporary name, renamed once complete.
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{source.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as out:
            # Before the bar: it starts a thread, and the writer forks its
            # workers only while no other thread runs.
            writer = BodyWriter(out, format, level, threads, scanner)
            manifest = None

            def manifest_of(rows, table: bytes) -> bytes:
                nonlocal manifest
                manifest = _manifest(source, table, scanner.findings, rows)
                return manifest.to_bytes()

            try:
                shown = bar(None, f"packing {source.name}", progress)
                with shown as tick:
                    writer.progress = tick or writer.progress
                    result = _write_body(writer, out_dir, source, format, level, shown, manifest_of)
            except BaseException:
                writer.abort()
                raise
            if result.blob is not None:
                blob, size = result.blob, os.fstat(out.fileno()).st_size
        if result.blob is None:
            tmp = _copy_behind_head(tmp, out_dir, result, format)
            blob, size = sha256_file(tmp)
        os.chmod(tmp, 0o644 & ~current_umask())
        final = out_dir / (out_name or f"{source.name}-{short_id(manifest.id)}.{format}")
        os.replace(tmp, final)
    except BaseException:
        unlink_quietly(tmp)
        raise
    write_record(Path(str(final) + ".json"), manifest, format, "sha256:" + blob, size)
    return Crate(
        manifest.id, "sha256:" + blob, size, format, final, manifest, time.monotonic() - start
    )


def _copy_behind_head(path: str, out_dir: Path, result, fmt: str) -> str:
    """Make the archive in a new temporary file, head first and the body
    (at ``path``) copied behind it, when the head did not fit the room left
    for it (or for tar.gz, where no room is left); return its path."""
    fd, new = tempfile.mkstemp(dir=out_dir, prefix=os.path.basename(path)[:-4], suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as copy, open(path, "rb") as body:
            assemble_copy(copy, body, result, fmt)
    except BaseException:
        unlink_quietly(new)
        raise
    unlink_quietly(path)
    return new


def identify(source: SourceEnv) -> str:
    """The crate id ``source`` would pack to, computed without compressing or
    writing anything (``ship`` asks the store with it before packing): every
    file hashed and scanned for prefixes as packing does."""
    import hashlib

    scanner = _scanner(source)
    rows = []
    buf = bytearray(4 << 20)
    for entry, data in prefetch(source.entries):
        if entry.type != "f":
            rows.append(row_of(entry))
            continue
        meta = (entry.path, entry.scan, entry.placeholder, entry.placeholder_mode)
        if data is not None:
            rows.append(row_of(entry, len(data), hashlib.sha256(data).hexdigest()))
            scanner.merge([scanner.whole(meta, data, 0, len(data))])
            continue
        h = hashlib.sha256()
        size = 0
        scanner.begin(entry)
        try:
            with open(entry.source, "rb") as f:
                while n := f.readinto(buf):
                    h.update(memoryview(buf)[:n])
                    scanner.update(buf, 0, n)
                    size += n
        except OSError as e:
            raise EnvcrateError(f"cannot read {entry.source}: {e.strerror}") from None
        scanner.end()
        if size != entry.size:
            raise EnvcrateError(f"{entry.source} changed while it was being read; try again")
        rows.append(row_of(entry, size, h.hexdigest()))
    scanner.merge([scanner.pieces()])
    return _manifest(source, encode_table(rows), scanner.findings, rows).id


def _scanner(source: SourceEnv) -> Scanner:
    return Scanner(as_bytes(source.prefixes))


HOLD_LIMIT = 256 << 20  # compressed bytes held in memory while the walk goes on


def _write_body(
    writer: BodyWriter,
    out_dir: Path,
    source: SourceEnv,
    fmt: str,
    level: int | None,
    shown: bar,
    manifest_of: Callable[[list, bytes], bytes],
):
    """Pack the entries as the walk finds them. Nothing is written before the
    walk ends: then the free space is checked and the room for the head is
    estimated. The frames compressed meanwhile wait in memory, up to
    HOLD_LIMIT bytes; past that, packing waits for the walk."""
    writer.hold()
    walked = False

    def when_walked() -> None:
        total = sum(e.size for e in source.found if e.type == "f")
        _check_space(out_dir, total)
        shown.set_total(total)
        room = (lambda: _head_room(source, fmt, level)) if fmt == "tar.zst" else (lambda: 0)
        writer.leave_room(room)

    try:
        for entry in source.stream():
            if not walked and writer.held > HOLD_LIMIT:
                # The walk is slow (a metadata-bound shared filesystem): stop
                # packing until it ends rather than hold the archive in memory.
                source.finish_walk()
            if not walked and source.walked:
                walked = True
                when_walked()
            writer.add(entry)
        if not walked:
            when_walked()
        return writer.finish(manifest_of)
    except BaseException:
        source.stop_walk()  # else it walks on, for nothing, to the end
        writer.abort()
        raise


def _head_room(source: SourceEnv, fmt: str, level: int | None) -> int:
    """Bytes to leave in front of the body for the manifest and file-table
    frames: their compressed size with what packing will learn (digests,
    prefixes found by scanning) stood in for, plus a margin. Depends only on
    the entries and settings, so the archive stays reproducible."""
    import random

    files = [e for e in source.entries if e.type == "f"]
    # Digests are random to a compressor; these stand in for them.
    digests = random.Random(len(files)).randbytes(32 * len(files)).hex()
    rows, k = [], 0
    for e in source.entries:
        if e.type == "f":
            rows.append(row_of(e, e.size, digests[k : k + 64]))
            k += 64
        else:
            rows.append(row_of(e))
    known = Findings(
        [
            {"path": e.path, "placeholder": e.placeholder, "mode": e.placeholder_mode}
            for e in files
            if e.placeholder
        ]
    )
    manifest = _manifest(source, None, known, rows)
    head = head_frames(manifest.to_bytes(), encode_table(rows), fmt, level).data
    return len(head) + len(head) // 64 + (8 << 10)


def _check_level(fmt: str, level: int) -> None:
    lo, hi = (1, 22) if fmt == "tar.zst" else (1, 9)
    if not lo <= level <= hi:
        raise EnvcrateError(f"--level {level} is out of range for {fmt} ({lo}..{hi})")


def _output_place(output, fmt: str) -> tuple[Path, str | None]:
    if output is None:
        return Path.cwd(), None
    out = Path(output).expanduser().absolute()
    if out.is_dir():
        return out, None
    if not out.parent.is_dir():
        raise EnvcrateError(f"cannot write {out}: {out.parent} is not a directory")
    if not out.name.endswith("." + fmt):
        raise EnvcrateError(
            f"the output name {out.name} should end with .{fmt} (the format being written)"
        )
    return out.parent, out.name


def _check_space(out_dir: Path, total: int) -> None:
    # Compressed envs are typically a third of their size; ask for half to be
    # safe (for tar.gz, or when the head outgrows the room left for it, the
    # body is copied once behind the head: twice a third).
    need = total // 2
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise EnvcrateError(
            f"not enough free space in {out_dir}: {free >> 20} MiB free, packing {total >> 20} MiB "
            f"needs about {need >> 20} MiB; free space or pass -o on another filesystem"
        )


def _manifest(source: SourceEnv, table: bytes | None, findings: Findings, rows) -> Manifest:
    """The manifest of ``source``, its id computed from ``table`` (None: a
    stand-in id, for estimating the manifest's size)."""
    platform = dict(host_platform(), libc=libc_record(findings.glibc))
    data = {
        "schema": SCHEMA,
        "id": "sha256:" + "0" * 64,
        "kind": source.kind,
        "name": source.name,
        "platform": platform,
        "python": source.python,
        # the prefix the archived files name (for venvs, the placeholder: the
        # build path would make the archive depend on where it was built)
        "prefix": source.placeholder or source.prefix,
        "prefix_aliases": []
        if source.placeholder
        else [p for p in source.prefixes if p != source.prefix],
        "prefix_files": sorted(findings.prefix_files, key=lambda r: (r["path"], r["placeholder"])),
        "pins": source.pins,
        "flags": source.flags,
        "files": {
            "count": sum(1 for r in rows if r.type == "f"),
            "entries": len(rows),
            "bytes": sum(r.size for r in rows if r.type == "f"),
        },
        "envcrate": __version__,
    }
    data.update(source.extra)
    if table is not None:
        data["id"] = crate_id_of(table, data)
    return Manifest(data)
