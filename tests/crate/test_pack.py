"""Packing venvs: determinism, archive layout, manifest, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import zstandard
from conftest import check, envcrate, install, make_venv

from envcrate import pack
from envcrate.crate.container import read_manifest_bytes
from envcrate.crate.manifest import (
    FILES_MEMBER,
    MANIFEST_MEMBER,
    FileRow,
    Manifest,
    crate_id_of,
    decode_table,
    encode_table,
)
from envcrate.errors import SourceEnvError


def test_pack_twice_is_byte_identical(small_venv, tmp_path):
    a = pack(small_venv, tmp_path / "a.tar.zst")
    b = pack(small_venv, tmp_path / "b.tar.zst", threads=1)
    assert a.archive.read_bytes() == b.archive.read_bytes()
    assert a.blob == b.blob and a.id == b.id


def test_format_level_threads_change_blob_not_id(small_venv, tmp_path):
    base = pack(small_venv, tmp_path / "a.tar.zst")
    other_level = pack(small_venv, tmp_path / "b.tar.zst", level=9, threads=2)
    gz = pack(small_venv, tmp_path / "c.tar.gz", format="tar.gz")
    assert base.id == other_level.id == gz.id
    assert len({base.blob, other_level.blob, gz.blob}) == 3
    assert gz.archive.read_bytes()[:2] == b"\x1f\x8b"


def test_default_name_and_sidecar(small_venv, tmp_path):
    crate = pack(small_venv, tmp_path)
    assert crate.archive.name == f"small-{crate.id[7:19]}.tar.zst"
    record = json.loads(Path(str(crate.archive) + ".json").read_text())
    assert record["id"] == crate.id
    assert record["archives"][0]["blob"] == crate.blob
    assert record["archives"][0]["size"] == crate.archive.stat().st_size
    # Only finished files are visible: no temporary leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [crate.archive.name, crate.archive.name + ".json"]
    )


@pytest.mark.parametrize("fmt,flag", [("tar.zst", "-Izstd"), ("tar.gz", "-z")])
def test_stock_tar_extracts_the_crate(small_venv, tmp_path, fmt, flag):
    crate = pack(small_venv, tmp_path / f"c.{fmt}", format=fmt)
    out = tmp_path / "x"
    out.mkdir()
    check(["tar", flag, "-xf", crate.archive, "-C", out])
    assert (out / MANIFEST_MEMBER).read_bytes() == crate.manifest.to_bytes()
    table = (out / FILES_MEMBER).read_bytes()
    assert crate_id_of(table, crate.manifest.data) == crate.id
    six_src = next(small_venv.glob("lib/python*/site-packages/six.py")).read_bytes()
    assert next(out.glob("lib/python*/site-packages/six.py")).read_bytes() == six_src
    # Base-interpreter links (bin/python* -> the base python; which ones
    # depends on how the base was installed) are described in the manifest,
    # not archived; links inside the env are archived as links.
    base = {link["path"] for link in crate.manifest.venv["base_links"]}
    assert base
    for path in base:
        assert not os.path.lexists(out / path)
    inner = [
        p for p in (small_venv / "bin").iterdir() if p.is_symlink() and f"bin/{p.name}" not in base
    ]
    assert inner
    for p in inner:
        assert os.readlink(out / "bin" / p.name) == os.readlink(p)


def test_archive_has_manifest_frame_first_and_a_seek_table(small_crate):
    raw = small_crate.archive.read_bytes()
    # First frame alone decompresses to the manifest member.
    dobj = zstandard.ZstdDecompressor().decompressobj()
    first = dobj.decompress(raw)
    assert first[: len(MANIFEST_MEMBER)] == MANIFEST_MEMBER.encode()
    assert Manifest.from_bytes(read_manifest_bytes(str(small_crate.archive))).id == small_crate.id
    # Seekable-format footer and table, covering the whole tar stream.
    count, desc, magic = struct.unpack("<IBI", raw[-9:])
    assert magic == 0x8F92EAB1 and desc == 0
    entries = [
        struct.unpack_from("<II", raw, len(raw) - 9 - 8 * count + 8 * i) for i in range(count)
    ]
    body = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read()
    assert sum(d for _, d in entries) == len(body)
    assert count >= 3  # manifest, file table, body


def test_small_frames_span_files_and_round_trip(small_venv, tmp_path, monkeypatch):
    from envcrate.crate import container, writer

    monkeypatch.setattr(writer, "FRAME_SIZE", 64 * 1024)
    monkeypatch.setattr(writer, "TABLE_CHUNK", 4096)
    monkeypatch.setattr(container, "TABLE_CHUNK", 4096)
    small = pack(small_venv, tmp_path / "small-frames.tar.zst")
    # The table's pieces, compressed as rows became final, are the bytes a
    # compression of the whole table gives (the room estimate's way).
    from envcrate.crate.reading import open_stream

    opened = open_stream(str(small.archive))
    head = container.head_frames(opened.manifest_bytes, opened.table_bytes, "tar.zst", None)
    opened.close()
    assert len(head.frames) >= 5  # manifest, table header, whole pieces, the last piece
    assert small.archive.read_bytes()[: len(head.data)] == head.data
    monkeypatch.undo()
    normal = pack(small_venv, tmp_path / "normal.tar.zst")
    assert small.id == normal.id  # file digests of spanning files are computed the same way
    # The blob digest is hashed as the archive is written: most of this
    # body is written before the head, the rest after.
    for crate in (small, normal):
        assert crate.blob == "sha256:" + hashlib.sha256(crate.archive.read_bytes()).hexdigest()
    # ... and so are their scans: the same prefix files and glibc needs.
    assert small.manifest.to_bytes() == normal.manifest.to_bytes()
    raw = small.archive.read_bytes()
    count = struct.unpack("<I", raw[-9:-5])[0]
    assert count > 10
    from envcrate import unpack

    dest = unpack(small.archive, tmp_path / "out")
    check([dest / "bin" / "python", "-c", "import six, markupsafe"])


def _seek_entries(raw: bytes) -> list[tuple[int, int]]:
    count = struct.unpack("<I", raw[-9:-5])[0]
    return [struct.unpack_from("<II", raw, len(raw) - 9 - 8 * count + 8 * i) for i in range(count)]


def test_the_head_goes_into_room_left_for_it_or_the_body_is_copied(
    small_venv, tmp_path, monkeypatch
):
    import envcrate.packing as packer
    from envcrate import unpack, verify_archive

    roomy = pack(small_venv, tmp_path / "roomy.tar.zst")
    # Manifest frame, the table's header and content frames, then the
    # padding: a skippable frame that decompresses to nothing.
    raw = roomy.archive.read_bytes()
    (_, _), (_, header_d), (_, table_d), (pad_c, pad_d) = _seek_entries(raw)[:4]
    assert header_d == 512 and table_d % 512 == 0
    assert pad_d == 0 and 8 <= pad_c < 64 << 10
    start = sum(c for c, _ in _seek_entries(raw)[:3])
    assert struct.unpack_from("<II", raw, start) == (0x184D2A50, pad_c - 8)

    monkeypatch.setattr(packer, "_head_room", lambda *a: 100)  # far too little
    out = tmp_path / "out"
    out.mkdir()
    tight = pack(small_venv, out / "tight.tar.zst")
    assert tight.id == roomy.id
    for crate in (roomy, tight):
        assert crate.blob == "sha256:" + hashlib.sha256(crate.archive.read_bytes()).hexdigest()
    assert all(d for _, d in _seek_entries(tight.archive.read_bytes()))  # no padding
    assert sorted(p.name for p in out.iterdir()) == ["tight.tar.zst", "tight.tar.zst.json"]
    verify_archive(tight.archive)
    dest = unpack(tight.archive, tmp_path / "env")
    check([dest / "bin" / "python", "-c", "import six, markupsafe"])


def test_copy_range_works_where_the_kernel_cannot_copy(tmp_path, monkeypatch):
    from envcrate.fsutil import copy_range

    src = tmp_path / "src"
    src.write_bytes(os.urandom(5 << 20))
    for kernel in (True, False):
        if not kernel:

            def cannot(*a):
                raise OSError(18, "Invalid cross-device link")

            monkeypatch.setattr(os, "copy_file_range", cannot)
        dst = tmp_path / f"dst-{kernel}"
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(b"head")
            g.flush()
            copy_range(f.fileno(), 1000, (4 << 20) + 7, g.fileno())
        assert dst.read_bytes() == b"head" + src.read_bytes()[1000 : 1000 + (4 << 20) + 7]


def test_pycs_become_unchecked_hash(small_crate, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    check(["tar", "-Izstd", "-xf", small_crate.archive, "-C", out])
    pycs = list(out.rglob("*.pyc"))
    assert pycs
    for p in pycs:
        assert int.from_bytes(p.read_bytes()[4:8], "little") == 1, p


def test_pycs_rewritten_where_read_stale_and_sourceless_kept(tmp_path, monkeypatch):
    """Workers rewrite pyc headers, hashing the source from the frame when it
    lies in it and from the file otherwise; both give the same bytes, as
    does identify(). A stale pyc (its source changed since) and a
    sourceless one are archived as they are."""
    import importlib.util

    from envcrate.crate import writer
    from envcrate.crate.pyc import with_filename
    from envcrate.envs import load_env
    from envcrate.envs.venv import PLACEHOLDER
    from envcrate.packing import identify

    venv = make_venv(tmp_path / "v")
    site = next((venv / "lib").glob("python*/site-packages"))
    for name in ("fresh", "stale", "gone"):
        (site / f"{name}.py").write_text(f"NAME = {name!r}\n" * 50)
    check([venv / "bin" / "python", "-m", "compileall", "-q", site])
    (site / "stale.py").write_text("NAME = 'changed'\n")
    (site / "gone.py").unlink()
    cache = site / "__pycache__"
    tag = sys.implementation.cache_tag
    # Too short to be a pyc, with the hash flag set where a header has it.
    (site / "tiny.py").write_text("")
    (cache / f"tiny.{tag}.pyc").write_bytes(b"\0\0\0\0\x03\0\0\0ab")
    names = ("fresh", "stale", "gone", "tiny")
    original = {n: (cache / f"{n}.{tag}.pyc").read_bytes() for n in names}

    normal = pack(venv, tmp_path / "normal.tar.zst")
    monkeypatch.setattr(writer, "FRAME_SIZE", 1024)  # sources in other frames than their pycs
    small = pack(venv, tmp_path / "small.tar.zst")
    monkeypatch.undo()
    assert small.id == normal.id == identify(load_env(venv))
    for crate in (normal, small):
        out = tmp_path / crate.archive.name.split(".")[0]
        out.mkdir()
        check(["tar", "-Izstd", "-xf", crate.archive, "-C", out])
        got = {n: next(out.rglob(f"{n}.{tag}.pyc")).read_bytes() for n in original}
        fresh_source = (site / "fresh.py").read_bytes()
        assert got["fresh"][4:8] == b"\x01\0\0\0"
        assert got["fresh"][8:16] == importlib.util.source_hash(fresh_source)
        # the code's file name is the placeholder's (envs.venv), the rest as compiled
        named = {
            n: with_filename(
                original[n], f"{site.relative_to(venv)}/{n}.py", PLACEHOLDER, [str(venv).encode()]
            )
            for n in original
        }
        assert named["fresh"] != original["fresh"]
        assert got["fresh"][16:] == named["fresh"][16:]
        assert got["stale"] == named["stale"]
        assert got["gone"] == named["gone"]
        assert got["tiny"] == original["tiny"]


def test_manifest_content(small_crate, small_venv):
    m = small_crate.manifest.data
    assert m["kind"] == "venv"
    assert m["prefix"] == "/envcrate-venv-prefix-placeholder" != str(small_venv)
    assert m["platform"]["os"] == "linux" and m["platform"]["machine"]
    assert m["platform"]["libc"]["family"] == "glibc"
    assert tuple(map(int, m["platform"]["libc"]["version"].split("."))) >= (
        2,
        2,
    )  # markupsafe's .so
    assert m["python"]["version"].startswith("%d.%d." % sys.version_info[:2])
    pins = {p["name"].lower(): p for p in m["pins"]}
    assert pins["six"]["version"] and pins["six"]["source"] == {"type": "index"}
    assert {"markupsafe", "pyflakes"} <= set(pins)
    links = {link["path"] for link in m["venv"]["base_links"]}
    assert links and all(p.startswith("bin/python") for p in links)
    assert "home" in m["venv"]["cfg"]
    paths = {r["path"] for r in m["prefix_files"]}
    assert "bin/activate" in paths and "bin/pyflakes" in paths
    assert not any(p.endswith(".pyc") for p in paths)
    assert "created" not in json.dumps(m)


def test_local_wheel_pin_records_its_path(tmp_path):
    from conftest import WHEELHOUSE

    venv = make_venv(tmp_path / "v")
    wheel = next(WHEELHOUSE.glob("six-*.whl"))
    install(venv, [wheel])
    crate = pack(venv, tmp_path)
    pin = next(p for p in crate.manifest.pins if p["name"] == "six")
    assert pin["source"]["type"] == "local" and pin["source"]["url"].endswith(wheel.name)


def test_exclude_glob(small_venv, tmp_path):
    crate = pack(small_venv, tmp_path / "c.tar.zst", exclude=("*.pyc", "bin/activate.*"))
    out = tmp_path / "x"
    out.mkdir()
    check(["tar", "-Izstd", "-xf", crate.archive, "-C", out])
    assert not list(out.rglob("*.pyc"))
    assert (out / "bin" / "activate").exists() and not (out / "bin" / "activate.fish").exists()
    assert crate.id != pack(small_venv, tmp_path / "d.tar.zst").id


def _site(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


# Each kind of editable or out-of-env install, and how the refusal must name
# it: the distribution (or .pth file) and what gave it away.
EDITABLE = {
    "pep660": "mypkg (PEP 660 editable, __editable__.mypkg-1.0.pth)",
    "egg-link": "mypkg (egg-link)",
    "direct-url": "six (editable from file:///src/six)",
    "abs-pth": "extra.pth (adds /opt/elsewhere/lib, outside the env)",
}


@pytest.mark.parametrize("kind", sorted(EDITABLE))
def test_editable_installs_are_refused_then_allowed(tmp_path, kind):
    venv = make_venv(tmp_path / "v", ["six"])
    site = _site(venv)
    if kind == "pep660":
        (site / "__editable__.mypkg-1.0.pth").write_text("import __editable___mypkg_1_0_finder\n")
    elif kind == "egg-link":
        (site / "mypkg.egg-link").write_text("/src/mypkg\n.\n")
    elif kind == "direct-url":
        dist = next(site.glob("six-*.dist-info"))
        (dist / "direct_url.json").write_text(
            json.dumps({"url": "file:///src/six", "dir_info": {"editable": True}})
        )
    else:
        (site / "extra.pth").write_text("/opt/elsewhere/lib\n")
    out = envcrate("pack", venv, "-o", tmp_path)
    assert out.returncode == 1
    line = out.stderr.strip()
    assert line.startswith("envcrate: error:") and "\n" not in line and "--allow-editable" in line
    # This case's install is named, and no other: the six installed as usual
    # (and the files of the other cases, absent here) are not flagged.
    assert EDITABLE[kind] in line
    for other, named in EDITABLE.items():
        name = named.split(" ", 1)[0]
        if name != EDITABLE[kind].split(" ", 1)[0]:
            assert name not in line, other
    assert not list(tmp_path.glob("*.tar.zst"))
    crate = pack(venv, tmp_path, allow=["editable"])
    assert crate.manifest.data["flags"]["editable"]


def test_system_site_packages_refused_then_allowed(tmp_path):
    venv = tmp_path / "v"
    check([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv])
    with pytest.raises(SourceEnvError, match="--allow-system-site-packages"):
        pack(venv, tmp_path)
    crate = pack(venv, tmp_path, allow=["system-site-packages"])
    assert crate.manifest.data["flags"]["system_site_packages"] is True


def test_link_outside_the_env_is_refused(tmp_path):
    venv = make_venv(tmp_path / "v")
    (venv / "data").symlink_to("/etc/hostname")
    with pytest.raises(SourceEnvError, match="--exclude 'data'"):
        pack(venv, tmp_path)
    assert pack(venv, tmp_path, exclude=("data",)).id


def test_pack_cli_errors_are_one_line(tmp_path):
    out = envcrate("pack", tmp_path / "missing")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("envcrate: error:")
    out = envcrate(
        "pack",
        env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")},
    )
    assert out.returncode == 1 and "none is active" in out.stderr
    out = envcrate("pack", "--format", "zip")
    assert out.returncode == 2


def test_pack_cli_json_and_active_env(small_venv, tmp_path):
    out = envcrate(
        "pack", "-o", tmp_path, "--json", env=dict(os.environ, VIRTUAL_ENV=str(small_venv))
    )
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert set(obj) >= {"id", "blob", "size", "archive"}
    assert Path(obj["archive"]).stat().st_size == obj["size"]
    plain = envcrate("pack", small_venv, "-o", tmp_path / "p.tar.zst")
    assert plain.stdout.strip().splitlines()[-1] == obj["id"]


def test_info_and_verify(small_crate, tmp_path):
    out = envcrate("info", small_crate.archive)
    assert out.returncode == 0
    for word in ("venv", "linux", "cpython", "six==", "files"):
        assert word in out.stdout
    out = envcrate("verify", small_crate.archive, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == small_crate.id


def test_verify_names_the_first_mismatch(small_venv, tmp_path):
    # An archive whose body frame is recompressed from altered content keeps
    # valid frame checksums, so only the file table catches it.
    crate = pack(small_venv, tmp_path / "c.tar.gz", format="tar.gz")
    import gzip

    data = gzip.decompress(crate.archive.read_bytes())
    six_src = next(small_venv.glob("lib/python*/site-packages/six.py")).read_bytes()
    pos = data.index(six_src)
    tampered = data[:pos] + six_src.replace(b"import", b"IMPORT", 1) + data[pos + len(six_src) :]
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(tampered))
    out = envcrate("verify", bad)
    assert out.returncode == 1
    assert "six.py" in out.stderr and "content differs" in out.stderr
    # A flipped byte is caught by the blob digest given with --sha256, and
    # the error says so: the archive's digest is not the one expected. In the
    # first gzip member's mtime, which no decompressor checks, the digest is
    # all that can catch it (verify without it passes); in the deflate data
    # near the end, decompression fails first, and the error must still say
    # what is wrong with the bytes, not where it showed first.
    for pos in (4, -20):
        raw = bytearray(crate.archive.read_bytes())
        raw[pos] ^= 0xFF
        flipped = tmp_path / "flipped.tar.gz"
        flipped.write_bytes(bytes(raw))
        if pos == 4:
            assert envcrate("verify", flipped).returncode == 0
        out = envcrate("verify", flipped, "--sha256", crate.blob)
        assert out.returncode == 1 and out.stderr.startswith("envcrate: error:"), out.stderr
        actual = "sha256:" + hashlib.sha256(raw).hexdigest()
        assert crate.blob in out.stderr and actual in out.stderr, (pos, out.stderr)


def test_pack_through_a_symlinked_prefix(small_venv, tmp_path):
    real = make_venv(tmp_path / "real", ["six"])
    link = tmp_path / "link"
    link.symlink_to(real)
    crate = pack(link, tmp_path)
    # both spellings of the prefix became the placeholder: the same crate as the real path's
    assert crate.id == pack(real, tmp_path / "real.tar.zst").id
    assert crate.manifest.data["prefix_aliases"] == []


def test_format_follows_the_output_name(small_venv, tmp_path):
    out = envcrate("pack", small_venv, "-o", tmp_path / "x.tar.gz", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["format"] == "tar.gz"
    assert (tmp_path / "x.tar.gz").read_bytes()[:2] == b"\x1f\x8b"
    out = envcrate("pack", small_venv, "-o", tmp_path / "y.zip")
    assert out.returncode == 1 and ".tar.zst" in out.stderr


def test_table_encoding_is_canonical_json_per_row():
    rows = [
        FileRow("d", "lib", "755"),
        FileRow("f", 'we"ird\\name\t\u00e9\udcff.py', "644", 12, "ab" * 32),
        FileRow("l", "bin/python3", "777", 0, "python"),
    ]
    assert encode_table(rows) == b"".join(r.encode() + b"\n" for r in rows)
    assert decode_table(encode_table(rows)) == rows


def test_a_file_that_changed_since_the_walk_is_an_error_naming_it(tmp_path):
    from envcrate.crate.inputs import read_into as _read_into
    from envcrate.errors import EnvcrateError

    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    buf = bytearray(100)
    _read_into(memoryview(buf), str(f), 0, 100)
    assert buf == b"x" * 100
    for size, word in ((99, "grew"), (101, "shrank")):
        with pytest.raises(EnvcrateError, match=f"{f} {word} while it was being packed"):
            _read_into(memoryview(bytearray(size)), str(f), 0, size)
    # A piece of a large file: its size is checked with fstat.
    with pytest.raises(EnvcrateError, match="changed while it was being packed"):
        _read_into(memoryview(bytearray(10)), str(f), 50, 200)
    _read_into(memoryview(buf)[:10], str(f), 50, 100)


def test_the_walk_yields_entries_in_archive_order(tmp_path):
    from envcrate.crate.manifest import sort_key
    from envcrate.envs.base import iter_walk

    root = tmp_path / "env"
    for d in ("a", "a/b", "a0", "é", "Z"):
        (root / d).mkdir(parents=True)
    for f in ("a.txt", "a-b", "a/b.py", "a/b/c", "a/_x", "a/B", "a0/x", "é/y", "Z/z", "!"):
        (root / f).write_text(f)
    (root / "a/link").symlink_to("b.py")
    paths = [e.path for e in iter_walk(str(root), str(root))]
    assert paths == sorted(paths, key=sort_key)
    assert len(paths) == 16 and paths[:4] == ["!", "Z", "Z/z", "a"]


def test_what_the_walk_cannot_pack_fails_the_pack_and_leaves_nothing(small_venv, tmp_path):
    import shutil

    env = tmp_path / "env"
    shutil.copytree(small_venv, env, symlinks=True)
    os.mkfifo(env / "lib" / "zz-fifo")  # found late in the walk, after packing began
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SourceEnvError, match="zz-fifo is a socket, fifo or device"):
        pack(env, out / "x.tar.zst")
    assert list(out.iterdir()) == []


def test_a_failed_pack_stops_the_walk(small_venv, tmp_path, monkeypatch):
    import threading
    import time
    from dataclasses import replace

    import envcrate.packing as packer
    from envcrate.crate import writer
    from envcrate.envs import load_env
    from envcrate.errors import EnvcrateError

    monkeypatch.setattr(writer, "FRAME_SIZE", 16 * 1024)  # the error surfaces mid-walk
    source = load_env(small_venv)
    entries = list(source.walking)
    first = next(i for i, e in enumerate(entries) if e.type == "f")
    entries[first] = replace(entries[first], source=str(tmp_path / "gone"))
    failed = threading.Event()
    pulled = [0]

    def walk():
        for e in entries:
            pulled[0] += 1
            yield e
        assert failed.wait(60)
        for e in entries:  # what a walk that went on would find
            pulled[0] += 1
            yield e

    source.walking = walk()
    with pytest.raises(EnvcrateError, match="cannot read .*gone"):
        packer.pack_source(source, tmp_path / "x.tar.zst", format="tar.zst")
    failed.set()
    deadline = time.monotonic() + 30
    while not source.walked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.walked
    assert pulled[0] == len(entries) + 1  # it stopped at the first entry after the failure


def test_worker_processes_and_threads_write_the_same_archive(small_venv, tmp_path, monkeypatch):
    from envcrate.crate import workers

    # The command line runs alone in its process: its workers are processes.
    check([sys.executable, "-m", "envcrate.cli", "pack", small_venv, "-o", tmp_path / "p.tar.zst"])
    monkeypatch.setattr(workers, "USE_PROCESSES", False)
    threads = pack(small_venv, tmp_path / "t.tar.zst")
    assert (tmp_path / "p.tar.zst").read_bytes() == threads.archive.read_bytes()


def test_worker_processes_report_errors_and_are_reaped(tmp_path):
    import mmap

    from envcrate.crate import container, workers
    from envcrate.errors import EnvcrateError

    bufs = [mmap.mmap(-1, 1 << 16) for _ in range(3)]
    outs = [mmap.mmap(-1, container.compress_bound(1 << 16)) for _ in range(3)]
    workers = workers._ProcessWorkers(2, bufs, outs, container.Codec("tar.zst", None), None)
    pids = [pid for pid, _, _ in workers.children.children]
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    good = workers.submit(0, 0, [(0, str(f), 0, 5, 5)], [], [(7, 0, 5, None)], 5)
    bad = workers.submit(1, 1, [(0, str(tmp_path / "missing"), 0, 5, 5)], [], [], 5)
    hashes, _ = workers.filled(good)
    size = workers.result(good)
    assert hashes == [(7, hashlib.sha256(b"hello").hexdigest())]
    assert zstandard.ZstdDecompressor().decompress(bytes(outs[0][:size])) == b"hello"
    with pytest.raises(EnvcrateError, match="cannot read .*missing"):
        workers.filled(bad)
    with pytest.raises(EnvcrateError, match="cannot read .*missing"):
        workers.result(bad)
    workers.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_worker_processes_do_not_deadlock_on_large_frames_and_answers(tmp_path):
    # Thousands of tiny files in a frame make both the request and the answer
    # (a digest per file) larger than a pipe holds.
    files = tmp_path / "files"
    files.mkdir()
    for i in range(3000):
        (files / f"{i:04d}-{'x' * 60}").write_bytes(b"%d" % i)
    script = f"""
import mmap, os
from envcrate.crate import container, inputs, workers, writer
files = [os.path.join({str(files)!r}, n) for n in sorted(os.listdir({str(files)!r}))]
reads = [(4 * i, p, 0, os.path.getsize(p), os.path.getsize(p)) for i, p in enumerate(files)]
whole = [(i, pos, pos + n, None) for i, (pos, _, _, n, _) in enumerate(reads)]
bufs = [mmap.mmap(-1, 1 << 16) for _ in range(3)]
outs = [mmap.mmap(-1, container.compress_bound(1 << 16)) for _ in range(3)]
workers = workers._ProcessWorkers(1, bufs, outs, container.Codec("tar.zst", None), None)
jobs = [workers.submit(k, k, reads, [], whole, 4 * len(reads)) for k in range(3)]
print(sum(len(workers.filled(k)[0]) for k in jobs), sum(workers.result(k) > 0 for k in jobs))
workers.close()
"""
    out = check([sys.executable, "-c", script], timeout=120)
    assert out.stdout.split() == ["9000", "3"]


def test_workers_are_threads_when_no_process_can_be_forked(monkeypatch):
    import mmap

    from envcrate.crate import container, workers

    def cannot_fork():
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(workers.threading, "active_count", lambda: 1)
    monkeypatch.setattr(workers.os, "fork", cannot_fork)
    bufs, outs = [mmap.mmap(-1, 4096)], [mmap.mmap(-1, container.compress_bound(4096))]
    pool = workers.start_workers(1, bufs, outs, container.Codec("tar.zst", None), None)
    assert isinstance(pool, workers._ThreadWorkers)
    pool.close()


def test_packing_waits_for_a_slow_walk_rather_than_hold_the_archive(
    small_venv, tmp_path, monkeypatch
):
    import threading

    import envcrate.packing as packer
    from envcrate.crate import writer
    from envcrate.envs import load_env

    monkeypatch.setattr(writer, "FRAME_SIZE", 16 * 1024)  # frames before the walk ends
    normal = pack(small_venv, tmp_path / "normal.tar.zst")
    # A walk that ends only once the packer waits for it: past HOLD_LIMIT (0
    # here) of compressed frames held back, it must, rather than pack on.
    monkeypatch.setattr(packer, "HOLD_LIMIT", 0)
    most = [0]
    complete = writer.BodyWriter._complete

    def complete_and_count(self, frame, size):
        complete(self, frame, size)
        most[0] = max(most[0], len(self._unwritten))

    monkeypatch.setattr(writer.BodyWriter, "_complete", complete_and_count)
    source = load_env(small_venv)
    walk, finish_walk = source.walking, source.finish_walk
    waits = threading.Event()

    def slow_walk():
        found = list(walk)
        yield from found[:-1]
        assert waits.wait(60), "the packer did not wait for the walk"
        yield found[-1]

    def finish_walk_and_tell():
        waits.set()
        finish_walk()

    source.walking, source.finish_walk = slow_walk(), finish_walk_and_tell
    waited = packer.pack_source(source, tmp_path / "waited.tar.zst", format="tar.zst")
    assert waited.archive.read_bytes() == normal.archive.read_bytes()
    assert len(_seek_entries(waited.archive.read_bytes())) > 30 and 0 < most[0] <= 8
