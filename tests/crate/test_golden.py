"""The golden crate: a small conda env written file by file (no package
index, no interpreter run) packs to the crate id and blob digests pinned
here, as pixi-pack pins the sha256 of its archives.

A change of the crate format, of the relocation spec or of what the packer
archives changes the id; the blob digests also change with the manifest
(envcrate's version is in it) and with the compressors' output (zstandard,
zlib). Any of these must be a deliberate change: update the pins below in
the same commit and say why in its message.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from envcrate import pack

# Format 3 (2026-12-08): the id's first line names the format (the format 2
# archive of this env, id 95adbee7..., is tests/crate/data/golden-format2.tar.zst).
# The prefix is part of the manifest, hence of the blob digests: the env is
# built at this fixed path, one test run at a time (see the lock below).
PREFIX = "/tmp/envcrate-golden/env"
PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3/build_placeholder_prefix"
MTIME = 1_700_000_000

GOLDEN_ID = "sha256:f96f0c0f52d49425d03338902d73392a3691f9ec1410aacc5fd82ae75b838f13"
GOLDEN_BLOBS = {
    "tar.zst": "sha256:52444d7cf8849e583bd9457f12d372abfd058d97f8e86e809a44cd14fa3b6065",
    "tar.gz": "sha256:9868feac973acbed9d3cd99d40bea1c246416f0f38afd1cc7e9ce7afdc1bfab8",
}

PYTHON_FILES = {
    "lib/python3.12/os.py": b"# stand-in for the standard library\nsep = '/'\n",
    "lib/python3.12/site-packages/README.txt": b"This directory exists so that users can easily find it.\n",
}
DEMO_FILES = {
    "bin/demo": (f"#!{PLACEHOLDER}/bin/python3.12\nimport demo\nprint(demo.VERSION)\n", 0o755),
    "etc/demo.conf": (f"prefix={PLACEHOLDER}\nshare={PLACEHOLDER}/share/demo\n", 0o644),
    "share/demo/data.bin": (b"\0\1\2" + PLACEHOLDER.encode() + b"\0" * 16 + b"\xff", 0o644),
    "lib/python3.12/site-packages/demo/__init__.py": ("VERSION = '1.0'\n", 0o644),
    "lib/libdemo.so.1": (b"not really a library\n", 0o755),
}
DEMO_PLACEHOLDERS = {"bin/demo": "text", "etc/demo.conf": "text", "share/demo/data.bin": "binary"}
DEMO_LINKS = {"lib/libdemo.so": "libdemo.so.1"}


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    os.utime(path, (MTIME, MTIME))


def _package(pkgs: Path, name: str, version: str, files: dict, placeholders: dict, links: dict):
    """An extracted package in the package cache, and its conda-meta record."""
    stem = f"{name}-{version}-h0_0"
    src = pkgs / stem
    paths = []
    for path, (data, mode) in sorted(files.items()):
        raw = data.encode() if isinstance(data, str) else data
        _write(src / path, raw, mode)
        rec = {"_path": path, "path_type": "hardlink", "sha256": hashlib.sha256(raw).hexdigest()}
        rec["size_in_bytes"] = len(raw)
        if path in placeholders:
            rec.update(file_mode=placeholders[path], prefix_placeholder=PLACEHOLDER)
        paths.append(rec)
    for path, target in sorted(links.items()):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, src / path)
        paths.append({"_path": path, "path_type": "softlink", "size_in_bytes": 0})
    paths.sort(key=lambda r: r["_path"])
    index = {"name": name, "version": version, "build": "h0_0", "build_number": 0}
    index.update(subdir="linux-64", platform="linux", arch="x86_64", depends=[])
    _write(src / "info/index.json", json.dumps(index, indent=1))
    _write(src / "info/paths.json", json.dumps({"paths": paths, "paths_version": 1}, indent=1))
    record = dict(
        index,
        fn=stem + ".conda",
        url=f"https://example.invalid/golden/linux-64/{stem}.conda",
        channel="https://example.invalid/golden",
        md5="0" * 32,
        sha256="1" * 64,
        files=sorted(files) + sorted(links),
        paths_data={"paths": paths, "paths_version": 1},
        link={"source": str(src), "type": 1},
        extracted_package_dir=str(src),
    )
    return record


def build_golden_env(prefix: Path) -> None:
    """The env as conda would have linked it: package files with the
    placeholder replaced, records, an unmanaged file naming the prefix, a
    pip-installed distribution and a timestamp pyc."""
    pkgs = prefix.parent / "pkgs"  # the package cache, named in the records
    python = _package(
        pkgs, "python", "3.12.1", {p: (d, 0o644) for p, d in PYTHON_FILES.items()}, {}, {}
    )
    demo = _package(pkgs, "demo", "1.0", DEMO_FILES, DEMO_PLACEHOLDERS, DEMO_LINKS)
    for record in (python, demo):
        stem = f"{record['name']}-{record['version']}-h0_0"
        _write(prefix / "conda-meta" / f"{stem}.json", json.dumps(record, indent=2, sort_keys=True))
        for path in record["files"]:
            src = Path(record["link"]["source"], path)
            dst = prefix / path
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            data = src.read_bytes().replace(PLACEHOLDER.encode(), str(prefix).encode())
            if path in DEMO_PLACEHOLDERS and DEMO_PLACEHOLDERS[path] == "binary":
                pad = len(PLACEHOLDER) - len(str(prefix))
                data = src.read_bytes().replace(
                    PLACEHOLDER.encode(), str(prefix).encode() + b"\0" * pad
                )
            _write(dst, data, stat.S_IMODE(src.stat().st_mode))
    _write(prefix / "conda-meta/history", "==> 2026-01-01 00:00:00 <==\n# golden\n")
    _write(prefix / "etc/site.conf", f"written after install: {prefix}/etc\n")
    site = prefix / "lib/python3.12/site-packages"
    dist = site / "extra-2.0.dist-info"
    _write(dist / "METADATA", "Metadata-Version: 2.1\nName: extra\nVersion: 2.0\n")
    _write(dist / "INSTALLER", "pip\n")
    _write(dist / "RECORD", "extra.py,,\nextra-2.0.dist-info/METADATA,,\n")
    source = b"ANSWER = 42\n"
    _write(site / "extra.py", source)
    header = (3531).to_bytes(2, "little") + b"\r\n" + bytes(4)
    header += MTIME.to_bytes(4, "little") + len(source).to_bytes(4, "little")
    _write(site / "__pycache__/extra.cpython-312.pyc", header + b"\xe3 not real code")
    for d in sorted(prefix.rglob("*"), reverse=True):
        if d.is_dir() and not d.is_symlink():
            os.utime(d, (MTIME, MTIME))


@pytest.fixture
def golden_env():
    """The env at PREFIX, built afresh; the lock keeps concurrent test runs
    on one machine from building it under each other."""
    root = Path(PREFIX).parent
    root.mkdir(exist_ok=True)
    with open(root.parent / "envcrate-golden.lock", "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        for d in (PREFIX, root / "pkgs"):
            shutil.rmtree(d, ignore_errors=True)
        build_golden_env(Path(PREFIX))
        try:
            yield Path(PREFIX)
        finally:
            for d in (PREFIX, root / "pkgs"):
                shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", ["tar.zst", "tar.gz"])
def test_the_golden_env_packs_to_the_pinned_crate_id_and_blob(golden_env, tmp_path, fmt, threads):
    crate = pack(str(golden_env), output=tmp_path, format=fmt, threads=threads)
    blob = "sha256:" + hashlib.sha256(Path(crate.archive).read_bytes()).hexdigest()
    assert (crate.id, blob) == (GOLDEN_ID, GOLDEN_BLOBS[fmt]), (
        "the golden crate changed: if the format, the relocation spec, the packer, envcrate's "
        "version or the compressor changed on purpose, pin the new values in tests/test_golden.py"
    )
