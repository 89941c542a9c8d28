"""Reports: events sent by many processes (directory and S3 sinks, Python 3
and the nodes' Python 3.6) and read back as rows, totals, the ``report``
command's table and JSON, ``--follow``, and hostile report directories."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, envcrate, run
from servers import wait_for

from envcrate.node.report import (
    MAX_OBJECT,
    ReportSink,
    object_name,
    parse_name,
    read_report,
    totals,
)

CRATE = "sha256:" + "0123456789abcdef" * 4
SRC = str(ROOT / "src")

# A process on a node: its events, as Events.emit writes them, sent through
# ReportSink. The plan is a list of {"state", "at" (seconds after the start),
# other fields}; it waits for stdin to close first, so a test can start many
# at once. Python 3.6 runs it too.
SINK = r"""
import json, os, sys, time
from envcrate.node.report import ReportSink

url, plan = sys.argv[1], json.loads(sys.argv[2])
sys.stdin.read()
sink = ReportSink(url)
t0 = time.time()
for step in plan:
    at = step.pop("at", 0)
    record = {"ts": t0 + at, "host": os.uname().nodename, "pid": os.getpid(),
              "crate": step.pop("crate", None), "seconds": at}
    record.update(step)
    sink.send((json.dumps(record, sort_keys=True) + "\n").encode())
print(sink.name)
"""

HIT = [{"state": "RESOLVING", "ref": "small"}, {"state": "HIT", "at": 0.01, "crate": CRATE}]
FILLED = [
    {"state": "RESOLVING", "ref": "small"},
    {"state": "DOWNLOADING", "at": 1, "crate": CRATE, "url": "https://h/b"},
    {"state": "EXTRACTING", "at": 3.5, "crate": CRATE},
    {"state": "VERIFYING", "at": 4, "crate": CRATE},
    {"state": "RELOCATING", "at": 4.25, "crate": CRATE},
    {"state": "READY", "at": 5, "crate": CRATE, "prefix": "/cache/e/x"},
]
WAITED = [
    {"state": "RESOLVING", "ref": "small"},
    {"state": "WAITING", "at": 0.5, "crate": CRATE, "holder": {"host": "n1", "pid": 7}},
    {"state": "READY", "at": 2, "crate": CRATE, "prefix": "/cache/e/x"},
]
FAILED = [
    {"state": "RESOLVING", "ref": "small"},
    {"state": "DOWNLOADING", "at": 1, "crate": CRATE},
    {"state": "FAILED", "at": 2, "crate": CRATE, "error": "digest mismatch; try again"},
]
RUNNING = [{"state": "RESOLVING", "ref": "small"}, {"state": "DOWNLOADING", "at": 1}]


def start_sinks(url, plans, env=None, python=sys.executable) -> list[subprocess.Popen]:
    env = dict(env if env is not None else os.environ, PYTHONPATH=SRC)
    procs = [
        subprocess.Popen(
            [python, "-c", SINK, str(url), json.dumps(plan)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for plan in plans
    ]
    return procs


def finish(procs) -> list[tuple[int, str]]:
    """Let them all go at once; their (pid, object name), checked clean."""
    for p in procs:
        p.stdin.close()
        p.stdin = None  # communicate() would flush it
    done = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert err == "", err
        done.append((p.pid, out.strip()))
    return done


def sinks(url, plans, **kw) -> list[tuple[int, str]]:
    return finish(start_sinks(url, plans, **kw))


def write_object(d: Path, host: str, pid: int, start: int, lines) -> Path:
    """An object as a node would have written it (its name is the format)."""
    d.mkdir(parents=True, exist_ok=True)
    body = b"".join(
        line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode() for line in lines
    )
    path = d / f"{host}.{pid}.{start}.jsonl"
    path.write_bytes(body)
    return path


def events(plan, host: str, pid: int, t0: float = 1.7e9) -> list[dict]:
    out = []
    for step in plan:
        step = dict(step)
        at = step.pop("at", 0)
        out.append(dict(step, ts=t0 + at, host=host, pid=pid, seconds=at, crate=step.get("crate")))
    return out


@pytest.fixture(scope="session")
def py36() -> str:
    if shutil.which("pyenv") is None:
        pytest.skip("pyenv is not installed (it provides Python 3.6.15)")
    out = run(["pyenv", "prefix", "3.6.15"])
    python = Path(out.stdout.strip()) / "bin" / "python"
    if out.returncode != 0 or not python.exists():
        pytest.skip("pyenv has no Python 3.6.15")
    return str(python)


# --------------------------------------------------------------------------- names


def test_object_names():
    name = object_name()
    host, pid, start = parse_name(name)
    assert host == os.uname().nodename.replace("/", "_") and pid == os.getpid()
    assert abs(start / 1e9 - time.time()) < 60
    assert parse_name(object_name())[2] > start  # distinct however quick
    assert parse_name(object_name("a/b.example.org", 12, 34)) == ("a_b.example.org", 12, 34)
    for bad in ("x.jsonl", "h.1.jsonl", "h.x.2.jsonl", "h.1.2.json", ".1.2.jsonl", "h.1.²2.jsonl"):
        assert parse_name(bad) is None, bad


# --------------------------------------------------------------------------- directories


def test_many_processes_at_once_into_a_new_directory(tmp_path):
    report = tmp_path / "not" / "yet"  # made by the first of them (all race to)
    plan = [{"state": "RESOLVING"}]
    plan += [{"state": "VERIFYING", "at": i / 1000, "crate": CRATE} for i in range(200)]
    plan += [{"state": "READY", "at": 1, "crate": CRATE, "prefix": "/c"}]
    done = sinks(report, [plan] * 8)
    assert sorted(p.name for p in report.iterdir()) == sorted(name for _, name in done)
    for pid, name in done:
        lines = (report / name).read_bytes().split(b"\n")
        assert lines[-1] == b"" and len(lines) == 203
        assert {json.loads(line)["pid"] for line in lines[:-1]} == {pid}
    rows = read_report(str(report))
    assert sorted(r["pid"] for r in rows) == sorted(pid for pid, _ in done)
    assert all(r["outcome"] == "READY" and r["events"] == 202 for r in rows)
    assert totals(rows) == {
        "processes": 8,
        "hosts": 1,
        "HIT": 0,
        "READY": 8,
        "WAITED": 0,
        "FAILED": 0,
        "running": 0,
        "unreadable": 0,
        "skipped": 0,
    }


def test_rows_and_totals(tmp_path):
    plans = {"hit": HIT, "filled": FILLED, "waited": WAITED, "failed": FAILED, "running": RUNNING}
    done = dict(zip(plans, sinks(tmp_path / "r", list(plans.values()))))
    rows = {r["pid"]: r for r in read_report(f"file://{tmp_path / 'r'}")}
    row = {what: rows[pid] for what, (pid, _) in done.items()}
    assert {w: r["outcome"] for w, r in row.items()} == {
        "hit": "HIT",
        "filled": "READY",
        "waited": "WAITED",
        "failed": "FAILED",
        "running": "running",
    }
    f = row["filled"]
    assert (f["crate"], f["ref"], f["prefix"], f["source"]) == (
        CRATE,
        "small",
        "/cache/e/x",
        "https://h/b",
    )
    assert f["downloading"] == pytest.approx(2.5, abs=1e-4)
    assert f["extracting"] == pytest.approx(0.5, abs=1e-4)
    assert f["relocating"] == pytest.approx(0.75, abs=1e-4)
    assert f["seconds"] == 5 and f["state"] == "READY" and f["error"] is None
    assert row["failed"]["error"] == "digest mismatch; try again"
    assert row["failed"]["downloading"] == pytest.approx(1.0, abs=1e-4)
    assert row["running"]["state"] == "DOWNLOADING" and row["running"]["downloading"] is None
    assert row["hit"]["downloading"] is None and row["hit"]["prefix"] is None
    assert row["waited"]["state"] == "READY"
    t = totals(list(rows.values()))
    assert [t[k] for k in ("processes", "HIT", "READY", "WAITED", "FAILED", "running")] == [
        5,
        1,
        1,
        1,
        1,
        1,
    ]


def test_waiting_then_filling_itself_is_ready(tmp_path):
    # the holder died: this process took the lock and filled the entry itself
    plan = [{"state": "RESOLVING"}, {"state": "WAITING", "at": 1}]
    plan += [{"state": "DOWNLOADING", "at": 2}, {"state": "EXTRACTING", "at": 3}]
    plan += [{"state": "READY", "at": 4}]
    write_object(tmp_path, "n1", 1, 1, events(plan, "n1", 1))
    (row,) = read_report(str(tmp_path))
    assert row["outcome"] == "READY"


def test_directory_file_modes(tmp_path):
    private, shared = tmp_path / "private", tmp_path / "shared"
    private.mkdir()
    shared.mkdir()
    shared.chmod(0o2770)
    old = os.umask(0o077)
    try:
        for d in (private, shared):
            sink = ReportSink(d)
            sink.send(b'{"ts": 1, "state": "RESOLVING"}\n')
            sink.send(b'{"ts": 2, "state": "HIT"}\n')
            assert not sink.failed
    finally:
        os.umask(old)
    (p,), (s,) = list(private.iterdir()), list(shared.iterdir())
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(s.stat().st_mode) == 0o640  # the group of a shared report reads it


# --------------------------------------------------------------------------- the command


def fleet(d: Path) -> dict[str, int]:
    """Five processes on two hosts, written as the format says."""
    pids = {}
    for what, host, pid, start, plan in (
        ("b-filled", "node-b", 300, 2000, FILLED),
        ("a-waited", "node-a", 200, 3000, WAITED),
        ("a-hit", "node-a", 100, 1000, HIT),
        ("b-failed", "node-b", 400, 1500, FAILED),
        ("a-running", "node-a", 500, 5000, RUNNING),
    ):
        write_object(d, host, pid, start, events(plan, host, pid))
        pids[what] = pid
    return pids


def test_cli_table_json_and_exit_status(tmp_path, env):
    d = tmp_path / "report"
    fleet(d)
    out = envcrate("report", d, env=env)
    assert out.returncode == 1, out.stderr  # a script can test for a FAILED process
    err = out.stderr.strip()
    assert err.startswith("envcrate: error: 1 of 5 processes FAILED") and "\n" not in err
    assert "node-b pid 400: digest mismatch" in err
    lines = out.stdout.splitlines()
    assert lines[0].split() == "HOST PID CRATE STATE DOWNLOAD EXTRACT RELOCATE TOTAL ERROR".split()
    table = [line.split(None, 8) for line in lines[1:6]]
    # by host, then by start
    assert [(r[0], r[1]) for r in table] == [
        ("node-a", "100"),
        ("node-a", "200"),
        ("node-a", "500"),
        ("node-b", "400"),
        ("node-b", "300"),
    ]
    assert table[0][1:] == ["100", "0123456789ab", "HIT", "-", "-", "-", "0.0s"]
    assert table[1][3] == "WAITED" and table[2][3] == "DOWNLOADING"
    assert table[3][3:] == ["FAILED", "1.0s", "-", "-", "2.0s", "digest mismatch; try again"]
    assert table[4][3:] == ["READY", "2.5s", "0.5s", "0.8s", "5.0s"]
    assert lines[6] == "5 processes on 2 hosts: 1 HIT, 1 READY, 1 WAITED, 1 FAILED, 1 running"
    assert len(lines) == 7

    out = envcrate("report", d, "--json", env=env)
    assert out.returncode == 1
    obj = json.loads(out.stdout)
    assert set(obj) == {"processes", "totals"}
    assert [p["pid"] for p in obj["processes"]] == [100, 200, 500, 400, 300]
    assert obj["totals"]["FAILED"] == 1 and obj["totals"]["hosts"] == 2
    filled = obj["processes"][-1]
    assert filled["extracting"] == pytest.approx(0.5) and filled["crate"] == CRATE

    next(d.glob("node-b.400.*")).unlink()  # no FAILED one left: success
    out = envcrate("report", d, env=env)
    assert out.returncode == 0, out.stderr
    assert "ERROR" not in out.stdout.splitlines()[0]
    assert out.stdout.splitlines()[-1].endswith("1 HIT, 1 READY, 1 WAITED, 0 FAILED, 1 running")


def test_cli_from_real_sinks(tmp_path, env):
    d = tmp_path / "r"
    sinks(d, [FILLED, HIT])
    out = envcrate("report", f"file://{d}", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == (
        "2 processes on 1 host: 1 HIT, 1 READY, 0 WAITED, 0 FAILED, 0 running"
    )


def test_cli_nothing_there(tmp_path, env):
    (tmp_path / "empty").mkdir()
    out = envcrate("report", tmp_path / "empty", env=env)
    assert out.returncode == 0 and out.stdout.strip() == f"no events at {tmp_path / 'empty'} yet"
    out = envcrate("report", tmp_path / "empty", "--json", env=env)
    assert json.loads(out.stdout)["processes"] == []
    for missing in (tmp_path / "missing", f"file://{tmp_path}/missing"):
        out = envcrate("report", missing, env=env)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith(f"envcrate: error: no report at {missing}: no such directory")
    (tmp_path / "file").write_text("x")
    out = envcrate("report", tmp_path / "file", env=env)
    assert out.returncode == 1 and "not a directory" in out.stderr
    out = envcrate("report", "https://example.org/r", env=env)
    assert out.returncode == 1 and "s3://" in out.stderr and "Traceback" not in out.stderr
    out = envcrate("report", tmp_path, "--follow", "--interval", "0", env=env)
    assert out.returncode == 2 and "above 0" in out.stderr


# --------------------------------------------------------------------------- hostile input


def test_hostile_report_directory(tmp_path, env):
    d = tmp_path / "report"
    good = events(FILLED, "good", 1)
    garbage = [
        b"not json\n",
        b"[1, 2]\n",
        b'"a string"\n',
        b"3\n",
        b"null\n",
        b'{"state": "READY"}\n',  # no ts
        b'{"ts": "1", "state": "READY"}\n',
        b'{"ts": true, "state": "READY"}\n',
        b'{"ts": NaN, "state": "READY"}\n',
        b'{"ts": 1e400, "state": "READY"}\n',
        b'{"ts": 1, "state": "EXPLODED"}\n',
        b'{"ts": 1, "state": ["READY"]}\n',
        b"\xff\xfe\xfd\n",
        b"[" * 200_000 + b"\n",
        b"{" * 100 + b"\n",
        b"   \n",  # blank: not counted
    ]
    # wrong types in an event: the event counts, the bad fields do not
    odd = {"ts": good[-1]["ts"] + 1, "state": "READY", "crate": 5, "error": ["x"], "seconds": "9"}
    write_object(d, "good", 1, 100, good[:3] + garbage + good[3:] + [odd])
    big = write_object(d, "big", 2, 200, events(HIT, "big", 2))
    with big.open("ab") as f:  # then 20 MiB of one line: only 16 MiB are read
        f.write(b"x" * (20 << 20))
    outside = write_object(tmp_path / "elsewhere", "evil", 4, 400, events(FAILED, "evil", 4))
    (d / "passwd.3.300.jsonl").symlink_to("/etc/passwd")
    (d / "evil.4.400.jsonl").symlink_to(outside)
    os.mkfifo(d / "fifo.5.500.jsonl")  # opening it plainly would wait for a writer
    (d / "sub.6.600.jsonl").mkdir()
    (d / "README.txt").write_text("not ours\n")
    (d / "empty.7.700.jsonl").write_bytes(b"")
    (d / "junk.8.800.jsonl").write_bytes(b"\x00\x01garbage\n" * 10)
    shown = events(FAILED, "esc", 9)
    shown[-1]["error"] = "bad \x1b[2J\x1b]0;owned\x07 thing\nsecond line"
    write_object(d, "esc\x1b[31m", 9, 900, shown)

    rows = read_report(str(d))
    assert [r["host"] for r in rows] == ["big", "esc\x1b[31m", "good"]
    by = {r["host"]: r for r in rows}
    assert by["good"]["unreadable"] == 15 and by["good"]["outcome"] == "READY"
    assert by["good"]["events"] == len(good) + 1 and by["good"]["seconds"] == 5
    assert by["good"]["error"] is None and by["good"]["crate"] == CRATE
    assert by["big"]["outcome"] == "HIT" and by["big"]["unreadable"] == 1
    assert MAX_OBJECT < 20 << 20

    out = envcrate("report", d, env=env, timeout=60)
    assert out.returncode == 1, out.stderr  # the esc one FAILED
    assert "Traceback" not in out.stderr and "\x1b" not in out.stdout + out.stderr
    assert "evil" not in out.stdout and "root" not in out.stdout
    assert "bad ?[2J?]0;owned? thing?second line" in out.stdout
    assert out.stdout.splitlines()[-2] == (
        "3 processes on 3 hosts: 1 HIT, 1 READY, 0 WAITED, 1 FAILED, 0 running"
    )
    # symlinks, the FIFO, the directory, README, the empty and the junk file
    assert out.stdout.splitlines()[-1] == (
        "(skipped 16 unreadable lines and 7 objects that are not event files)"
    )
    obj = json.loads(envcrate("report", d, "--json", env=env, timeout=60).stdout)
    assert obj["totals"]["skipped"] == 7 and obj["totals"]["unreadable"] == 16


# --------------------------------------------------------------------------- --follow


class Output:
    """What a process writes to ``stream``, collected by a thread."""

    def __init__(self, stream):
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.text += line

    def wait(self, needle: str, what: str) -> None:
        wait_for(lambda: needle in self.text, 60, f"{what}: {needle!r} not shown")


def send(sink: ReportSink, state: str, t0: float, at: float, **fields) -> None:
    record = dict(fields, ts=t0 + at, host="here", pid=os.getpid(), state=state, seconds=at)
    sink.send((json.dumps(record) + "\n").encode())


def test_follow_prints_changes_until_interrupted(tmp_path, env):
    d = tmp_path / "report"  # does not exist yet: --follow waits for it
    proc = subprocess.Popen(
        [sys.executable, "-m", "envcrate.cli", "report", str(d), "--follow", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out = Output(proc.stdout)
        out.wait(f"no events at {d} yet (no such directory)", "a missing directory")
        sink, t0 = ReportSink(d), time.time()
        send(sink, "RESOLVING", t0, 0, ref="small")
        out.wait("0 HIT, 0 READY, 0 WAITED, 0 FAILED, 1 running", "the first event")
        send(sink, "DOWNLOADING", t0, 1, crate=CRATE)
        out.wait(" DOWNLOADING ", "the download")
        send(sink, "EXTRACTING", t0, 3, crate=CRATE)
        send(sink, "READY", t0, 4, crate=CRATE, prefix="/c/e/x")
        out.wait("1 READY", "the end")
        time.sleep(0.5)  # ten more reads: an unchanged report is not printed again
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and err == "", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out._thread.join(10)
    assert out.text.count("no such directory") == 1
    assert out.text.count("processes on") + out.text.count("process on") in (3, 4)
    assert out.text.count("1 READY") == 1
    last = out.text.splitlines()
    assert last[-2].split()[3:] == ["READY", "2.0s", "1.0s", "-", "4.0s"]


def test_follow_on_a_terminal_redraws(tmp_path, env):
    d = tmp_path / "report"
    write_object(d, "n1", 1, 1, events(HIT, "n1", 1))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "envcrate.cli", "report", str(d), "--follow", "--interval", "0.05"],
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while seen.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                seen += os.read(master, 65536)
        assert seen.count(b"\x1b[H\x1b[2J") >= 3, seen  # redrawn, changed or not
        assert b"1 process on 1 host: 1 HIT" in seen and b"Ctrl-C to stop" in seen
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# --------------------------------------------------------------------------- failures


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failing_sinks_warn_once_and_go_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    (tmp_path / "file").write_text("")
    for url in ("s3://bucket/reports", str(tmp_path / "file" / "under-a-file"), "https://x/r"):
        sink = ReportSink(url)
        for _ in range(3):
            sink.send(b'{"ts": 1, "state": "RESOLVING"}\n')
        assert sink.failed
        err = capsys.readouterr().err
        assert err.startswith(f"envcrate: warning: cannot send events to {url}: ")
        assert err.count("\n") == 1, err
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    ReportSink("s3://bucket/r").send(b"{}\n")
    assert "no AWS credentials" in capsys.readouterr().err


# --------------------------------------------------------------------------- S3


@pytest.fixture(params=["python3", "python3.6"])
def python(request):
    return sys.executable if request.param == "python3" else request.getfixturevalue("py36")


def test_s3_sink_and_reader(seaweed, s3_env, tmp_path, env, python):
    from envcrate.stores import open_store

    url = f"s3://{seaweed.bucket()}/{tmp_path.name}/report"
    done = dict(
        zip(
            ("filled", "failed", "hit"),
            sinks(url, [FILLED, FAILED, HIT], env=s3_env, python=python),
        )
    )
    # Each object is all of its process's lines (PUT whole after every event).
    client = seaweed.client()
    for pid, name in done.values():
        key = f"{tmp_path.name}/report/{name}"
        body = client.get_object(Bucket=seaweed.bucket(), Key=key)["Body"].read()
        lines = body.decode().splitlines()
        assert body.endswith(b"\n") and {json.loads(line)["pid"] for line in lines} == {pid}
    rows = {r["pid"]: r for r in read_report(url, open_store(url))}
    outcome = {what: rows[pid]["outcome"] for what, (pid, _) in done.items()}
    assert outcome == {"filled": "READY", "failed": "FAILED", "hit": "HIT"}
    assert rows[done["filled"][0]]["downloading"] == pytest.approx(2.5, abs=1e-4)

    out = envcrate("report", url, "--json", env=s3_env)
    assert out.returncode == 1, out.stderr
    obj = json.loads(out.stdout)
    assert obj["totals"]["processes"] == 3 and obj["totals"]["FAILED"] == 1
    assert obj["totals"]["skipped"] == 0
    out = envcrate("report", url, env=s3_env)
    assert out.stdout.splitlines()[-1] == (
        "3 processes on 1 host: 1 HIT, 1 READY, 0 WAITED, 1 FAILED, 0 running"
    )


def test_s3_sink_rejected_credentials(seaweed, tmp_path, python):
    url = f"s3://{seaweed.bucket()}/{tmp_path.name}/report"
    env = seaweed.env(AWS_SECRET_ACCESS_KEY="wrong")
    procs = start_sinks(url, [FILLED], env=env, python=python)
    procs[0].stdin.close()
    procs[0].stdin = None
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 0  # the work goes on
    assert err.count("\n") == 1 and err.startswith(
        f"envcrate: warning: cannot send events to {url}: HTTP 403"
    )
    listing = seaweed.client().list_objects_v2(Bucket=seaweed.bucket(), Prefix=tmp_path.name)
    assert listing.get("KeyCount", 0) == 0


def test_s3_follow_reads_only_what_changed(seaweed, s3_env, tmp_path):
    from envcrate.node.report import Reader
    from envcrate.stores import open_store

    url = f"s3://{seaweed.bucket()}/{tmp_path.name}"
    store = open_store(url)
    reads = []
    real = store.read
    store.read = lambda key, limit=None: reads.append(key) or real(key, limit)
    reader = Reader(url, store)
    assert reader.read() == []
    sinks(url, [HIT, WAITED], env=s3_env)
    assert len(reader.read()) == 2 and len(reads) == 2
    assert len(reader.read()) == 2 and len(reads) == 2  # unchanged: not read again
    seaweed.client().put_object(Bucket=seaweed.bucket(), Key=f"{tmp_path.name}/x.txt", Body=b"x")
    assert len(reader.read()) == 2 and reader.skipped == 1


# --------------------------------------------------------------------------- Python 3.6


def test_python36_sink_into_a_directory(py36, tmp_path):
    d = tmp_path / "r"
    ((pid, name),) = sinks(d, [FILLED], python=py36)
    (row,) = read_report(str(d))
    assert (row["pid"], row["object"], row["outcome"]) == (pid, name, "READY")
    # the module imports nothing until it sends (a bare node's start-up)
    code = (
        "import sys; before = set(sys.modules); import envcrate.node.report; "
        "new = sorted(set(sys.modules) - before); import json; print(json.dumps(new))"
    )
    for python in (py36, sys.executable):
        out = run([python, "-c", code], env=dict(os.environ, PYTHONPATH=SRC))
        assert out.returncode == 0, out.stderr
        new = json.loads(out.stdout)
        assert all(m.startswith("envcrate") or m == "time" for m in new), new


def test_a_lone_surrogate_in_an_event_prints_without_a_traceback(tmp_path, env):
    """JSON may carry "\\ud800", which no terminal encoding takes."""
    (tmp_path / "r").mkdir()
    line = '{"state":"FAILED","ts":1,"host":"h","pid":1,"crate":null,"error":"\\ud800 boom"}\n'
    (tmp_path / "r" / "h.1.1.jsonl").write_text(line)
    out = envcrate("report", tmp_path / "r", env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "? boom" in out.stdout
