"""Network faults between envcrate and its stores, injected by a TCP proxy
(servers.FaultProxy) in front of the test HTTP server and SeaweedFS:
connections reset or cut short mid-body, stalled reads, 5xx answers, and
servers that send more than a record says. Downloads resume, requests are
retried with backoff, envcrate gives up with one line at its deadline, and
nothing partial is left or extracted. The settings are short here
(ENVCRATE_NETWORK_TIMEOUT 1 s, ENVCRATE_NETWORK_DEADLINE a few seconds)."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import fails, ok, publish, use_aws_env
from servers import Fault, FaultProxy, HttpServer, free_port

from envcrate.stores import blob_key, file_digest, open_store, record_key

FAST = {"ENVCRATE_NETWORK_TIMEOUT": "1", "ENVCRATE_NETWORK_DEADLINE": "6"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ENVCRATE_"))}
    env.update(FAST, **extra)
    return env


def _cli(*args, env=None):
    from conftest import envcrate

    return envcrate(*args, env=env or _env())


def _nothing_left(cache) -> None:
    """No cache entry and no partial download."""
    for d in ("e", "dl"):
        left = [n for n in os.listdir(cache / d)] if (cache / d).is_dir() else []
        assert left == [], (d, left)


@pytest.fixture
def served(small_crate, tmp_path):
    """The small crate in a directory store, served over HTTP behind a proxy."""
    root = tmp_path / "store"
    publish(small_crate, root, tag="small")
    server = HttpServer(root)
    proxy = FaultProxy(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    yield root, proxy
    proxy.stop()
    server.stop()


def _ranges(proxy: FaultProxy) -> list[str]:
    return [r for r in proxy.requests if "/blobs/" in r and r.startswith("GET")]


@pytest.mark.parametrize("kind", ["reset", "truncate", "stall"])
@pytest.mark.parametrize("via", ["store", "url"])
def test_http_download_resumes_where_the_connection_was_lost(
    served, small_crate, tmp_path, kind, via
):
    root, proxy = served
    half = small_crate.size // 2
    proxy.add(Fault(kind, match="GET /blobs/", after=half))
    cache = tmp_path / "cache"
    if via == "store":
        args = ["ensure", "small", "--store", proxy.url]
    else:
        args = ["ensure", f"{proxy.url}/{blob_key(small_crate.blob)}", "--sha256", small_crate.blob]
    start = time.monotonic()
    done = ok(_cli(*args, "--cache", cache, "--json"))
    assert done["id"] == small_crate.id
    assert time.monotonic() - start < 15
    gets = _ranges(proxy)
    assert len(gets) == 2 and "Range" not in gets[0], gets
    resumed = int(gets[1].rsplit("Range: bytes=", 1)[1].rstrip("-"))
    # A reset discards what the client's kernel had not handed over yet.
    assert resumed == half if kind != "reset" else 0 < resumed <= half, gets
    assert os.listdir(cache / "dl") == []


def test_http_5xx_answers_are_retried(served, small_crate, tmp_path):
    root, proxy = served
    proxy.add(Fault("status", status=503, match="GET /tags/", times=2))
    proxy.add(Fault("status", status=500, match="GET /crates/", times=1))
    proxy.add(Fault("status", status=503, match="GET /blobs/", times=2))
    cache = tmp_path / "cache"
    done = ok(_cli("ensure", "small", "--store", proxy.url, "--cache", cache, "--json"))
    assert done["id"] == small_crate.id
    assert [f.hits for f in proxy.faults] == [2, 1, 2]


def test_http_store_failures_through_the_cli(served, small_crate, tmp_path):
    root, proxy = served
    cache = tmp_path / "cache"
    ensure = ["ensure", small_crate.id, "--store", proxy.url, "--cache", cache]

    proxy.add(Fault("status", status=403, match="GET /blobs/"))
    fails(_cli(*ensure), "HTTP 403", "blobs/")
    _nothing_left(cache)

    proxy.clear()
    proxy.add(Fault("status", status=500, match="GET /blobs/", times=1000))
    start = time.monotonic()
    fails(_cli(*ensure), "HTTP 500", "ENVCRATE_NETWORK_DEADLINE")
    assert time.monotonic() - start < 15
    _nothing_left(cache)

    proxy.clear()
    proxy.add(Fault("truncate", match="GET /blobs/", after=1000, times=1000))
    fails(_cli(*ensure), "lost the connection", "ENVCRATE_NETWORK_DEADLINE")
    _nothing_left(cache)

    proxy.clear()
    proxy.add(Fault("stall", match="GET /blobs/", after=1000, times=1000))
    start = time.monotonic()
    fails(_cli(*ensure), "ENVCRATE_NETWORK_DEADLINE")
    assert time.monotonic() - start < 15
    _nothing_left(cache)

    dead = f"http://127.0.0.1:{free_port()}"
    fails(_cli("ensure", small_crate.id, "--store", dead, "--cache", cache), "cannot reach", dead)
    fails(_cli("info", "small", "--store", dead), "cannot reach", dead)
    _nothing_left(cache)

    proxy.clear()  # and the store still works
    assert ok(_cli(*ensure, "--json"))["id"] == small_crate.id


def test_a_download_stops_at_the_size_its_record_says(served, small_crate, tmp_path):
    root, proxy = served
    record = json.loads((root / record_key(small_crate.id)).read_bytes())
    record["archives"][0]["size"] = small_crate.size // 2
    (root / record_key(small_crate.id)).write_text(json.dumps(record))
    cache = tmp_path / "cache"
    fails(_cli("ensure", small_crate.id, "--store", proxy.url, "--cache", cache), "larger than")
    _nothing_left(cache)
    dest = tmp_path / "dest"
    dest.mkdir()
    for url in (str(root), proxy.url):
        with pytest.raises(Exception, match="larger than"):
            open_store(url).fetch(small_crate.id, dest)
    assert list(dest.iterdir()) == []


# --------------------------------------------------------------------------- S3


@pytest.fixture
def s3_proxy(seaweed, small_crate, tmp_path, monkeypatch):
    """The small crate in S3, and this process's AWS endpoint a proxy in front of it."""
    prefix = tmp_path.name
    url = f"s3://{seaweed.bucket()}/{prefix}"
    use_aws_env(monkeypatch, seaweed.env())
    publish(small_crate, url)
    proxy = FaultProxy(("127.0.0.1", int(seaweed.endpoint.rsplit(":", 1)[1])))
    env = use_aws_env(monkeypatch, seaweed.env(AWS_ENDPOINT_URL=proxy.url))
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    yield url, proxy, dict(env, **FAST)
    proxy.stop()


def _blob_get(url: str) -> str:
    bucket_and_prefix = url[len("s3://") :]
    return f"GET /{bucket_and_prefix}/blobs/"


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_s3_download_cut_mid_body_is_retried(s3_proxy, small_crate, tmp_path, kind):
    """s3transfer retries a part whose stream breaks, from the part's first byte
    (this passed before envcrate's own retries too)."""
    url, proxy, _ = s3_proxy
    proxy.add(Fault(kind, match=_blob_get(url), after=small_crate.size // 2))
    path = open_store(url).fetch(small_crate.id, tmp_path)
    assert file_digest(path) == small_crate.blob
    assert proxy.faults[0].hits == 1


def test_s3_stalled_download_is_given_up_after_the_timeout_and_retried(
    s3_proxy, small_crate, tmp_path
):
    url, proxy, _ = s3_proxy
    proxy.add(Fault("stall", match=_blob_get(url), after=small_crate.size // 2))
    start = time.monotonic()
    path = open_store(url).fetch(small_crate.id, tmp_path)
    assert file_digest(path) == small_crate.blob
    assert time.monotonic() - start < 10  # ENVCRATE_NETWORK_TIMEOUT=1, not 60 s


def test_s3_push_is_retried_beyond_botocore_attempts(s3_proxy, small_venv, tmp_path):
    url, proxy, env = s3_proxy
    other = f"{url}-push"
    proxy.add(Fault("status", status=503, match="PUT /", times=4))
    # four 503s and their backoff (botocore's, then envcrate's) took over the
    # fast 6 s deadline on a loaded 2-core machine (the full suite, twice): this
    # test is about the retries, so its deadline leaves room for them
    slow = dict(env, ENVCRATE_NETWORK_DEADLINE="30")
    shipped = ok(_cli("ship", small_venv, "--store", other, "--json", env=slow))
    assert shipped["uploaded"] is True and proxy.faults[0].hits == 4
    assert open_store(other).record(shipped["id"]) is not None


def test_s3_push_cut_mid_upload_is_retried(s3_proxy, small_crate, tmp_path):
    """botocore retries a request whose connection is reset while the body
    goes up (this passed before envcrate's own retries too)."""
    url, proxy, env = s3_proxy
    other = f"{url}-cut"
    proxy.add(Fault("reset-request", match="PUT /", after=small_crate.size // 2, times=2))
    pushed = ok(_cli("push", small_crate.archive, "--store", other, "--json", env=env))
    assert pushed["uploaded"] is True and proxy.faults[0].hits == 2
    path = open_store(other).fetch(small_crate.id, tmp_path)
    assert file_digest(path) == small_crate.blob


def test_s3_gives_up_at_the_deadline_and_leaves_nothing(
    s3_proxy, small_crate, small_venv, tmp_path
):
    url, proxy, env = s3_proxy
    proxy.add(Fault("stall", match=_blob_get(url), after=1000, times=1000))
    cache = tmp_path / "cache"
    start = time.monotonic()
    fails(
        _cli("ensure", small_crate.id, "--store", url, "--cache", cache, env=env),
        "ENVCRATE_NETWORK_DEADLINE",
    )
    assert time.monotonic() - start < 20
    _nothing_left(cache)

    # A push that cannot get its blob through publishes no record.
    other = f"{url}-failed"
    proxy.add(Fault("status", status=503, match="PUT /", times=1000))
    fails(_cli("ship", small_venv, "--store", other, env=env), "ENVCRATE_NETWORK_DEADLINE")
    proxy.clear()
    store = open_store(other)
    assert store.crate_ids() == [] and store.walk("") == []


def test_s3_download_stops_at_the_size_its_record_says(s3_proxy, small_crate, tmp_path):
    url, proxy, _ = s3_proxy
    store = open_store(url)
    record = json.loads(store.read(record_key(small_crate.id)))
    record["archives"][0]["size"] = small_crate.size // 2
    store.write(record_key(small_crate.id), json.dumps(record).encode())
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(Exception, match="larger than"):
        store.fetch(small_crate.id, dest)
    assert list(dest.iterdir()) == []
    assert not [r for r in proxy.requests if r.startswith(_blob_get(url))]  # refused unread
