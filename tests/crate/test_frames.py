"""Extraction frame by frame (envcrate.crate.frames): wherever the frames cut the
tar stream, the tree is the one a single pass over the stream makes."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path

import pytest
from archives import _crate

from envcrate import pack, unpack
from envcrate.crate import frames
from envcrate.crate import plan as plan_mod
from envcrate.crate.manifest import FileRow
from envcrate.errors import ArchiveError, EnvcrateError


def _tree(root: Path) -> dict:
    """Every entry below ``root`` but the metadata: (kind, mode, content or target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if rel.startswith(".envcrate"):
                continue
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), None)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def _members() -> list[tuple[FileRow, bytes]]:
    """Entries of every kind and length, with the headers envcrate writes: a
    directory, files empty, small, spanning several blocks and executable,
    names and link targets long enough for pax headers."""
    long_dir = "d/" + "n" * 120
    return [
        _entry(FileRow("d", "d", "755")),
        _entry(FileRow("f", "d/a.txt", "644", 1500), b"a" * 1500),
        _entry(FileRow("f", "d/empty", "644", 0)),
        _entry(FileRow("f", "d/far", "755", 18), b"#!/bin/sh\necho hi\n"),
        _entry(FileRow("l", "d/link", "777", 0, "a.txt")),
        _entry(FileRow("l", "d/long", "777", 0, "n" * 120 + "/x.py")),
        _entry(FileRow("d", long_dir, "755")),
        _entry(FileRow("f", long_dir + "/x.py", "644", 1280), bytes(range(256)) * 5),
        _entry(FileRow("f", "pyvenv.cfg", "644", 12), b"version = 3\n"),
        _entry(FileRow("f", "z", "644", 700), b"z" * 700),
    ]


def _entry(row: FileRow, data: bytes = b"") -> tuple[FileRow, bytes]:
    from envcrate.crate import tar

    name = row.path.encode()
    if row.type == "d":
        return row, tar.header(name, tar.DIRECTORY, 0o755)
    if row.type == "l":
        return row, tar.header(name, tar.SYMLINK, 0o777, 0, row.digest.encode())
    head = tar.header(name, tar.REGULAR, int(row.mode, 8), len(data))
    row = row._replace(digest=hashlib.sha256(data).hexdigest())
    return row, head + data + bytes(tar.padding(len(data)))


@pytest.mark.parametrize("cut", [1, 100, 511, 512, 513, 700, 1000, 4096])
def test_frames_cut_anywhere_give_the_same_tree(tmp_path, cut, monkeypatch):
    members = _members()
    whole = unpack(
        _crate(tmp_path / "one.tar.zst", members), tmp_path / "one", python=sys.executable
    )

    import archives

    real = archives.seekable
    monkeypatch.setattr(archives, "seekable", lambda head, body, _: real(head, body, cut))
    archive = _crate(tmp_path / "cut.tar.zst", members, layout="frames")
    plan = plan_mod.read_plan(str(archive))
    assert plan is not None and len(plan.frames) >= min(10, 6000 // cut)
    dest = unpack(archive, tmp_path / "cut", python=sys.executable)
    assert _tree(dest) == _tree(whole)
    assert (dest / "d" / "long").read_bytes() == bytes(range(256)) * 5


def test_spanning_files_end_read_only(tmp_path):
    """A cache entry's files have no write bits, those written in parts too
    (they are opened writable by each frame's writer, then made read-only)."""
    archive = _crate(tmp_path / "ro.tar.zst", _members(), layout="frames")
    plan = plan_mod.read_plan(str(archive))
    dest = tmp_path / "ro"
    dest.mkdir()
    from envcrate.crate.manifest import decode_table
    from envcrate.crate.tree import check_table

    links = check_table(decode_table(plan.table_bytes)).links
    frames.extract_frames(str(archive), plan, str(dest), None, links, read_only=True)
    files = [p for p in dest.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) >= 7
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o222 == 0, p
    assert stat.S_IMODE((dest / "d" / "far").stat().st_mode) & 0o111


def test_a_venv_in_small_frames_unpacks_as_one_stream_does(small_venv, tmp_path, monkeypatch):
    import envcrate.node.unpack as unpacker
    from envcrate.crate import writer

    monkeypatch.setattr(writer, "FRAME_SIZE", 16 * 1024)  # many files span frames
    monkeypatch.setattr(writer, "RAMP", 4 * 1024)
    crate = pack(small_venv, tmp_path / "small.tar.zst")
    plan = plan_mod.read_plan(str(crate.archive))
    assert plan is not None and len(plan.frames) > 50
    by_frames = unpack(crate.archive, tmp_path / "frames")
    monkeypatch.setattr(unpacker, "read_plan", lambda path: None)
    by_stream = unpack(crate.archive, tmp_path / "stream")
    a, b = _tree(by_frames), _tree(by_stream)
    assert len(a) > 100
    # Relocation writes each destination's own path into a few text files.
    moved = {k for k in a if a[k] != b[k]}
    assert all(str(by_frames).encode() in a[k][2] for k in moved)
    assert len(moved) < 20


@pytest.mark.parametrize("lie", ["header", "inside data"])
def test_frames_that_do_not_join_are_refused(tmp_path, monkeypatch, lie):
    """An index that moves a frame's start: a header is not where it says,
    or (for a frame wholly inside a file's data, where no header is seen)
    the frame before it ends elsewhere. Nothing is left."""
    import archives

    real = archives.seekable
    monkeypatch.setattr(archives, "seekable", lambda head, body, _: real(head, body, 100))
    members = _members()
    archive = _crate(tmp_path / "a.tar.zst", members, layout="frames")
    ordinal = {row.path: 2 + i for i, (row, _) in enumerate(members)}
    read_plan = plan_mod.read_plan

    def lying(path):
        plan = read_plan(path)
        if lie == "header":
            plan.frames[3] = plan.frames[3]._replace(at=plan.frames[3].at + 512)
        else:  # 100 bytes inside d/a.txt's data (1500 bytes), said to be inside z's (700)
            k = next(
                k
                for k, f in enumerate(plan.frames)
                if f.member == ordinal["d/a.txt"] and 512 <= f.at <= 1100
            )
            plan.frames[k] = plan.frames[k]._replace(member=ordinal["z"])
        return plan

    import envcrate.node.unpack as unpacker

    monkeypatch.setattr(unpacker, "read_plan", lying)
    with pytest.raises(ArchiveError, match="does not match|ends at member"):
        unpack(archive, tmp_path / "out" / "dest", python=sys.executable)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("when", ["serve", "frame"])  # before it reads a request, or on one
def test_a_writer_that_dies_is_an_error(tmp_path, monkeypatch, when):
    archive = _crate(tmp_path / "a.tar.zst", _members(), layout="frames")
    monkeypatch.setattr(frames._Work, when, lambda *args: os._exit(3))
    with pytest.raises(EnvcrateError, match="writer process died"):
        unpack(archive, tmp_path / "out" / "dest", python=sys.executable)
    assert list((tmp_path / "out").iterdir()) == []


def test_without_processes_the_archive_is_read_as_a_stream(tmp_path, monkeypatch):
    """Where no process can be forked (ulimit -u), the same tree comes from
    the threaded stream path."""
    members = _members()
    archive = _crate(tmp_path / "a.tar.zst", members, layout="frames")
    expected = _tree(unpack(archive, tmp_path / "forked", python=sys.executable))

    def cannot_fork():
        raise OSError(11, "Resource temporarily unavailable")

    import envcrate.crate.extract as extract

    streamed = []
    real_extract = extract.extract
    monkeypatch.setattr(os, "fork", cannot_fork)
    monkeypatch.setattr(
        "envcrate.node.unpack.extract", lambda *a, **k: streamed.append(1) or real_extract(*a, **k)
    )
    dest = unpack(archive, tmp_path / "threads", python=sys.executable)
    assert streamed and _tree(dest) == expected
