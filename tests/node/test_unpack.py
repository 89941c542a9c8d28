"""Unpacking: relocated, working venvs; compatibility; hostile archives."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL, check, envcrate, make_venv, run, text_files_naming

from envcrate import pack, unpack
from envcrate.errors import EnvcrateError, IncompatibleError, RelocationError


def _assert_works(dest: Path, original: str) -> None:
    out = check([dest / "bin" / "python", "-c", "import sys, six, markupsafe; print(sys.prefix)"])
    assert out.stdout.strip() == str(dest)
    out = check([dest / "bin" / "pyflakes", "--version"])
    assert out.stdout.strip()
    first = (dest / "bin" / "pyflakes").read_text().splitlines()[0]
    assert str(dest) in first or first == "#!/bin/sh"

    def shell(name: str) -> str:  # the test command installs them: missing fails
        found = shutil.which(name)
        assert found, f"{name} is not installed: the README's test command installs it"
        return found

    for sh in ("sh", "bash", "zsh"):
        out = check(
            [shell(sh), "-c", f". '{dest}/bin/activate' && echo $VIRTUAL_ENV && command -v python"]
        )
        assert out.stdout.split() == [str(dest), f"{dest}/bin/python"], sh
    out = check([shell("fish"), "-c", f"source '{dest}/bin/activate.fish'; and echo $VIRTUAL_ENV"])
    assert out.stdout.strip() == str(dest)
    csh = shutil.which("csh") or shell("tcsh")
    out = check([csh, "-c", f"source '{dest}/bin/activate.csh'; echo $VIRTUAL_ENV"])
    assert out.stdout.strip() == str(dest)
    assert text_files_naming(dest, original) == []


@pytest.mark.parametrize("creator", ["venv", "venv-copies", "virtualenv", "uv"])
def test_unpack_elsewhere_after_the_original_is_gone(tmp_path, creator):
    src = make_venv(tmp_path / "build" / "env", SMALL, creator)
    crate = pack(src, tmp_path)
    shutil.rmtree(tmp_path / "build")
    dest = unpack(crate.archive, tmp_path / "deploy" / "here")
    _assert_works(dest, str(src))
    cfg = (dest / "pyvenv.cfg").read_text()
    assert "home = " in cfg


def test_unpack_cli_prints_prefix_and_json(small_crate, tmp_path):
    out = envcrate("unpack", small_crate.archive, tmp_path / "a")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "a")
    out = envcrate("unpack", small_crate.archive, tmp_path / "b", "--json")
    assert json.loads(out.stdout) == {"id": small_crate.id, "prefix": str(tmp_path / "b")}
    out = envcrate("unpack", small_crate.archive, tmp_path / "b")
    assert out.returncode == 1 and "not empty" in out.stderr


def test_numpy_venv_moved_away(tmp_path):
    src = make_venv(tmp_path / "orig", ["numpy"])
    crate = pack(src, tmp_path)
    src.rename(tmp_path / "moved")
    dest = unpack(crate.archive, tmp_path / "numpy-env")
    out = check(
        [
            dest / "bin" / "python",
            "-c",
            "import sys, numpy; print(sys.prefix, numpy.arange(4).sum())",
        ]
    )
    assert out.stdout.split() == [str(dest), "6"]
    glibc = crate.manifest.platform["libc"]["version"]
    assert glibc and tuple(map(int, glibc.split("."))) >= (2, 17)


def test_read_only_tree_imports_without_recompiling(small_crate, tmp_path):
    dest = unpack(small_crate.archive, tmp_path / "ro")
    before = sorted(str(p) for p in dest.rglob("*"))
    check(["chmod", "-R", "a-w", dest])
    try:
        out = check(
            [
                dest / "bin" / "python",
                "-v",
                "-X",
                "importtime",
                "-c",
                "import six, markupsafe, pyflakes.api",
            ],
            env={"PATH": "/usr/bin:/bin"},
        )
    finally:
        check(["chmod", "-R", "u+w", dest])
    after = sorted(str(p) for p in dest.rglob("*"))
    assert before == after  # no __pycache__ written (root ignores the read-only bits)
    site_lines = [line for line in out.stderr.splitlines() if str(dest) in line]
    assert any("code object from" in line and ".pyc" in line for line in site_lines)
    assert not [
        line for line in site_lines if "stale" in line or "could not" in line or "wrote" in line
    ]


def test_long_prefix_gets_sh_trampoline(small_crate, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "env"
    dest = unpack(small_crate.archive, deep)
    script = (dest / "bin" / "pyflakes").read_text()
    assert script.startswith("#!/bin/sh\n'''exec' ")
    assert check([dest / "bin" / "pyflakes", "--version"]).stdout.strip()


def test_binary_prefix_is_padded_or_refused(tmp_path):
    src = make_venv(tmp_path / "b" / "envsrc", ["six"])
    blob = b"\x00head\x00" + str(src).encode() + b"/lib/libfoo.so\x00tail"
    (src / "data.bin").write_bytes(blob)
    crate = pack(src, tmp_path)
    rec = next(r for r in crate.manifest.prefix_files if r["path"] == "data.bin")
    assert rec["mode"] == "binary"
    short = unpack(crate.archive, tmp_path / "s")
    data = (short / "data.bin").read_bytes()
    assert len(data) == len(blob)
    assert (str(short) + "/lib/libfoo.so").encode() + b"\0" in data and data.endswith(b"\0tail")
    longer = tmp_path / "a-much-longer-destination" / "for-the-env"
    with pytest.raises(RelocationError, match=rf"data.bin.*at most {len(str(src))} bytes"):
        unpack(crate.archive, longer)
    assert not longer.exists() and not [p for p in longer.parent.iterdir()]


def test_python_mismatch_is_a_clear_error(small_crate, tmp_path):
    import glob

    mine = "python%d.%d" % sys.version_info[:2]
    candidates = glob.glob("/usr/bin/python3.*") + glob.glob("/usr/local/bin/python3.*")
    candidates += glob.glob(os.path.expanduser("~/.pyenv/versions/*/bin/python3.*"))
    other = next(
        (
            c
            for c in sorted(candidates)
            if c[-1].isdigit() and not c.endswith(mine) and run([c, "-c", "pass"]).returncode == 0
        ),
        None,
    )
    if other is None:
        pytest.skip("no second Python version on this machine")
    out = envcrate("unpack", small_crate.archive, tmp_path / "x", "--python", other)
    assert out.returncode == 1
    assert "the crate needs CPython %d.%d" % sys.version_info[:2] in out.stderr
    assert not (tmp_path / "x").exists()


def test_no_interpreter_found_says_how_to_pass_one(small_crate, tmp_path, monkeypatch):
    import envcrate.node.compat as compat

    monkeypatch.setattr(compat, "probe", lambda path, memo=None: None)
    with pytest.raises(IncompatibleError, match="--python PATH"):
        unpack(small_crate.archive, tmp_path / "x")


def test_host_mismatch_refused_before_extracting(small_crate, tmp_path, monkeypatch):
    import envcrate.node.compat as compat

    monkeypatch.setattr(compat, "host_platform", lambda: {"os": "linux", "machine": "riscv64"})
    with pytest.raises(IncompatibleError, match="riscv64"):
        unpack(small_crate.archive, tmp_path / "x")
    monkeypatch.undo()
    monkeypatch.setattr(compat, "host_glibc", lambda: (2, 1))
    with pytest.raises(IncompatibleError, match=r"need glibc 2\.\d+, this host has glibc 2\.1"):
        unpack(small_crate.archive, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_archive_leaves_nothing(small_crate, tmp_path):
    bad = tmp_path / "bad.tar.zst"
    raw = bytearray(small_crate.archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(EnvcrateError):
        unpack(bad, tmp_path / "dest")
    # With the recorded digest the same copy fails even before decompressing bad data matters.
    (tmp_path / "bad.tar.zst.json").write_text(Path(str(small_crate.archive) + ".json").read_text())
    out = envcrate("unpack", bad, tmp_path / "dest")
    assert out.returncode == 1 and out.stderr.startswith("envcrate: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.zst", "bad.tar.zst.json"]


def test_digest_mismatch_from_record(small_crate, tmp_path):
    copy = tmp_path / "c.tar.zst"
    shutil.copy(small_crate.archive, copy)
    with pytest.raises(EnvcrateError, match="expected sha256:0000"):
        unpack(copy, tmp_path / "dest", blob="sha256:" + "0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tar.zst"]


def test_cli_digest_mismatch_with_the_hash_run_aside(small_crate, tmp_path):
    """The command line hashes the archive in a child process while it
    imports; a digest that does not match is still refused, given or
    recorded, and nothing is left."""
    copy = tmp_path / "c.tar.zst"
    shutil.copy(small_crate.archive, copy)
    out = envcrate("unpack", copy, tmp_path / "dest", "--sha256", "sha256:" + "0" * 64)
    assert out.returncode == 1 and "expected sha256:0000" in out.stderr, out.stderr
    record = json.loads(Path(str(small_crate.archive) + ".json").read_text())
    for a in record["archives"]:
        a["blob"] = "sha256:" + "1" * 64
    Path(str(copy) + ".json").write_text(json.dumps(record))
    out = envcrate("unpack", copy, tmp_path / "dest")
    assert out.returncode == 1 and "expected sha256:1111" in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tar.zst", "c.tar.zst.json"]


def test_background_hash(tmp_path):
    import hashlib

    from envcrate.procs import BackgroundHash

    data = os.urandom(5 << 20)
    (tmp_path / "f").write_bytes(data)
    assert BackgroundHash(tmp_path / "f").result() == hashlib.sha256(data).hexdigest()
    assert BackgroundHash(tmp_path / "missing").result() is None
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(64 << 30)  # minutes to hash
    running = BackgroundHash(tmp_path / "sparse")
    pid = running._pid
    running.cancel()
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(pid, os.WNOHANG)


@pytest.fixture(scope="module")
def big_file_venv(tmp_path_factory) -> Path:
    """A venv with a file larger than the reader's pieces and than a frame's
    share of memory, incompressible, so it spans frames and pieces."""
    venv = make_venv(tmp_path_factory.mktemp("big") / "env", ["six"])
    (venv / "share").mkdir(exist_ok=True)
    (venv / "share" / "blob.bin").write_bytes(os.urandom(9 << 20) + b"tail")
    return venv


def _without_index(archive: Path, out: Path) -> Path:
    """The archive without its two trailing skippable frames (index, seek
    table): a plain multi-frame .tar.zst, read as one stream."""
    raw = archive.read_bytes()
    count = struct.unpack("<I", raw[-9:-5])[0]
    table = raw[-9 - 8 * count : -9]
    frames_end = sum(struct.unpack_from("<I", table, 8 * i)[0] for i in range(count))
    assert int.from_bytes(raw[frames_end : frames_end + 4], "little") == 0x184D2A5B
    out.write_bytes(raw[:frames_end])
    return out


@pytest.mark.parametrize("how", ["tar.zst", "tar.zst-no-index", "tar.gz"])
def test_every_reader_path_round_trips_a_large_file(big_file_venv, tmp_path, how):
    fmt = "tar.gz" if how == "tar.gz" else "tar.zst"
    crate = pack(big_file_venv, tmp_path / f"c.{fmt}", format=fmt)
    archive = crate.archive
    if how == "tar.zst-no-index":
        archive = _without_index(archive, tmp_path / "plain.tar.zst")
    dest = unpack(archive, tmp_path / "dest")
    assert (dest / "share" / "blob.bin").read_bytes() == (
        big_file_venv / "share" / "blob.bin"
    ).read_bytes()
    out = envcrate("verify", archive, "--json")
    assert out.returncode == 0, out.stderr
    # Truncated anywhere in the body: an error, and nothing left behind.
    raw = archive.read_bytes()
    short = tmp_path / f"short.{fmt}"
    short.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(EnvcrateError):
        unpack(short, tmp_path / "dest2")
    assert not (tmp_path / "dest2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_only_shell_names_of_conda_state_become_variables(tmp_path):
    """``conda-meta/state`` comes from the crate: a name no shell accepts
    (``str.isidentifier`` allows ``é``) would break the whole ``eval``, so
    only ASCII shell names are kept, and the activation code still runs."""
    from envcrate.node import activation

    (tmp_path / "conda-meta").mkdir()
    state = {"env_vars": {"é": "1", "OK_1": "y", "1X": "n", "PATH2": "it's"}}
    (tmp_path / "conda-meta" / "state").write_text(json.dumps(state))
    act = activation.environment(tmp_path, "conda", {"PATH": "/usr/bin:/bin"})
    assert {k: act.set[k] for k in ("OK_1", "PATH2")} == {"OK_1": "y", "PATH2": "it's"}
    assert "é" not in act.set and "1X" not in act.set
    code = activation.shell_code("sh", act, (str(tmp_path / "l"), "x.", None))
    out = subprocess.run(
        ["sh", "-c", code + 'echo "$OK_1 $PATH2"; deactivate; echo "${OK_1-gone}"'],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.splitlines() == ["y it's", "gone"], out.stderr
