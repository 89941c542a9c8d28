"""Hostile archives are refused and leave nothing behind."""

from __future__ import annotations

import sys

import pytest
from archives import CASES, _crate, _file, _link, _member, seekable  # noqa: F401

from envcrate import unpack
from envcrate.crate.manifest import (
    encode_table,
)
from envcrate.errors import ArchiveError, UnsafeArchiveError

LAYOUTS = ["stream", "frames"]  # read as one stream, or frame by frame (see envcrate.crate.frames)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_archive_is_refused(tmp_path, case, layout):
    archive = _crate(tmp_path / "evil.tar.zst", [_file("ok.txt")] + CASES[case], layout=layout)
    dest = tmp_path / "out" / "dest"
    with pytest.raises(UnsafeArchiveError):
        unpack(archive, dest, python=sys.executable)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_well_formed_crafted_archive_extracts(tmp_path, layout):
    archive = _crate(
        tmp_path / "ok.tar.zst",
        [_file("a/b.txt", b"hello"), _link("c", "a/b.txt"), _file("pyvenv.cfg", b"version = 3\n")],
        layout=layout,
    )
    dest = unpack(archive, tmp_path / "dest", python=sys.executable)
    assert (dest / "c").read_bytes() == b"hello"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_file_table_that_is_not_rows_is_refused(tmp_path, layout):
    """Its digest is the crate id, so only its content can be wrong: one
    line-error, nothing left behind."""
    members = [_file(f"f{i}.txt") for i in range(3)]
    table = encode_table([row for row, _ in members]).replace(b"f1.txt", b'f1.txt"', 1)
    archive = _crate(tmp_path / "bad.tar.zst", members, table, layout)
    with pytest.raises(ArchiveError, match="file table"):
        unpack(archive, tmp_path / "out" / "dest", python=sys.executable)
    assert list((tmp_path / "out").iterdir()) == []
