"""Stores failing: servers lost mid-transfer, bad credentials, missing buckets,
unwritable directories; presigned URLs; permissions of shared stores."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import urllib.request

import pytest
from conftest import envcrate, fails, make_venv, ok, use_aws_env
from servers import READER_KEY, READER_SECRET, SeaweedFS, free_port

from envcrate import pack
from envcrate.errors import DigestMismatchError, StoreError
from envcrate.network import download_url
from envcrate.stores import blob_key, file_digest, open_store, record_key


@pytest.fixture(scope="module")
def big_crate(tmp_path_factory):
    """A crate of about 24 MB that does not compress: several multipart parts."""
    root = tmp_path_factory.mktemp("big")
    venv = make_venv(root / "big")
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "noise.bin").write_bytes(os.urandom(24 << 20))
    return pack(venv, root, level=1)


@pytest.fixture
def own_seaweed(tmp_path, monkeypatch):
    """A server of this test's own, which the test may kill and restart."""
    server = SeaweedFS(tmp_path / "seaweed")
    server.start()
    use_aws_env(monkeypatch, server.env())
    # A dead server is retried until the deadline: a short one here.
    monkeypatch.setenv("ENVCRATE_NETWORK_DEADLINE", "3")
    yield server
    server.stop()


def _killer(server: SeaweedFS, seen: list):
    """A progress callback that records byte counts and kills the server at the first."""

    def kill_after_first_bytes(n: int) -> None:
        seen.append(n)
        if len(seen) == 1:
            server.kill()

    return kill_after_first_bytes


def _one_line(e: Exception, *words: str) -> None:
    text = str(e)
    assert "\n" not in text, text
    for w in words:
        assert w in text, text


def test_upload_cut_by_server_loss_leaves_nothing_and_retry_succeeds(own_seaweed, big_crate):
    url = f"s3://{own_seaweed.bucket()}/crates"
    store = open_store(url)
    sent = []
    kill_after_first_bytes = _killer(own_seaweed, sent)

    with pytest.raises(StoreError) as err:
        store.publish(
            big_crate.archive,
            big_crate.manifest.data,
            "tar.zst",
            big_crate.blob,
            big_crate.size,
            progress=kill_after_first_bytes,
        )
    _one_line(err.value, "cannot reach")
    assert sum(sent) < big_crate.size

    own_seaweed.start()
    fresh = open_store(url)
    assert fresh.size(blob_key(big_crate.blob)) is None
    assert fresh.record(big_crate.id) is None

    pushed = ok(
        envcrate("push", big_crate.archive, "--store", url, "--json", env=own_seaweed.env())
    )
    assert pushed["uploaded"] is True and pushed["id"] == big_crate.id
    client = own_seaweed.client()
    assert client.list_multipart_uploads(Bucket=own_seaweed.bucket()).get("Uploads", []) == []
    head = client.head_object(
        Bucket=own_seaweed.bucket(),
        Key="crates/" + blob_key(big_crate.blob),
        ChecksumMode="ENABLED",
    )
    assert head["ContentLength"] == big_crate.size
    assert "ChecksumSHA256" in head  # the server checked each part against it


def test_download_cut_by_server_loss_leaves_nothing_and_retry_succeeds(
    own_seaweed, big_crate, tmp_path
):
    url = f"s3://{own_seaweed.bucket()}/crates"
    store = open_store(url)
    assert store.publish(
        big_crate.archive, big_crate.manifest.data, "tar.zst", big_crate.blob, big_crate.size
    ).uploaded
    dest = tmp_path / "dest"
    dest.mkdir()
    got = []
    kill_after_first_bytes = _killer(own_seaweed, got)

    with pytest.raises(StoreError) as err:
        store.fetch(big_crate.id, dest, progress=kill_after_first_bytes)
    _one_line(err.value, "cannot reach")
    assert list(dest.iterdir()) == []

    own_seaweed.start()
    path = open_store(url).fetch(big_crate.id, dest)
    assert file_digest(path) == big_crate.blob
    assert [p.name for p in dest.iterdir()] == [path.name]


def test_presigned_url_fetches_without_credentials(seaweed, s3_env, small_crate, tmp_path):
    url = f"s3://{seaweed.bucket()}/{tmp_path.name}"
    ok(envcrate("push", small_crate.archive, "--store", url, "--json", env=s3_env))
    signed = ok(
        envcrate("url", small_crate.id, "--store", url, "--expires", "600", "--json", env=s3_env)
    )
    assert signed["blob"] == small_crate.blob and signed["url"].startswith("http")
    with urllib.request.urlopen(signed["url"]) as resp:  # no credentials involved
        assert resp.read() == small_crate.archive.read_bytes()
    plain = envcrate("url", small_crate.id, "--store", url, env=s3_env)
    lines = plain.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("http") and lines[1] == small_crate.blob

    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DigestMismatchError):
        download_url(signed["url"], dest, "x.tar.zst", "sha256:" + "0" * 64)
    assert list(dest.iterdir()) == []
    path = download_url(signed["url"], dest, "x.tar.zst", small_crate.blob)
    assert path.read_bytes() == small_crate.archive.read_bytes()

    fails(
        envcrate("url", small_crate.id, "--store", url, "--expires", "9999999", env=s3_env),
        "7 days",
    )
    fails(envcrate("url", small_crate.id, "--store", str(tmp_path / "fs")), "s3://")


def test_s3_failures_are_one_line_each(seaweed, small_crate, tmp_path):
    bucket_url = f"s3://{seaweed.bucket()}/{tmp_path.name}"
    fails(
        envcrate("ls", "--store", bucket_url, env=seaweed.env(AWS_SECRET_ACCESS_KEY="wrong")),
        "rejected the credentials",
    )
    no_creds = {
        k: v
        for k, v in seaweed.env().items()
        if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    fails(envcrate("ls", "--store", bucket_url, env=no_creds), "no AWS credentials")
    dead = f"http://127.0.0.1:{free_port()}"
    fails(
        envcrate(
            "ls",
            "--store",
            bucket_url,
            env=seaweed.env(AWS_ENDPOINT_URL=dead, ENVCRATE_NETWORK_DEADLINE="2"),
        ),
        "cannot reach",
        dead,
        "ENVCRATE_NETWORK_DEADLINE",
    )
    fails(
        envcrate("ls", "--store", "s3://no-such-bucket-here/x", env=seaweed.env()),
        "does not exist",
        "no-such-bucket-here",
    )
    reader = seaweed.env(AWS_ACCESS_KEY_ID=READER_KEY, AWS_SECRET_ACCESS_KEY=READER_SECRET)
    fails(envcrate("push", small_crate.archive, "--store", bucket_url, env=reader), "access denied")
    # The refused push left nothing under the prefix, and the refusal was the
    # write's: the same credentials may list the store.
    listed = seaweed.client().list_objects_v2(Bucket=seaweed.bucket(), Prefix=tmp_path.name)
    assert listed.get("Contents", []) == []
    assert ok(envcrate("ls", "--store", bucket_url, "--json", env=reader))["crates"] == []
    fails(envcrate("ls", "--store", "s3://"), "names no bucket")


def test_unwritable_store_directory(small_crate, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o555)
    cmd = [
        sys.executable,
        "-m",
        "envcrate.cli",
        "push",
        str(small_crate.archive),
        "--store",
        str(store),
    ]
    if os.geteuid() == 0:  # root ignores permission bits unless it drops the capability
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        drop = "-dac_override,-dac_read_search"
        cmd = [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True)
    fails(out, "Permission denied", str(store), "write access")
    store.chmod(0o755)
    assert list(store.rglob("*")) == []


def test_group_shared_store_keeps_group_permissions(small_crate, tmp_path):
    store = tmp_path / "shared"
    store.mkdir()
    store.chmod(0o2775)
    ok(envcrate("push", small_crate.archive, "--store", f"file://{store}", "--tag", "t", "--json"))
    blob = store / blob_key(small_crate.blob)
    assert stat.S_IMODE(blob.stat().st_mode) & 0o060 == 0o060
    for d in (store / "blobs", blob.parent, store / "crates", store / "tags"):
        mode = stat.S_IMODE(d.stat().st_mode)
        assert mode & 0o2070 == 0o2070, (d, oct(mode))
    assert (store / record_key(small_crate.id)).stat().st_mode & 0o060 == 0o060
