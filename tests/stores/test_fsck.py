"""``envcrate fsck``: what a store holds that no reader can use, and the
repairs of it, on a directory store and S3 (HTTP stores cannot be listed)."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import fails, ok

from envcrate import pack
from envcrate.stores import blob_key, open_store, record_key

MISSING = "sha256:" + "11" * 32  # a crate whose record names a blob that is not there
CORRUPT = "sha256:" + "33" * 32  # a crate whose record is not JSON
GONE = "sha256:" + "44" * 32  # a crate that was never published


def _put_blob(store, data: bytes, tmp_path, name: str) -> str:
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / name
    path.write_bytes(data)
    store.upload(blob_key(digest), path, digest, None)
    return digest


def _age(backend, digest: str, seconds: float) -> None:
    path = os.path.join(backend.writer, blob_key(digest))
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def troubled(backend, small_venv, small_crate, tmp_path):
    """A store with one of each problem fsck finds, beside an intact crate."""
    if backend.kind == "http":
        pytest.skip("HTTP stores cannot be listed (tested below)")
    w = backend.writer
    ok(backend.cli("push", small_crate.archive, "--store", w, "--tag", "good", "--json"))
    (tmp_path / "gz").mkdir()
    gz = pack(small_venv, tmp_path / "gz" / "small.tar.gz")
    ok(backend.cli("push", gz.archive, "--store", w, "--json"))
    store = open_store(w)
    # the tar.gz blob damaged: same size in a directory store (its digest tells), short on S3
    data = bytearray(gz.archive.read_bytes())
    if backend.kind == "fs":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[100:]
    damaged = tmp_path / "damaged"
    damaged.write_bytes(bytes(data))
    store.upload(blob_key(gz.blob), damaged, gz.blob, None)

    record = json.loads(store.read(record_key(small_crate.id)))
    record = dict(record, id=MISSING)
    record["archives"] = [dict(record["archives"][0], blob="sha256:" + "22" * 32)]
    store.write(record_key(MISSING), json.dumps(record).encode())
    store.write("tags/to-missing.json", json.dumps({"crate": MISSING}).encode())
    store.write(record_key(CORRUPT), b"{not json")
    store.write("tags/to-corrupt.json", json.dumps({"crate": CORRUPT}).encode())
    store.write("tags/five.json", b'{"crate": 5}')
    store.write("tags/dangling.json", json.dumps({"crate": GONE}).encode())
    # build records (envcrate build): one good, one naming nothing, one corrupt
    store.write(f"builds/{'a' * 64}.json", json.dumps({"crate": small_crate.id}).encode())
    store.write(f"builds/{'b' * 64}.json", json.dumps({"crate": GONE}).encode())
    store.write(f"builds/{'c' * 64}.json", b"{not json")
    old = _put_blob(store, os.urandom(1000), tmp_path, "old")
    young = _put_blob(store, os.urandom(1000), tmp_path, "young")
    if backend.kind == "fs":
        _age(backend, old, 2 * 3600)
    return store, gz, old, young


def _kinds(report: dict) -> list[tuple[str, str]]:
    return sorted((p["problem"], p["key"]) for p in report["problems"])


def test_fsck_finds_each_problem_and_repairs_what_it_can(backend, troubled, small_crate):
    store, gz, old, young = troubled
    w = backend.writer
    out = backend.cli("fsck", "--store", w, "--json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    expected = [
        ("corrupt-record", record_key(CORRUPT)),
        ("corrupt-tag", "tags/five.json"),
        ("damaged-blob", blob_key(gz.blob)),
        ("dangling-tag", "tags/dangling.json"),
        ("dangling-build", f"builds/{'b' * 64}.json"),
        ("corrupt-build", f"builds/{'c' * 64}.json"),
        ("missing-blob", blob_key("sha256:" + "22" * 32)),
    ]
    if backend.kind == "fs":  # S3 cannot be told its objects' age: old only in the API test
        expected.append(("orphan-blob", blob_key(old)))
    assert _kinds(report) == sorted(expected)
    assert blob_key(young) in report["recent"]
    assert not report["ok"] and all(not p["repaired"] for p in report["problems"])
    human = backend.cli("fsck", "--store", w)
    assert human.returncode == 1 and "fsck --store" in human.stderr
    assert len(human.stderr.strip().splitlines()) == 1 and "Traceback" not in human.stderr
    assert "damaged-blob" in human.stdout and "corrupt-tag" in human.stdout

    if backend.kind == "fs":
        out = backend.cli("fsck", "--store", w, "--repair", "--json")
    else:  # as if an hour had passed, so that the old orphan counts
        from envcrate.stores.fsck import fsck

        out = None
        report = fsck(store, repair=True, now=time.time() + 2 * 3600)
    if out is not None:
        assert out.returncode == 1, out.stderr  # the corrupt record remains
        report = json.loads(out.stdout)
    remaining = [(p["problem"], p["key"]) for p in report["problems"] if not p["repaired"]]
    assert remaining == [("corrupt-record", record_key(CORRUPT))]
    assert report["repaired"], report

    # What readers now see: the intact crate, its tag, nothing broken.
    record = store.record(small_crate.id)
    assert [a["format"] for a in record["archives"]] == ["tar.zst"]
    assert store.size(blob_key(gz.blob)) is None
    assert store.record(MISSING) is None
    assert sorted(store.tag_names()) == ["good", "to-corrupt"]
    assert store.keys("builds/") == [f"builds/{'a' * 64}.json"]  # the good one stays
    assert store.size(blob_key(old)) is None
    if backend.kind == "fs":
        assert store.size(blob_key(young)) is not None  # maybe a push in progress

    fails(backend.cli("fsck", "--store", w), "corrupt")
    ok(backend.cli("rm", CORRUPT, "--store", w, "--force", "--json"))
    clean = backend.cli("fsck", "--store", w, "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["ok"] is True
    assert ok(backend.cli("ls", "--store", w, "--json"))["problems"] == []


def test_fsck_of_a_clean_store_says_so(backend, small_crate):
    if backend.kind == "http":
        err = fails(backend.cli("fsck", "--store", backend.reader), "cannot be listed")
        assert "HTTP" in err
        return
    ok(backend.cli("push", small_crate.archive, "--store", backend.writer, "--tag", "t", "--json"))
    report = ok(backend.cli("fsck", "--store", backend.writer, "--json"))
    assert report["ok"] is True and report["problems"] == [] and report["recent"] == []
    assert report["checked"] == {"records": 1, "blobs": 1, "tags": 1, "builds": 0}
    human = backend.cli("fsck", "--store", backend.writer, "--repair")
    assert human.returncode == 0 and "no problems" in human.stdout
