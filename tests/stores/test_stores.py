"""One store suite, run against every backend: a directory, S3 (a real
SeaweedFS server) and HTTP (a local web server over a directory store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import envcrate, fails, ok

from envcrate.crate.manifest import short_id
from envcrate.errors import StoreError
from envcrate.stores import blob_key, file_digest, open_store, record_key


def test_push_publishes_what_readers_find(backend, small_crate, tmp_path):
    pushed = ok(
        backend.cli("push", small_crate.archive, "--store", backend.writer, "--tag", "t1", "--json")
    )
    assert pushed["id"] == small_crate.id and pushed["blob"] == small_crate.blob
    assert pushed["uploaded"] is True and pushed["size"] == small_crate.size

    info = ok(backend.cli("info", "t1", "--store", backend.reader, "--json"))
    assert info["id"] == small_crate.id and info["kind"] == "venv"
    assert ok(backend.cli("info", small_crate.id, "--store", backend.reader, "--json"))["id"] == (
        small_crate.id
    )

    store = open_store(backend.reader)
    fetched = store.fetch(small_crate.id, tmp_path)
    assert fetched.name == f"{small_crate.manifest.data['name']}-{short_id(small_crate.id)}.tar.zst"
    assert fetched.read_bytes() == small_crate.archive.read_bytes()

    if backend.kind == "http":
        fails(backend.cli("ls", "--store", backend.reader), "cannot be listed")
        fails(
            backend.cli("info", short_id(small_crate.id), "--store", backend.reader),
            "full crate id",
        )
        fails(backend.cli("push", small_crate.archive, "--store", backend.reader), "read-only")
    else:
        listed = ok(backend.cli("ls", "--store", backend.reader, "--json"))["crates"]
        assert [(c["id"], c["tags"], c["formats"]) for c in listed] == [
            (small_crate.id, ["t1"], ["tar.zst"])
        ]
        by_prefix = ok(
            backend.cli("info", short_id(small_crate.id), "--store", backend.reader, "--json")
        )
        assert by_prefix["id"] == small_crate.id
        human = backend.cli("ls", "--store", backend.reader)
        assert short_id(small_crate.id) in human.stdout and "t1" in human.stdout


def test_ship_uploads_only_what_is_missing(backend, small_venv, small_crate, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    first = ok(backend.cli("ship", small_venv, "--store", backend.writer, "--json", cwd=cwd))
    assert first["id"] == small_crate.id  # identify() agrees with pack()
    assert first["uploaded"] is True

    again = ok(backend.cli("ship", small_venv, "--store", backend.writer, "--json", cwd=cwd))
    assert again["uploaded"] is False and again["blob"] == first["blob"]

    gz = ok(
        backend.cli(
            "ship", small_venv, "--store", backend.writer, "--format", "tar.gz", "--json", cwd=cwd
        )
    )
    assert gz["uploaded"] is True and gz["id"] == first["id"] and gz["blob"] != first["blob"]
    record = open_store(backend.reader).record(first["id"])
    assert sorted((a["format"], a["blob"]) for a in record["archives"]) == sorted(
        [("tar.gz", gz["blob"]), ("tar.zst", first["blob"])]
    )
    assert list(cwd.iterdir()) == []  # ship writes no archive where it runs
    # With both formats listed (tar.gz sorts first), fetching without a format takes tar.zst.
    fetched = open_store(backend.reader).fetch(first["id"], tmp_path)
    assert fetched.name.endswith(".tar.zst")
    fetched.unlink()
    if backend.kind != "s3":
        leftovers = [p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(".")]
        assert leftovers == []


def test_tags_and_removal(backend, small_crate):
    w = backend.writer
    ok(backend.cli("push", small_crate.archive, "--store", w, "--json"))
    fails(backend.cli("tag", small_crate.id, "a" * 12, "--store", w), "cannot be a tag")
    fails(backend.cli("tag", small_crate.id, "has/slash", "--store", w), "cannot be a tag")
    fails(backend.cli("tag", "no-such-tag", "x", "--store", w), "no-such-tag", "envcrate ls")
    tagged = ok(
        backend.cli("tag", short_id(small_crate.id), "md-tools:2026-11", "--store", w, "--json")
    )
    assert tagged["id"] == small_crate.id
    assert ok(backend.cli("info", "md-tools:2026-11", "--store", backend.reader, "--json"))[
        "id"
    ] == (small_crate.id)

    fails(backend.cli("rm", small_crate.id, "--store", w), "md-tools:2026-11", "--force")
    assert open_store(backend.reader).record(small_crate.id) is not None
    removed = ok(backend.cli("rm", small_crate.id, "--store", w, "--force", "--json"))
    assert removed["tags"] == ["md-tools:2026-11"] and removed["blobs"] == [small_crate.blob]

    reader = open_store(backend.reader)
    assert reader.record(small_crate.id) is None
    assert reader.size(blob_key(small_crate.blob)) is None
    fails(backend.cli("info", small_crate.id, "--store", backend.reader), "not in")
    fails(backend.cli("info", "md-tools:2026-11", "--store", backend.reader), "no crate or tag")


def test_corrupt_record_is_a_one_line_error(backend, small_crate):
    ok(backend.cli("push", small_crate.archive, "--store", backend.writer, "--json"))
    open_store(backend.writer).write(record_key(small_crate.id), b"{not json")
    fails(backend.cli("info", small_crate.id, "--store", backend.reader), "corrupt", "rm")
    # Publishing again repairs it.
    ok(backend.cli("push", small_crate.archive, "--store", backend.writer, "--json"))
    assert ok(backend.cli("info", small_crate.id, "--store", backend.reader, "--json"))["id"] == (
        small_crate.id
    )


def test_ambiguous_prefix_lists_the_candidates(backend):
    if backend.kind == "http":
        pytest.skip("HTTP stores cannot list, so prefixes are refused (tested above)")
    store = open_store(backend.writer)
    ids = ["sha256:" + "ab" * 6 + c * 52 for c in "01"]
    for crate_id in ids:
        store.write(record_key(crate_id), json.dumps({"id": crate_id, "archives": []}).encode())
    err = fails(backend.cli("info", "ab" * 6, "--store", backend.reader), "ambiguous")
    assert all(i in err for i in ids)
    fails(backend.cli("info", "cd" * 6, "--store", backend.reader), "no crate")


def test_two_clients_shipping_the_same_crate_at_once(backend, small_venv, tmp_path):
    if backend.kind == "http":
        pytest.skip("HTTP stores are read-only")
    cmd = [sys.executable, "-m", "envcrate.cli", "ship", str(small_venv), "--store"]
    procs = [
        subprocess.Popen(
            [*cmd, backend.writer, "--tag", "both", "--json"],
            env=backend.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    shipped = [json.loads(r[0]) for r in results]
    assert shipped[0]["id"] == shipped[1]["id"] and shipped[0]["blob"] == shipped[1]["blob"]
    store = open_store(backend.reader)
    record = store.record(shipped[0]["id"])
    assert [a["blob"] for a in record["archives"]] == [shipped[0]["blob"]]
    assert store.resolve("both") == shipped[0]["id"]
    path = store.fetch(shipped[0]["id"], tmp_path)
    assert file_digest(path) == shipped[0]["blob"]


def test_damaged_blob_is_refused_on_fetch(backend, small_crate, tmp_path):
    ok(backend.cli("push", small_crate.archive, "--store", backend.writer, "--json"))
    data = bytearray(small_crate.archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    writer = open_store(backend.writer)
    damaged = tmp_path / "damaged"
    damaged.write_bytes(bytes(data))
    writer.upload(blob_key(small_crate.blob), damaged, small_crate.blob, None)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(Exception, match="damaged"):
        open_store(backend.reader).fetch(small_crate.id, dest)
    assert list(dest.iterdir()) == []


def test_missing_store_objects_are_clear(backend):
    fails(backend.cli("info", "sha256:" + "0" * 64, "--store", backend.reader), "not in")
    fails(backend.cli("info", "nothing-here", "--store", backend.reader), "no crate or tag")
    fails(backend.cli("rm", "nothing-here", "--store", backend.writer), "no crate or tag")


def test_default_store_is_envcrate_store_then_user_data(tmp_path, small_crate, monkeypatch):
    env = {k: v for k, v in __import__("os").environ.items() if k != "ENVCRATE_STORE"}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    ok(envcrate("push", small_crate.archive, "--json", env=env))
    assert (tmp_path / "data" / "envcrate" / "store" / record_key(small_crate.id)).is_file()
    env["ENVCRATE_STORE"] = str(tmp_path / "other")
    ok(envcrate("push", small_crate.archive, "--json", env=env))
    assert (tmp_path / "other" / record_key(small_crate.id)).is_file()


def test_http_store_refuses_writes_in_the_api(small_crate):
    store = open_store("http://127.0.0.1:9/store")
    with pytest.raises(StoreError, match="read-only"):
        store.publish(small_crate.archive, small_crate.manifest.data, "tar.zst", "x", 1)


def test_ship_cleans_what_killed_writers_left_in_a_directory_store(small_venv, tmp_path):
    store = tmp_path / "store"
    old = time.time() - 2 * 3600
    stale = [store / ".envcrate-ship-abc", store / "crates" / ".x.json.abc.tmp"]
    fresh = store / ".envcrate-ship-new"  # a ship in progress
    for p in stale + [fresh]:
        if p.suffix == ".tmp":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("")
        else:
            (p / "sub").mkdir(parents=True)
    for p in stale:
        os.utime(p, (old, old))
    ok(envcrate("ship", small_venv, "--store", store, "--json"))
    assert not any(os.path.lexists(p) for p in stale)
    assert fresh.is_dir()


# --------------------------------------------------------------------------- publishing checks


def _damage(backend, crate, blob: str, tmp_path, same_size: bool) -> None:
    """Replace the store's copy of ``blob``: one byte flipped (same size) or cut short."""
    data = bytearray(crate.archive.read_bytes())
    if same_size:
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    damaged = tmp_path / "damaged-copy"
    damaged.write_bytes(bytes(data))
    open_store(backend.writer).upload(blob_key(blob), damaged, blob, None)


def test_push_refuses_a_truncated_or_altered_archive(backend, small_crate, tmp_path):
    if backend.kind == "http":
        pytest.skip("HTTP stores are read-only")
    data = small_crate.archive.read_bytes()
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(data[: len(data) * 2 // 3])  # no record beside it: nothing to compare with
    altered = tmp_path / "altered.tar.zst"
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    altered.write_bytes(bytes(flipped))
    for bad in (cut, altered):
        fails(backend.cli("push", bad, "--store", backend.writer, "--json"), str(bad))
    store = open_store(backend.reader)
    assert store.record(small_crate.id) is None
    assert store.size(blob_key(file_digest(cut))) is None
    assert store.size(blob_key(file_digest(altered))) is None


def test_push_never_replaces_an_intact_archive_with_other_bytes(
    backend, small_venv, small_crate, tmp_path
):
    if backend.kind == "http":
        pytest.skip("HTTP stores are read-only")
    from envcrate import pack

    (tmp_path / "other").mkdir()
    other = pack(small_venv, tmp_path / "other", level=1)  # the same crate, other bytes
    assert other.id == small_crate.id and other.blob != small_crate.blob
    ok(backend.cli("push", small_crate.archive, "--store", backend.writer, "--json"))

    out = backend.cli("push", other.archive, "--store", backend.writer, "--json")
    kept = ok(out)
    assert kept["uploaded"] is False and kept["kept"] is True
    assert kept["blob"] == small_crate.blob
    human = backend.cli("push", other.archive, "--store", backend.writer)
    assert human.returncode == 0 and "kept" in human.stderr, human.stderr
    store = open_store(backend.reader)
    assert [a["blob"] for a in store.record(small_crate.id)["archives"]] == [small_crate.blob]
    assert store.size(blob_key(other.blob)) is None

    # A damaged copy is replaced: same size and other bytes (the directory
    # store hashes it), or short (every store sees the size).
    _damage(backend, small_crate, small_crate.blob, tmp_path, same_size=backend.kind == "fs")
    replaced = ok(backend.cli("push", other.archive, "--store", backend.writer, "--json"))
    assert replaced["uploaded"] is True and replaced["kept"] is False
    assert [a["blob"] for a in store.record(small_crate.id)["archives"]] == [other.blob]
    assert file_digest(store.fetch(small_crate.id, tmp_path)) == other.blob


def test_ship_uploads_again_over_a_damaged_blob(backend, small_venv, tmp_path):
    if backend.kind == "http":
        pytest.skip("HTTP stores are read-only")
    first = ok(backend.cli("ship", small_venv, "--store", backend.writer, "--json"))
    store = open_store(backend.reader)

    class Packed:  # what _damage needs: the archive's bytes
        archive = tmp_path / "first.tar.zst"

    Packed.archive.write_bytes(store.read(blob_key(first["blob"])))
    _damage(backend, Packed, first["blob"], tmp_path, same_size=backend.kind == "fs")
    again = ok(backend.cli("ship", small_venv, "--store", backend.writer, "--json"))
    assert again["uploaded"] is True and again["blob"] == first["blob"]
    assert file_digest(store.fetch(first["id"], tmp_path)) == first["blob"]
    assert (
        ok(backend.cli("ship", small_venv, "--store", backend.writer, "--json"))["uploaded"]
        is False
    )


# --------------------------------------------------------------------------- hostile records


def _record_of(backend, crate_id: str) -> dict:
    return json.loads(open_store(backend.writer).read(record_key(crate_id)))


def _write(backend, key: str, obj) -> None:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    open_store(backend.writer).write(key, data)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda r: r["archives"][0].pop("blob"), ["blob"]),
        (lambda r: r.pop("platform"), ["platform"]),
        (lambda r: r.update(files="many"), ["files"]),
        (lambda r: r.update(archives={"format": "tar.zst"}), ["archives"]),
        (lambda r: r.update(archives=["tar.zst"]), ["archives"]),
        (lambda r: r["archives"][0].update(size="12"), ["size"]),
        (lambda r: r["archives"][0].update(blob="sha256:../../../../etc/passwd"), ["blob"]),
        (lambda r: r["archives"][0].update(blob="sha256:" + "A" * 64), ["blob"]),
    ],
    ids=[
        "no-blob",
        "no-platform",
        "files-str",
        "archives-dict",
        "archives-str",
        "size-str",
        "blob-dotdot",
        "blob-upper",
    ],
)
def test_malformed_records_are_one_line_errors(backend, small_crate, tmp_path, change, words):
    if backend.kind == "s3":
        pytest.skip("the checks are the store's own, the same for every backend (fs, http here)")
    ok(backend.cli("push", small_crate.archive, "--store", backend.writer, "--json"))
    record = _record_of(backend, small_crate.id)
    change(record)
    _write(backend, record_key(small_crate.id), record)
    cache = tmp_path / "cache"
    commands = [["info", small_crate.id], ["ensure", small_crate.id, "--cache", cache]]
    if backend.kind == "http":  # it can hand out URLs
        commands.append(["url", small_crate.id])
    for cmd in commands:
        err = fails(backend.cli(*cmd, "--store", backend.reader), *words)
        assert "malformed" in err and "push" in err, err
    assert not (cache / "e").exists() or list((cache / "e").iterdir()) == []


def test_a_record_digest_is_never_used_as_a_path(backend, small_crate, tmp_path):
    if backend.kind != "fs":
        pytest.skip("paths are the directory store's")
    secret = tmp_path / "secret"
    secret.write_text("not yours\n")
    ok(backend.cli("push", small_crate.archive, "--store", backend.writer, "--json"))
    record = _record_of(backend, small_crate.id)
    rel = os.path.relpath(secret, tmp_path / "store" / "blobs" / "sha256" / "ab")
    record["archives"][0]["blob"] = "sha256:ab/" + rel
    _write(backend, record_key(small_crate.id), record)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(StoreError, match="blob"):
        open_store(backend.reader).fetch(small_crate.id, dest)
    assert list(dest.iterdir()) == []
    with pytest.raises(StoreError):
        blob_key("sha256:../" + "0" * 61)


@pytest.mark.parametrize("tag", [{"crate": 5}, {"crate": "sha256:" + "ab" * 6}, ["x"], b"{"])
def test_malformed_tags_are_one_line_errors(backend, small_crate, tag):
    ok(backend.cli("push", small_crate.archive, "--store", backend.writer, "--json"))
    _write(backend, "tags/bad.json", tag)
    err = fails(backend.cli("info", "bad", "--store", backend.reader), "bad")
    assert "tag" in err and ("malformed" in err or "corrupt" in err), err


def test_ls_lists_the_rest_and_warns_about_each_problem(backend, small_crate):
    if backend.kind == "http":
        pytest.skip("HTTP stores cannot list")
    w = backend.writer
    ok(backend.cli("push", small_crate.archive, "--store", w, "--tag", "good", "--json"))
    broken = "sha256:" + "cd" * 32
    _write(backend, record_key(broken), {"id": broken, "archives": "none"})
    _write(backend, "tags/five.json", {"crate": 5})
    _write(backend, "tags/junk.json", b"\x00garbage")

    listed = backend.cli("ls", "--store", backend.reader, "--json")
    got = ok(listed)
    assert [(c["id"], c["tags"]) for c in got["crates"]] == [(small_crate.id, ["good"])]
    problems = got["problems"]
    assert len(problems) == 3, problems
    assert any(record_key(broken) in p for p in problems)
    assert any("tags/five.json" in p for p in problems)
    assert any("tags/junk.json" in p for p in problems)
    warnings = listed.stderr.strip().splitlines()
    assert len(warnings) == 3 and all("fsck" in line for line in warnings), warnings
    assert "Traceback" not in listed.stderr

    human = backend.cli("ls", "--store", backend.reader)
    assert human.returncode == 0 and short_id(small_crate.id) in human.stdout
    assert len(human.stderr.strip().splitlines()) == 3
    # rm and tag still work beside a corrupt tag
    ok(backend.cli("tag", small_crate.id, "other", "--store", w, "--json"))
    ok(backend.cli("rm", small_crate.id, "--store", w, "--force", "--json"))


def test_a_malformed_record_beside_an_archive_is_no_traceback(small_crate, tmp_path):
    import shutil

    archive = tmp_path / small_crate.archive.name
    shutil.copy(small_crate.archive, archive)
    for beside in (b'{"archives": [5]}', b'{"archives": 5}', b'[{"blob": 1}]'):
        (tmp_path / (archive.name + ".json")).write_bytes(beside)
        pushed = ok(envcrate("push", archive, "--store", tmp_path / "store", "--json"))
        assert pushed["blob"] == small_crate.blob  # verified from the bytes themselves


def test_a_record_larger_than_any_record_is_refused_unread(backend, small_crate, monkeypatch):
    import envcrate.stores.base as base

    monkeypatch.setattr(base, "MAX_RECORD", 1000)
    ok(backend.cli("push", small_crate.archive, "--store", backend.writer, "--json"))
    _write(backend, "tags/huge.json", b'{"crate": "' + b" " * 2000 + b'"}')
    store = open_store(backend.reader)
    with pytest.raises(StoreError, match="larger than 1000 bytes") as err:
        store.resolve("huge")
    assert "\n" not in str(err.value)
    with pytest.raises(StoreError, match="larger than 1000 bytes"):
        store.record(small_crate.id)  # a real record, larger than this test's limit
