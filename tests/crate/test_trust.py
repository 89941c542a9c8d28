"""What a crate id guarantees, tried as an attacker would: crafted archives,
records and manifests that keep an id while changing what lands on disk,
links that reach outside, inputs that inflate, and malformed fields. Each
must be refused with one line, leaving nothing anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from archives import _crate, _file, _link
from conftest import envcrate, publish

from envcrate import pack, unpack
from envcrate.crate.manifest import FileRow
from envcrate.errors import ArchiveError, DigestMismatchError, EnvcrateError

LAYOUTS = ["stream", "frames", "gz"]  # plain tar.zst, seekable tar.zst, tar.gz


def _lying_file(name: str, claimed: bytes, actual: bytes) -> tuple[FileRow, bytes]:
    """A member whose bytes are ``actual`` while its table row (and so the
    crate id) names ``claimed``, of the same size."""
    assert len(claimed) == len(actual)
    row, _ = _file(name, claimed)
    _, member = _file(name, actual)
    return row, member


def _sandbox(tmp_path: Path) -> Path:
    """A directory of its own, so that anything created outside the
    destination would show in it."""
    box = tmp_path / "box"
    box.mkdir()
    return box


def _one_line_error(out: subprocess.CompletedProcess, *words: str) -> str:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("envcrate: error:"), out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ------------------------------------------------------------ same table, other bytes


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [5, 1500])  # whole in a frame, or spanning frames of 700
def test_same_table_other_bytes_is_refused(tmp_path, layout, size):
    good = b"g" * size
    evil = b"e" * size
    members = [_file("a.txt", b"hello"), _lying_file("lib/x.py", good, evil)]
    archive = _crate(tmp_path / f"evil.{'tar.gz' if layout == 'gz' else 'tar.zst'}", members,
                     layout=layout)  # fmt: skip
    box = _sandbox(tmp_path)
    with pytest.raises(DigestMismatchError, match="lib/x.py"):
        unpack(archive, box / "dest", python=sys.executable)
    assert list(box.iterdir()) == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_table_other_bytes_never_reaches_a_cache(tmp_path, layout):
    """The entry for crate X would serve the other bytes to every later
    ``ensure X`` (a HIT) and ``run``; it must never be made."""
    good, evil = b"print('good')\n", b"print('evil')\n"
    members = [_lying_file("pyvenv.cfg", b"version = 3\n", b"version = 4\n")]
    members += [_lying_file("lib/x.py", good, evil)]
    suffix = "tar.gz" if layout == "gz" else "tar.zst"
    archive = _crate(tmp_path / f"evil.{suffix}", members, layout=layout)
    cache = tmp_path / "cache"
    out = envcrate("ensure", archive, "--cache", cache, "--python", sys.executable)
    _one_line_error(out, "content differs")
    assert [n for n in os.listdir(cache / "e") if not n.startswith(".")] == []
    assert [n for n in os.listdir(cache / "e") if n.startswith(".")] == []


# ------------------------------------------------------------ a lying record


def _two_crates(tmp_path: Path):
    from conftest import make_venv

    one = make_venv(tmp_path / "one")
    (one / "which.txt").write_text("one\n")
    two = make_venv(tmp_path / "two")
    (two / "which.txt").write_text("two\n")
    return pack(one, tmp_path / "c1"), pack(two, tmp_path / "c2")


def test_a_lying_record_beside_an_archive_does_not_key_the_cache(tmp_path):
    """``<archive>.json`` beside an archive of crate Y that names X: the
    cache must not put Y under X's key, nor return X's entry for Y."""
    (tmp_path / "c1").mkdir()
    (tmp_path / "c2").mkdir()
    x, y = _two_crates(tmp_path)
    record = Path(str(y.archive) + ".json")
    lie = json.loads(Path(str(x.archive) + ".json").read_text())
    x_key = x.id.split(":")[1][:16]
    for cached in (False, True):
        cache = tmp_path / f"cache-{cached}"
        if cached:  # X is in the cache already
            assert envcrate("ensure", x.archive, "--cache", cache).returncode == 0
        # X's record verbatim: its blob digest is not Y's archive's, so it is refused.
        record.write_text(json.dumps(lie, indent=1, sort_keys=True))
        _one_line_error(envcrate("ensure", y.archive, "--cache", cache), "digest")
        # X's record with Y's blob digest: Y's own files, under Y's key.
        lie_blob = dict(lie, archives=[dict(a, blob=y.blob) for a in lie["archives"]])
        record.write_text(json.dumps(lie_blob, indent=1, sort_keys=True))
        got = json.loads(envcrate("ensure", y.archive, "--cache", cache, "--json").stdout)
        assert got["id"] == y.id
        assert (Path(got["prefix"]) / "which.txt").read_text() == "two\n"
        keys = [n for n in os.listdir(cache / "e") if n.startswith(x_key)]
        assert keys == ([] if not cached else keys)
        for k in keys:
            assert (cache / "e" / k / "which.txt").read_text() == "one\n"


# ------------------------------------------------------------ links that reach outside


CHAINS = {
    # p/q -> .. makes p/q the destination; p/q/r -> .. is then its parent.
    "dirs": [_link("p/q", ".."), _link("p/q/r", ".."), _link("p/q/r/X", "planted")],
    "below-a-file": [_file("p"), _file("p/q")],
    "loop": [_link("a", "b"), _link("b", "a")],
    "through-two": [_link("a", "."), _link("b", "a/a/a/.."), _link("c", "b/..")],
    "leave-and-return": [_link("d/out", "../../box/dest/x")],
}


@pytest.mark.parametrize("layout", ["stream", "frames"])
@pytest.mark.parametrize("case", sorted(CHAINS))
def test_link_chains_leave_nothing_anywhere(tmp_path, case, layout):
    archive = _crate(tmp_path / "evil.tar.zst", [_file("ok.txt")] + CHAINS[case], layout=layout)
    box = _sandbox(tmp_path)
    with pytest.raises(ArchiveError):
        unpack(archive, box / "dest", python=sys.executable, blob="sha256:" + "0" * 64)
    assert list(box.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "evil.tar.zst"]


def test_a_link_chain_cannot_plant_another_entry_in_a_cache(tmp_path, small_crate):
    """In a cache the chain's parent is ``e/``: it would plant
    ``e/<another crate's key>`` as a link into this entry."""
    cache = tmp_path / "cache"
    key = "0123456789abcdef-01234567"
    chain = [_link("p/q", ".."), _link("p/q/r", ".."), _link(f"p/q/r/{key}", "p")]
    archive = _crate(tmp_path / "evil.tar.zst", [_file("pyvenv.cfg", b"version = 3\n")] + chain)
    out = envcrate("ensure", archive, "--cache", cache, "--python", sys.executable)
    _one_line_error(out, "refusing")
    assert os.listdir(cache / "e") == []


# ------------------------------------------------------------ the manifest is bound


def test_a_changed_relocation_record_changes_the_id(tmp_path):
    """An archive whose manifest gains a relocation record while keeping its
    id is refused: the id covers what relocation does."""
    members = [_file("lib/x.py", b"/nowhere/bin\n"), _file("pyvenv.cfg", b"version = 3\n")]
    archive = _crate(tmp_path / "a.tar.zst", members)
    honest = zstandard.ZstdDecompressor().decompressobj().decompress(archive.read_bytes())
    manifest_at = honest.index(b'{"')
    end = honest.index(b"\0", manifest_at)
    data = json.loads(honest[manifest_at:end])
    data["prefix_files"] = [{"path": "lib/x.py", "placeholder": "/", "mode": "text"}]
    from envcrate.crate import tar
    from envcrate.crate.manifest import MANIFEST_MEMBER, canonical_json

    raw = canonical_json(data)
    first = tar.header(MANIFEST_MEMBER.encode(), tar.REGULAR, 0o644, len(raw))
    first += raw + bytes(tar.padding(len(raw)))
    rest = honest[512 + len(honest[512:end]) + tar.padding(end - 512) :]
    evil = tmp_path / "evil.tar.zst"
    evil.write_bytes(zstandard.ZstdCompressor().compress(first + rest))
    box = _sandbox(tmp_path)
    with pytest.raises(DigestMismatchError, match="do not hash to the crate id"):
        unpack(evil, box / "dest", python=sys.executable)
    assert list(box.iterdir()) == []


@pytest.mark.parametrize("where", ["absolute", "dotdot", "a link"])
def test_relocation_never_rewrites_a_file_outside(tmp_path, where):
    victim = tmp_path / "victim.txt"
    victim.write_text("/nowhere is here\n")
    members = [_file("pyvenv.cfg", b"version = 3\n"), _link("l", str(victim.name))]
    path = {"absolute": str(victim), "dotdot": "../../victim.txt", "a link": "l"}[where]
    extra = {"prefix_files": [{"path": path, "placeholder": "/nowhere", "mode": "text"}]}
    archive = _crate(tmp_path / "a.tar.zst", members, extra=extra)
    with pytest.raises(ArchiveError, match="not a file of the crate|prefix_files"):
        unpack(archive, tmp_path / "dest", python=sys.executable)
    assert victim.read_text() == "/nowhere is here\n"
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("name", ["ABSOLUTE", "../evil", "bin/../../evil", "lib/x"])
def test_base_interpreter_links_are_plain_names_under_bin(tmp_path, name):
    name = str(tmp_path / "evil-link") if name == "ABSOLUTE" else name
    members = [_file("pyvenv.cfg", b"version = 3\n")]
    extra = {"venv": {"base_links": [{"path": name, "kind": "link", "target": sys.executable}],
                      "cfg": {}}}  # fmt: skip
    archive = _crate(tmp_path / "a.tar.zst", members, extra=extra)
    box = _sandbox(tmp_path)
    with pytest.raises(ArchiveError, match="base_links"):
        unpack(archive, box / "dest", python=sys.executable)
    assert list(box.iterdir()) == []
    assert not os.path.lexists(tmp_path / "evil-link")
    assert not os.path.lexists(tmp_path / "evil")


def test_an_interpreter_hint_that_is_a_script_is_never_run(tmp_path):
    """Only a validated interpreter runs: the crate's hints (where it was
    built) are only probed when they are ELF executables named like Python."""
    ran = tmp_path / "ran"
    script = tmp_path / "bin" / "python3"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\ntouch {ran}\n")
    script.chmod(0o755)
    members = [_file("pyvenv.cfg", b"version = 3\n")]
    extra = {"venv": {"base_links": [{"path": "bin/python", "kind": "link", "target": str(script)}],
                      "cfg": {"home": str(script.parent), "base-executable": str(script)}}}  # fmt: skip
    archive = _crate(tmp_path / "a.tar.zst", members, extra=extra)
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = "/nonexistent"  # nothing on PATH either: only the hints are left
    out = subprocess.run(
        [sys.executable, "-m", "envcrate.cli", "unpack", archive, tmp_path / "dest"],
        capture_output=True,
        text=True,
        env=env,
    )
    _one_line_error(out, "not an executable ELF file")
    assert not ran.exists()
    assert not (tmp_path / "dest").exists()


def test_crates_of_the_previous_format_are_refused_clearly(tmp_path):
    archive = _crate(tmp_path / "old.tar.zst", [_file("pyvenv.cfg", b"version = 3\n")],
                     extra={"schema": 1})  # fmt: skip
    out = envcrate("unpack", archive, tmp_path / "dest")
    _one_line_error(out, "format 1", "pack the env again")
    out = envcrate("info", archive)
    _one_line_error(out, "format 1")
    assert not (tmp_path / "dest").exists()


# ------------------------------------------------------------ bounded input


def _bomb(path: Path, fmt: str, size: int) -> Path:
    """An archive whose first frame (or gzip member) inflates to ``size``
    bytes of zeros (a few hundred KB compressed)."""
    chunk = bytes(16 << 20)
    if fmt == "tar.gz":
        import zlib

        co = zlib.compressobj(9, zlib.DEFLATED, 31)
        parts = [co.compress(chunk) for _ in range(size // len(chunk))]
        path.write_bytes(b"".join(parts) + co.flush())
        return path
    c = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    parts = [c.compress(chunk) for _ in range(size // len(chunk))]
    path.write_bytes(b"".join(parts) + c.flush())
    return path


def _limited(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


@pytest.mark.parametrize("fmt", ["tar.zst", "tar.gz"])
@pytest.mark.parametrize("command", ["info", "unpack", "ensure", "verify"])
def test_an_archive_that_inflates_is_refused_within_bounded_memory(tmp_path, fmt, command):
    bomb = _bomb(tmp_path / f"bomb.{fmt}", fmt, 1 << 30)
    assert bomb.stat().st_size < 2 << 20
    args = {
        "info": ["info", bomb],
        "unpack": ["unpack", bomb, tmp_path / "dest"],
        "ensure": ["ensure", bomb, "--cache", tmp_path / "cache"],
        "verify": ["verify", bomb],
    }[command]
    out = subprocess.run(
        [sys.executable, "-m", "envcrate.cli", *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=_limited(768 << 20),  # the bomb alone is 1 GiB
        timeout=120,
    )
    _one_line_error(out)
    assert "MemoryError" not in out.stderr
    assert not (tmp_path / "dest").exists()


def test_a_seek_table_that_claims_a_huge_head_is_refused(tmp_path):
    """The seek table's sizes are the archive's word: a head frame claiming
    gigabytes is refused before anything is allocated for it."""
    import struct

    from envcrate.crate import container

    body = zstandard.ZstdCompressor().compress(b"x" * 100)
    frames = [(len(body), 3 << 30)]
    index = json.dumps({"frames": [[0, 0]]}).encode()
    seek = b"".join(struct.pack("<II", *f) for f in frames)
    seek += struct.pack("<IBI", len(frames), 0, container.SEEKABLE_FOOTER_MAGIC)
    data = body + struct.pack("<II", container.INDEX_MAGIC, len(index)) + index
    data += struct.pack("<II", container.SEEK_TABLE_MAGIC, len(seek)) + seek
    path = tmp_path / "a.tar.zst"
    path.write_bytes(data)
    with pytest.raises(EnvcrateError):
        unpack(path, tmp_path / "dest", python=sys.executable)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("how", ["unpack", "ensure"])
def test_free_space_is_checked_from_the_table(tmp_path, how):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small], check=True)
    try:
        members = [_file("pyvenv.cfg", b"version = 3\n"), _file("big.bin", os.urandom(3 << 20))]
        archive = _crate(tmp_path / "a.tar.zst", members, layout="frames")
        if how == "unpack":
            out = envcrate("unpack", archive, small / "dest", "--python", sys.executable)
        else:
            out = envcrate("ensure", archive, "--cache", small / "c", "--python", sys.executable)
        _one_line_error(out, "not enough free space", "MiB")
        left = [p for p in small.rglob("*") if p.is_file() or p.is_symlink()]
        assert [p for p in left if p.parent.name != "locks"] == []
        assert not (small / "dest").exists()
    finally:
        subprocess.run(["umount", small], check=True)


# ------------------------------------------------------------ malformed fields


def _raw_member(name: bytes, typeflag: bytes, fields: dict[str, bytes], data: bytes = b"") -> bytes:
    """A ustar header with some fields overwritten by hand (checksum fixed)."""
    from envcrate.crate import tar

    h = bytearray(tar._ustar(name, typeflag, 0o644, len(data), b""))
    spots = {"mode": (100, 8), "size": (124, 12), "mtime": (136, 12)}
    for field, value in fields.items():
        at, n = spots[field]
        h[at : at + n] = value.ljust(n, b"\0")[:n]
    h[148:156] = b"        "
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data + bytes(tar.padding(len(data)))


@pytest.mark.parametrize("layout", ["stream", "gz"])
@pytest.mark.parametrize(
    "bad",
    ["size", "mode", "pax"],
)
def test_malformed_tar_fields_are_one_line(tmp_path, layout, bad):
    from envcrate.crate import tar

    row, good = _file("a.txt", b"hello")
    if bad == "pax":
        records = b"99999 path=x\n"
        member = _raw_member(b"././@PaxHeader", tar.PAX, {}, records) + good
    else:
        member = _raw_member(b"a.txt", b"0", {bad: b"9z9z9z9"}, b"hello")
    suffix = "tar.gz" if layout == "gz" else "tar.zst"
    archive = _crate(tmp_path / f"a.{suffix}", [(row, member)], layout=layout)
    for args in (["unpack", archive, tmp_path / "dest"], ["verify", archive]):
        out = envcrate(*args)
        _one_line_error(out)
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "dest").exists()


BAD_MANIFESTS = {
    "files is a list": {"files": [1, 2]},
    "no platform": {"platform": None},
    "platform is a string": {"platform": "linux"},
    "prefix_files not records": {"prefix_files": ["x"]},
    "python is a list": {"python": ["cpython"]},
    "pins not records": {"pins": [3]},
    "cfg values not strings": {"venv": {"base_links": [], "cfg": {"home": 3}}},
    "kind unknown": {"kind": "docker"},
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_malformed_manifests_are_one_line(tmp_path, case):
    archive = _crate(tmp_path / "a.tar.zst", [_file("pyvenv.cfg", b"version = 3\n")],
                     extra=BAD_MANIFESTS[case])  # fmt: skip
    for args in (["info", archive], ["unpack", archive, tmp_path / "d"], ["verify", archive]):
        out = envcrate(*args)
        _one_line_error(out, "manifest")
        assert "Traceback" not in out.stderr


def test_a_store_record_with_a_malformed_manifest_is_one_line(small_crate, tmp_path):

    store = tmp_path / "store"
    publish(small_crate, store)
    record = store / "crates" / (small_crate.id.split(":")[1] + ".json")
    data = json.loads(record.read_text())
    del data["platform"]
    record.chmod(0o644)
    record.write_text(json.dumps(data))
    out = envcrate("ensure", small_crate.id, "--store", store, "--cache", tmp_path / "c")
    _one_line_error(out, "platform")
    out = envcrate("info", small_crate.id, "--store", store)
    _one_line_error(out, "platform")


# ------------------------------------------------------------ verify says what unpack would


@pytest.mark.parametrize("layout", ["stream", "frames"])
def test_verify_refuses_what_unpack_refuses(tmp_path, layout):
    from archives import CASES

    for case, members in sorted(CASES.items()) + sorted(CHAINS.items()):
        archive = _crate(tmp_path / f"{case}.tar.zst", [_file("ok.txt")] + members, layout=layout)
        out = envcrate("verify", archive)
        line = _one_line_error(out)
        assert "b'" not in line, line  # no bytes reprs in messages
        assert not (tmp_path / "dest").exists()


def test_verify_refuses_other_bytes_under_the_same_table(tmp_path):
    members = [_lying_file("lib/x.py", b"good", b"evil")]
    archive = _crate(tmp_path / "a.tar.zst", members)
    _one_line_error(envcrate("verify", archive), "lib/x.py", "content differs")


def test_a_genuine_crate_still_verifies_and_unpacks(small_crate, tmp_path):
    out = envcrate("verify", small_crate.archive, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == small_crate.id
    dest = unpack(small_crate.archive, tmp_path / "dest")
    table = (dest / ".envcrate" / "files.jsonl").read_bytes()
    from envcrate.crate.manifest import crate_id_of

    assert crate_id_of(table, small_crate.manifest.data) == small_crate.id
    six = next(dest.glob("lib/python*/site-packages/six.py"))
    rows = [json.loads(line) for line in table.splitlines()]
    want = next(r[3] for r in rows if r[4].endswith("site-packages/six.py"))
    assert hashlib.sha256(six.read_bytes()).hexdigest() == want
    shutil.rmtree(dest)


# ------------------------------------------------------------ found by an attacker's review


def _dir(name: str) -> tuple[FileRow, bytes]:
    from archives import _member

    return FileRow("d", name, "755", 0, ""), _member(name.encode() + b"/", b"5", 0o755)


@pytest.mark.parametrize("layout", ["stream", "frames"])
def test_a_link_target_spelled_in_escapes_is_refused(tmp_path, layout):
    """``d/é -> ..`` and ``d/up -> "\\udcc3\\udca9/.."``: the target is the bytes
    of ``é/..`` spelled as surrogate escapes, another string to the checks
    but the same name on disk (the frames path made ``d/up`` lead outside)."""
    from archives import _member

    up = (
        FileRow("l", "d/up", "777", 0, "\udcc3\udca9/.."),
        _member(b"d/up", b"2", 0o777, link="\u00e9/..".encode()),
    )
    members = [_file("pyvenv.cfg", b"version = 3\n"), _dir("d"), _link("d/\u00e9", ".."), up]
    archive = _crate(tmp_path / "a.tar.zst", members, layout=layout)
    box = _sandbox(tmp_path)
    with pytest.raises(ArchiveError):
        unpack(archive, box / "dest", python=sys.executable)
    assert list(box.iterdir()) == []


@pytest.mark.parametrize(
    "case", ["surrogate path", "pax size digits", "many pax headers", "placeholder surrogate",
             "libc digits", "python digits"],
)  # fmt: skip
def test_strings_and_numbers_that_crashed_are_one_line(tmp_path, case):
    from archives import _member

    from envcrate.crate import tar
    from envcrate.crate.manifest import encode_table
    from envcrate.crate.platform import host_platform

    members = [_file("pyvenv.cfg", b"version = 3\n"), _file("f.txt", b"/nowhere\n")]
    table, extra = None, None
    if case == "surrogate path":
        table = encode_table([r._replace(path=r.path + "\ud800") for r, _ in members])
    elif case == "pax size digits":
        row, raw = _file("a", b"x")
        pax = _member(b"././@PaxHeader", b"x", 0o644, tar._pax_record(b"size", b"1" * 5000))
        members = [(row, pax + raw)]
    elif case == "many pax headers":  # each under the cap, together far over it
        row, raw = _file("a", b"x")
        records = b"".join(tar._pax_record(b"k%d" % j, b"v" * 1000) for j in range(600))
        members = [(row, b"".join(_member(b"././@PaxHeader", b"x", 0o644, records)
                                  for _ in range(3)) + raw)]  # fmt: skip
    elif case == "placeholder surrogate":
        extra = {"prefix_files": [{"path": "f.txt", "placeholder": "\ud800", "mode": "text"}]}
    elif case == "libc digits":
        extra = {"platform": dict(host_platform(), libc={"family": "glibc", "version": "9" * 5000})}
    else:
        py = {
            "implementation": sys.implementation.name,
            "version": "3." + "1" * 5000,
            "abiflags": "",
        }
        extra = {"python": py}
    archive = _crate(tmp_path / "a.tar.zst", members, table=table, extra=extra)
    for args in (["unpack", archive, tmp_path / "dest"], ["verify", archive]):
        out = envcrate(*args)
        _one_line_error(out)
    assert not (tmp_path / "dest").exists()


def test_a_non_canonical_manifest_is_refused(tmp_path):
    """Two spellings of one manifest would give one crate id two
    ``.envcrate/manifest.json`` files."""
    members = [_file("pyvenv.cfg", b"version = 3\n")]
    archive = _crate(tmp_path / "a.tar.zst", members)
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(archive.read_bytes())
    start = raw.index(b"{")
    end = raw.index(b"\0", start)
    spaced = json.dumps(json.loads(raw[start:end]), indent=1).encode()
    from envcrate.crate import tar
    from envcrate.crate.manifest import MANIFEST_MEMBER

    head = tar.header(MANIFEST_MEMBER.encode(), tar.REGULAR, 0o644, len(spaced))
    head += spaced + bytes(tar.padding(len(spaced)))
    rest = raw[512 + (end - start) + tar.padding(end - start) :]
    evil = tmp_path / "spaced.tar.zst"
    evil.write_bytes(zstandard.ZstdCompressor().compress(head + rest))
    _one_line_error(envcrate("unpack", evil, tmp_path / "dest"), "canonical")


def test_relocation_order_does_not_depend_on_the_list(tmp_path):
    """Two archives of one crate id list the same relocation records in two
    orders; the destination must be the same (the replacements interact:
    the new prefix contains the other placeholder)."""
    members = [_file("pyvenv.cfg", b"version = 3\n"), _file("f.txt", b"/x and /t and /x/t\n")]
    records = [
        {"path": "f.txt", "placeholder": "/t", "mode": "text"},
        {"path": "f.txt", "placeholder": "/x", "mode": "text"},
    ]
    results = []
    for k, order in enumerate((records, records[::-1])):
        archive = _crate(tmp_path / f"{k}.tar.zst", members, extra={"prefix_files": order})
        dest = unpack(archive, tmp_path / "tmpdest" / f"d{k}", python=sys.executable)
        results.append((dest / "f.txt").read_text().replace(str(dest), "DEST"))
    assert results[0] == results[1]


def test_a_member_named_like_relocations_temporary_is_fine(tmp_path):
    members = [
        _file("pyvenv.cfg", b"version = 3\n"),
        _file("f.txt", b"/nowhere\n"),
        _file("f.txt.envcrate-tmp", b"mine\n"),
    ]
    extra = {"prefix_files": [{"path": "f.txt", "placeholder": "/nowhere", "mode": "text"}]}
    archive = _crate(tmp_path / "a.tar.zst", members, extra=extra)
    dest = unpack(archive, tmp_path / "dest", python=sys.executable)
    assert (dest / "f.txt").read_text() == f"{dest}\n"
    assert (dest / "f.txt.envcrate-tmp").read_text() == "mine\n"


def _fake_venv_beside_a_link(where: Path) -> Path:
    """A link to the real interpreter in a directory that makes it another
    venv: its pyvenv.cfg and a .pth that runs code when site is imported."""
    real = os.path.realpath(sys.executable)
    v = "%d.%d" % sys.version_info[:2]
    (where / "bin").mkdir(parents=True)
    (where / "bin" / "python3").symlink_to(real)
    site = where / "lib" / f"python{v}" / "site-packages"
    site.mkdir(parents=True)
    (where / "pyvenv.cfg").write_text(f"home = {os.path.dirname(real)}\nversion = {v}.0\n")
    ran = where / "ran"
    (site / "evil.pth").write_text(f"import os; open({str(ran)!r}, 'w').close()\n")
    return where / "bin" / "python3"


def test_an_interpreter_hint_is_run_by_its_real_path_without_site(tmp_path, small_crate):
    """A hint that is a link to a real interpreter, from a directory with a
    pyvenv.cfg and a .pth: running the link would run the .pth."""
    hint = _fake_venv_beside_a_link(tmp_path / "fake")
    members = [_file("pyvenv.cfg", b"version = 3\n")]
    links = [{"path": "bin/python", "kind": "link", "target": str(hint)}]
    extra = {"venv": {"base_links": links, "cfg": {"home": str(hint.parent)}}}
    archive = _crate(tmp_path / "a.tar.zst", members, extra=extra)
    env = dict(os.environ, PATH="/nonexistent")
    out = subprocess.run(
        [sys.executable, "-m", "envcrate.cli", "unpack", archive, tmp_path / "dest"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "fake" / "ran").exists()


def test_a_store_record_is_checked_against_the_archive_before_its_hint_is_probed(
    small_crate, tmp_path
):

    store = tmp_path / "store"
    publish(small_crate, store)
    hint = _fake_venv_beside_a_link(tmp_path / "fake")
    record = store / "crates" / (small_crate.id.split(":")[1] + ".json")
    data = json.loads(record.read_text())
    data["venv"]["cfg"]["base-executable"] = str(hint)
    for link in data["venv"]["base_links"]:
        link["target"] = str(hint)
    record.chmod(0o644)
    record.write_text(json.dumps(data))
    env = dict(os.environ, PATH="/nonexistent")
    out = envcrate("ensure", small_crate.id, "--store", store, "--cache", tmp_path / "c", env=env)
    _one_line_error(out, "differs from its record")
    assert not (tmp_path / "fake" / "ran").exists()


def test_a_probe_memo_others_may_write_is_not_believed(tmp_path):
    """Under umask 000 the memo's directory came out world-writable: anyone
    could choose the interpreter a venv is pointed at."""
    from envcrate.node import compat

    memo = tmp_path / "pythons"
    memo.mkdir()
    real = os.path.realpath(sys.executable)
    assert compat.probe(real, str(memo)) is not None  # remembered
    memo.chmod(0o777)
    (spot,) = [p for p in memo.iterdir() if not p.name.startswith(".")]
    kept = json.loads(spot.read_text())
    kept["it"][0] = "/tmp/someone-elses-python"
    spot.write_text(json.dumps(kept))
    assert compat.probe(real, str(memo)).executable != "/tmp/someone-elses-python"
    assert stat_mode(memo) == 0o700  # and made private again


def stat_mode(p: Path) -> int:
    import stat

    return stat.S_IMODE(p.stat().st_mode)


def test_cache_files_that_are_fifos_or_devices_do_not_hang_or_exhaust(small_crate, tmp_path):
    """A ready marker that is a FIFO (an open that never returns) and a blob
    index that is /dev/zero (a read that never ends)."""
    cache = tmp_path / "cache"
    key = small_crate.id.split(":")[1][:16]
    bogus = cache / "e" / f"{key}-zzzzzzzz" / ".envcrate"
    bogus.mkdir(parents=True)
    os.mkfifo(bogus / "ready")
    (cache / "blobs").mkdir()
    digest = "ab" * 32
    (cache / "blobs" / digest).symlink_to("/dev/zero")
    out = envcrate("ensure", small_crate.archive, "--cache", cache, "--json", timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == small_crate.id, out.stderr
    url = "file://" + str(small_crate.archive)
    out = subprocess.run(
        [sys.executable, "-m", "envcrate.cli", "ensure", url, "--sha256", digest, "--cache", cache],
        capture_output=True, text=True, timeout=120,
        preexec_fn=_limited(768 << 20),
    )  # fmt: skip
    assert "MemoryError" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_an_entry_that_is_not_ready_at_the_key_is_an_error_not_a_result(small_crate, tmp_path):
    cache = tmp_path / "cache"
    done = json.loads(envcrate("ensure", small_crate.archive, "--cache", cache, "--json").stdout)
    prefix = Path(done["prefix"])
    marker = prefix / ".envcrate" / "ready"
    prefix.joinpath(".envcrate").chmod(0o755)
    marker.chmod(0o644)
    marker.write_bytes(b"sha256:" + b"\xff" * 64 + b"\n\n\n{}")  # not a ready marker
    out = envcrate("ensure", small_crate.id, "--cache", cache, "--store", tmp_path / "none")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    out = envcrate("ensure", small_crate.archive, "--cache", cache)
    _one_line_error(out, "not a ready entry")
