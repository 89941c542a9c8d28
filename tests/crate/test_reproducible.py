"""Venv crates do not depend on where the venv was built (format 3): one
venv made by hand at two paths from the same wheels packs to one crate, byte
for byte, and the crate works wherever it is unpacked. Format 2 crates are
still read."""

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from conftest import SMALL, make_venv

from envcrate import pack, unpack, verify_archive
from envcrate.envs.venv import PLACEHOLDER

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """The small venv built at two paths (the same directory name: it is in
    activate's prompt), one much longer than the other, and packed."""
    root = tmp_path_factory.mktemp("builds")
    a = make_venv(root / "a" / "env", SMALL)
    b = make_venv(root / ("b" * 120) / "env", SMALL)
    out = root / "out"
    out.mkdir()
    return [(env, pack(env, out / f"{i}.tar.zst")) for i, env in enumerate((a, b))]


def files_of(archive: Path):
    """(name, bytes) of each file member of a tar.zst, as stock tools read it."""
    import zstandard

    with open(archive, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_venv_built_at_two_paths_is_one_crate_byte_for_byte(two_builds):
    (_, a), (_, b) = two_builds
    assert a.id == b.id
    assert _digest(a.archive) == _digest(b.archive)


def test_no_build_path_is_archived(two_builds, tmp_path):
    for env, crate in two_builds:
        for name, data in files_of(crate.archive):
            assert str(env).encode() not in data, name
            assert str(env.parent).encode() not in data, name
        assert crate.manifest.prefix == PLACEHOLDER


def test_record_rows_of_pycs_and_placed_scripts_have_no_hash(two_builds, tmp_path):
    _, crate = two_builds[0]
    [rows] = [
        data.decode().splitlines()
        for name, data in files_of(crate.archive)
        if "/pyflakes-" in name and name.endswith("/RECORD")
    ]
    pycs = [r for r in rows if ".pyc," in r]
    script = [r for r in rows if r.startswith("../../../bin/pyflakes,")]
    assert pycs and all(r.endswith(",,") for r in pycs)
    assert script == ["../../../bin/pyflakes,,"]
    assert [r for r in rows if ".py,sha256=" in r], "files archived as installed keep their hashes"


def test_the_crate_works_where_it_is_unpacked(two_builds, tmp_path):
    _, crate = two_builds[0]
    dest = unpack(crate.archive, tmp_path / "elsewhere" / "env")
    out = subprocess.run(
        [dest / "bin" / "python", "-c",
         "import markupsafe, pyflakes.api as a, sys; "
         "print(sys.prefix); print(a.check.__code__.co_filename); print(markupsafe.escape('<'))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    prefix, filename, escaped = out.stdout.split()
    assert prefix == str(dest) and escaped == "&lt;"
    assert filename.startswith(str(dest) + "/lib/")  # the import system's, not the placeholder
    script = subprocess.run(
        [dest / "bin" / "pyflakes", "--version"], capture_output=True, text=True
    )
    assert script.returncode == 0, script.stderr
    assert (dest / "bin" / "pyflakes").read_text().startswith(f"#!{dest}/bin/python")
    activate = (dest / "bin" / "activate").read_text()
    assert PLACEHOLDER not in activate and str(dest) in activate


def test_the_pycs_are_used_as_archived(two_builds, tmp_path):
    """A pyc whose header or code did not survive the file-name rewrite
    would be recompiled (and rewritten: the tree is writable here)."""
    _, crate = two_builds[0]
    dest = unpack(crate.archive, tmp_path / "env")
    pycs = sorted(dest.rglob("pyflakes/**/*.pyc"))
    before = {p: p.read_bytes() for p in pycs}
    assert len(pycs) > 10
    subprocess.run(
        [dest / "bin" / "python", "-c", "import pyflakes.api, pyflakes.checker"],
        check=True, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert {p: p.read_bytes() for p in pycs} == before
    assert all(b[4:8] == b"\x01\0\0\0" for b in before.values())  # unchecked hash


def test_a_format_2_crate_is_still_read(request):
    """The golden conda env as envcrate 0.x wrote it in format 2 (its id and
    blob were the golden pins then): verified, unpacked and relocated."""
    archive = DATA / "golden-format2.tar.zst"
    assert "sha256:" + _digest(archive) == (
        "sha256:a368a75765158e751fb9b95b9579a980f43fbad346b5959b692881583537738a"
    )
    verified = verify_archive(archive)
    assert verified.id == "sha256:95adbee7eed73217118ab01bf21c1d91aa9c3b760dc59d8062ac8dd1152b4b4d"
    # a path short enough for the binary placeholder (57 bytes)
    dest = unpack(archive, Path(tempfile.mkdtemp(prefix="golden2-", dir="/tmp")) / "env")
    request.addfinalizer(lambda: shutil.rmtree(dest.parent, ignore_errors=True))
    assert (dest / "bin" / "demo").read_text().startswith(f"#!{dest}/bin/python3.12\n")
    assert f"written after install: {dest}/etc" in (dest / "etc" / "site.conf").read_text()
    manifest = json.loads((dest / ".envcrate" / "manifest.json").read_text())
    assert manifest["id"] == verified.id and manifest["schema"] == 2


def _filenames(code, out):
    out.append(code.co_filename)
    for k in code.co_consts:
        if hasattr(k, "co_filename"):
            _filenames(k, out)
    return out


def test_pyc_file_names_are_replaced_only_as_whole_strings():
    """A path component ending in 'z' followed by a character whose code is
    the length of the rest of the path looked like a string header to the
    first version, which rewrote the tail of the name and broke the pyc
    (1 build in 25 in a random build directory). Random paths, short and
    long, ASCII and not: every pyc still loads, with the placeholder's name
    in every code object, and two prefixes give the same bytes."""
    import importlib.util
    import marshal
    import random
    import string

    from envcrate.crate.pyc import with_filename

    rng = random.Random(7)
    source = "def f():\n    return 1\nclass C:\n    def g(self):\n        pass\n"

    def pyc(prefix: str, rel: str) -> bytes:
        code = compile(source, f"{prefix}/{rel}", "exec")
        return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code)

    enzo = "/home/enzo"  # 'o' is 111: the rest of the path below is 110 bytes long
    rel = (
        "lib/python3.12/site-packages/"
        + "p" * (110 - len("/lib/python3.12/site-packages/") - 3)
        + ".py"
    )
    cases = [(enzo, rel)]
    for _ in range(2000):
        parts = ["".join(rng.choice(string.ascii_letters + "z") for _ in range(rng.randint(1, 12)))
                 for _ in range(rng.randint(1, 8))]  # fmt: skip
        prefix = "/" + "/".join(parts) + ("/é" if rng.random() < 0.1 else "")
        name = "/".join("".join(rng.choice("abz") for _ in range(rng.randint(1, 9)))
                        for _ in range(rng.randint(1, 6)))  # fmt: skip
        cases.append((prefix, f"lib/python3.12/site-packages/{name}.py"))
    for prefix, rel in cases:
        out = with_filename(pyc(prefix, rel), rel, PLACEHOLDER, [prefix.encode()])
        code = marshal.loads(out[16:])
        assert set(_filenames(code, [])) == {f"{PLACEHOLDER}/{rel}"}, (prefix, rel)
        assert out == with_filename(pyc("/elsewhere", rel), rel, PLACEHOLDER, [b"/elsewhere"])


def test_record_rows_are_the_same_whenever_they_are_made(tmp_path):
    """A RECORD listing a .pth that names the prefix and sorts after the
    RECORD (foo-1.0.dist-info/ < foo.pth): the RECORD's bytes were made from
    what the walk had placed so far, and differently when made again, so
    ship (identify, then pack) said the env changed while shipped."""
    from conftest import envcrate, ok

    from envcrate.envs import load_env
    from envcrate.packing import identify

    env = make_venv(tmp_path / "env")
    site = next((env / "lib").glob("python*/site-packages"))
    (site / "foo.pth").write_text(f"{env}/extra\n")
    dist = site / "foo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: foo\nVersion: 1.0\n")
    (dist / "RECORD").write_text(
        "foo.pth,sha256=abc,10\n__pycache__/foo.cpython-3.pyc,sha256=def,20\n"
        "foo-1.0.dist-info/METADATA,,\n"
    )
    crate_id = identify(load_env(str(env)))
    shipped = ok(envcrate("ship", env, "--store", tmp_path / "store", "--json"))
    assert shipped["id"] == crate_id
    assert pack(env, tmp_path / "again.tar.zst").id == crate_id
