"""ensure, activate, run, leases and gc on real caches, with many processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import check, envcrate, fails, ok, publish, run
from servers import HttpServer, wait_for

from envcrate.stores import blob_key

CLI = [sys.executable, "-m", "envcrate.cli"]


def events_of(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cold_then_warm(shipped, small_crate, tmp_path, env):
    cache, ev = tmp_path / "cache", tmp_path / "ev.jsonl"
    args = ["small", "--store", shipped, "--cache", cache, "--events", ev, "--json"]
    cold = ok(envcrate("ensure", *args, env=env))
    assert cold["state"] == "READY" and cold["id"] == small_crate.id
    prefix = Path(cold["prefix"])
    assert prefix.parent == cache / "e" and len(str(prefix)) - len(str(cache)) == 28
    out = check([prefix / "bin" / "python", "-c", "import six, sys; print(sys.prefix)"])
    assert out.stdout.strip() == str(prefix)
    assert check([prefix / "bin" / "pyflakes", "--version"]).returncode == 0

    warm = ok(envcrate("ensure", *args, env=env))
    assert warm["state"] == "HIT" and warm["prefix"] == cold["prefix"]
    plain = envcrate("ensure", small_crate.id, "--cache", cache, env=env)
    assert plain.returncode == 0 and plain.stdout.splitlines()[-1] == cold["prefix"]

    states = [e["state"] for e in events_of(ev)]
    assert states == [
        "RESOLVING", "DOWNLOADING", "EXTRACTING", "VERIFYING", "RELOCATING", "READY",
        "RESOLVING", "HIT",
    ]  # fmt: skip
    # Once the id is known (from the tag here, given below), every event names the crate.
    named = [e["crate"] for e in events_of(ev) if e["state"] != "RESOLVING"]
    assert named == [small_crate.id] * 6, named
    by_id = tmp_path / "by-id.jsonl"
    again = ["--cache", tmp_path / "other", "--events", by_id, "--store", shipped]
    ok(envcrate("ensure", small_crate.id, *again, "--json", env=env))
    named = [e["crate"] for e in events_of(by_id) if e["state"] != "RESOLVING"]
    assert named == [small_crate.id] * 5, (named, events_of(by_id))
    # Unpacked crates are read-only on disk.
    writable = [
        str(p)
        for p in [prefix, *prefix.rglob("*")]
        if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o222
    ]
    assert writable == []


def test_32_processes_fill_an_empty_cache_once(shipped, small_crate, tmp_path, env):
    cache, ev = tmp_path / "cache", tmp_path / "ev.jsonl"
    procs = [
        subprocess.Popen(
            [
                *CLI,
                "ensure",
                "small",
                "--store",
                shipped,
                "--cache",
                cache,
                "--events",
                ev,
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(32)
    ]
    results = [(p.communicate(timeout=300), p.returncode) for p in procs]
    assert all(rc == 0 for _, rc in results), [err for (_, err), rc in results if rc]
    outs = [json.loads(out) for (out, _), _ in results]
    assert len({o["prefix"] for o in outs}) == 1
    assert sum(o["state"] == "READY" for o in outs) == 1
    assert {o["state"] for o in outs} <= {"READY", "WAITED", "HIT"}
    states = [e["state"] for e in events_of(ev)]
    assert states.count("DOWNLOADING") == 1 and states.count("EXTRACTING") == 1
    assert states.count("FAILED") == 0
    # 32 at once: some waited, each said so once, naming the filler when
    # its holder file was there to read.
    waiting = [e for e in events_of(ev) if e["state"] == "WAITING"]
    assert waiting and len(waiting) == sum(o["state"] == "WAITED" for o in outs)
    assert all(w.get("holder") is None or {"host", "pid"} <= set(w["holder"]) for w in waiting)
    assert [n for n in os.listdir(cache / "e") if n.startswith(".")] == []


@pytest.mark.parametrize("phase", ["DOWNLOADING", "EXTRACTING", "RELOCATING"])
def test_sigkill_at_any_phase_then_ensure_succeeds(phase, shipped, small_crate, tmp_path, env):
    server = HttpServer(shipped)  # a real download (a directory store is read in place)
    try:
        cache, ev = tmp_path / "cache", tmp_path / "ev.jsonl"
        args = ["small", "--store", server.url, "--cache", cache, "--events", ev, "--json"]
        victim = subprocess.Popen(
            [*CLI, "ensure", *args],
            env=dict(env, ENVCRATE_TEST_STOP_AT=phase),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(
                lambda: any(e["state"] == phase for e in events_of(ev)), 60, f"no {phase} event"
            )
            wait_for(lambda: _stopped(victim.pid), 10, "the filler did not stop")
        finally:
            victim.kill()
            victim.wait()
        assert [n for n in os.listdir(cache / "e") if not n.startswith(".")] == []

        again = ok(envcrate("ensure", *args, env=env))
        assert again["state"] == "READY"
        verified = envcrate("verify", small_crate.id, "--cache", cache, "--json", env=env)
        assert json.loads(verified.stdout)["ok"] is True, verified.stdout
        assert [n for n in os.listdir(cache / "e") if n.startswith(".")] == []
        assert os.listdir(cache / "dl") == []
    finally:
        server.stop()


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_corrupted_blob_fails_and_leaves_nothing(shipped, small_crate, tmp_path, env):
    blob = shipped / blob_key(small_crate.blob)
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF  # inside the seek table: extraction itself succeeds
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    cache, ev = tmp_path / "cache", tmp_path / "ev.jsonl"
    out = envcrate("ensure", "small", "--store", shipped, "--cache", cache, "--events", ev, env=env)
    fails(out, "digest")
    assert out.stdout == ""
    assert os.listdir(cache / "e") == []
    failed = [e for e in events_of(ev) if e["state"] == "FAILED"]
    assert len(failed) == 1 and "digest" in failed[0]["error"]


def test_a_blob_altered_where_extraction_never_reads_fails(shipped, small_crate, tmp_path, env):
    """A byte changed in the padding in front of the body: every file comes
    out right, and only the archive's digest tells."""
    import struct

    from envcrate.crate.container import PADDING_MAGIC as _PADDING_MAGIC

    blob = shipped / blob_key(small_crate.blob)
    data = bytearray(blob.read_bytes())
    pad = data.find(struct.pack("<I", _PADDING_MAGIC))
    assert pad > 0 and struct.unpack_from("<I", data, pad + 4)[0] > 64
    data[pad + 64] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    fails(envcrate("ensure", "small", "--store", shipped, "--cache", cache, env=env), "digest")
    assert os.listdir(cache / "e") == []


def test_gc_keeps_what_run_holds(users, user_shipped, small_crate, user_dir, env):
    """As a plain user (root ignores the permission bits that make removing
    a read-only entry hard)."""
    me, shipped = users[0], user_shipped
    cache = me.home / "cache"
    go = user_dir / "go"
    waiter = (
        "import os, sys, time\n"
        "deadline = time.monotonic() + 120\n"
        f"while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "sys.exit(7)\n"
    )
    argv = [
        *CLI,
        "run",
        "small",
        "--store",
        shipped,
        "--cache",
        cache,
        "--",
        "python",
        "-c",
        waiter,
    ]
    held = subprocess.Popen(me.cmd(argv), env=me.env(env))
    try:
        wait_for(lambda: list((cache / "leases").glob("*/*")), 60, "run took no lease")
        report = ok(me.envcrate("gc", "--cache", cache, "--max-size", "0", "--json", env=env))
        assert report["removed"] == [] and len(report["kept"]) == 1
        fails(me.envcrate("rm", small_crate.id, "--cache", cache, env=env), "in use")
        assert ok(me.envcrate("ls", "--cache", cache, "--json", env=env))["crates"][0]["in_use"]
    finally:
        go.touch()
        assert held.wait(timeout=60) == 7  # run passes the status through
    report = ok(me.envcrate("gc", "--cache", cache, "--max-size", "0", "--json", env=env))
    assert [r["id"] for r in report["removed"]] == [small_crate.id]
    assert ok(me.envcrate("ls", "--cache", cache, "--json", env=env))["crates"] == []
    assert os.listdir(cache / "e") == []


def test_gc_by_age_and_size_lru_first(users, small_venv, tmp_path, user_dir, env):
    """As a plain user, who can remove the read-only entries they filled."""
    from conftest import install, make_venv

    from envcrate import pack

    me = users[0]
    store = user_dir / "store"
    cache = me.home / "cache"
    ids = []
    for name in ("one", "two"):
        venv = make_venv(tmp_path / name, ["six"])
        if name == "two":
            install(venv, ["pyflakes"])
        crate = pack(venv, tmp_path)
        ok(envcrate("push", crate.archive, "--store", store, "--json", env=env))
        ok(me.envcrate("ensure", crate.id, "--store", store, "--cache", cache, "--json", env=env))
        ids.append(crate.id)
    # "one" was used long ago, "two" just now.
    old = time.time() - 10 * 86400
    for used in (cache / "used").iterdir():
        if used.name.startswith(ids[0].split(":")[1][:16]):
            os.utime(used, (old, old))
    dry = ok(
        me.envcrate("gc", "--cache", cache, "--unused-for", "7d", "--dry-run", "--json", env=env)
    )
    assert [r["id"] for r in dry["removed"]] == [ids[0]]
    assert len(ok(me.envcrate("ls", "--cache", cache, "--json", env=env))["crates"]) == 2
    sizes = {
        c["id"]: c["size"]
        for c in ok(me.envcrate("ls", "--cache", cache, "--json", env=env))["crates"]
    }
    budget = str(sizes[ids[1]] + 1)
    done = ok(me.envcrate("gc", "--cache", cache, "--max-size", budget, "--json", env=env))
    assert [r["id"] for r in done["removed"]] == [ids[0]] and done["freed"] == sizes[ids[0]]
    left = ok(me.envcrate("ls", "--cache", cache, "--json", env=env))["crates"]
    assert [c["id"] for c in left] == [ids[1]]
    assert len(os.listdir(cache / "e")) == 1  # and no trash


def _shell(name: str) -> str:
    """The path of a shell the test command installs; missing is a failure."""
    import shutil

    found = shutil.which(name)
    assert found, f"{name} is not installed: the README's test command installs zsh, fish and tcsh"
    return found


def test_activate_over_another_active_venv(shipped, small_crate, tmp_path, env):
    other = tmp_path / "other"
    check([sys.executable, "-m", "venv", "--without-pip", other])
    cache = tmp_path / "cache"
    prefix = ok(
        envcrate("ensure", "small", "--store", shipped, "--cache", cache, "--json", env=env)
    )["prefix"]
    # The script sets PYTHONPATH for the env to drop; envcrate itself runs
    # with this test's (a checkout's src/, or none when installed).
    here = os.environ.get("PYTHONPATH")
    pp = f"env PYTHONPATH='{here}'" if here else "env -u PYTHONPATH"
    cli = pp + " " + " ".join(f"'{c}'" for c in CLI)
    script = (
        f'VIRTUAL_ENV={other}; export VIRTUAL_ENV; PATH="{other}/bin:$PATH"; export PATH\n'
        "PYTHONPATH=/nowhere; export PYTHONPATH\n"
        f"out=$({cli} activate small --store {shipped} --cache {cache} --shell SHELL) || exit 9\n"
        'eval "$out"\n'
        'python -c "import six, sys; print(sys.prefix)"\n'
        'echo "VIRTUAL_ENV=$VIRTUAL_ENV PYTHONPATH=${PYTHONPATH-unset}"\n'
    )
    for sh in ("sh", "bash", "dash", "zsh"):
        kind = "sh" if sh == "dash" else sh
        out = run([_shell(sh), "-c", script.replace("SHELL", kind)], env=env)
        assert out.returncode == 0, (sh, out.stderr)
        assert out.stdout.splitlines() == [prefix, f"VIRTUAL_ENV={prefix} PYTHONPATH=unset"], sh
    fish = (
        f"set -gx VIRTUAL_ENV {other}; set -gx PATH {other}/bin $PATH\n"
        f"{cli} activate small --store {shipped} --cache {cache} --shell fish | source\n"
        "or exit 9\n"
        'python -c "import sys; print(sys.prefix)"\n'
    )
    out = run([_shell("fish"), "-c", fish], env=env)
    assert out.returncode == 0 and out.stdout.strip() == prefix, out.stderr
    leases = [p.name for p in (cache / "leases").glob("*/*")]
    # The shells registered themselves (they have exited since) and removed
    # the short-lived lease activate held for each meanwhile.
    assert len(leases) == 5 and not [n for n in leases if ".ttl-" in n], leases

    failing = f'out=$({cli} activate no-such-tag --store {shipped} --cache {cache}) && eval "$out"\necho reached=$?\n'
    out = run(["sh", "-c", failing], env=env)
    assert out.stdout.strip() == "reached=1"
    assert out.stderr.count("envcrate: error:") == 1


def test_deactivate_gives_the_shell_back_and_releases_its_lease(
    shipped, small_crate, tmp_path, env
):
    """After ``eval "$(envcrate activate ...)"``, ``deactivate`` (as in venv
    and conda) restores every variable activation touched to the value the
    shell had, drops the shell's lease (gc may then remove the entry) and
    itself."""
    cache = tmp_path / "cache"
    here = os.environ.get("PYTHONPATH")
    pp = f"env PYTHONPATH='{here}'" if here else "env -u PYTHONPATH"
    cli = pp + " " + " ".join(f"'{c}'" for c in CLI)
    leases = f"ls {cache}/leases/*/ 2>/dev/null | wc -l"
    show = f"env | LC_ALL=C sort | grep -v '^_=\\|^SHLVL=\\|^PWD=\\|^OLDPWD='; {leases}"
    script = (
        "PYTHONPATH=/before; export PYTHONPATH; unset VIRTUAL_ENV\n"
        f"{show}; echo '==='\n"
        f"out=$({cli} activate small --store {shipped} --cache {cache} --shell SHELL) || exit 9\n"
        'eval "$out"\n'
        f'python -c "import six, sys; print(sys.prefix)"; {leases}; echo "==="\n'
        f"deactivate\n{show}; echo '==='\n"
        '[ "$(command -v deactivate)" = deactivate ] && echo still || echo gone\n'
    )
    prefix = None
    for sh in ("sh", "bash", "dash", "zsh"):
        kind = "sh" if sh == "dash" else sh
        out = run([_shell(sh), "-c", script.replace("SHELL", kind)], env=env)
        assert out.returncode == 0, (sh, out.stderr)
        before, inside, after, rest = out.stdout.split("===\n")
        prefix, held = inside.split()
        assert prefix.startswith(str(cache)) and held == "1", (sh, inside)
        assert after == before, (sh, before, after)  # the lease too: 0 before
        assert "PYTHONPATH=/before" in after and "VIRTUAL_ENV" not in after, sh
        assert rest.strip() == "gone", (sh, rest)
    fish = (
        "set -gx PYTHONPATH /before; set -e VIRTUAL_ENV; set -l path (string join : $PATH)\n"
        f"{cli} activate small --store {shipped} --cache {cache} --shell fish | source\n"
        "or exit 9\n"
        'python -c "import sys; print(sys.prefix)"\n'
        "deactivate\n"
        "echo $PYTHONPATH; set -q VIRTUAL_ENV; or echo unset\n"
        'functions -q deactivate; or echo gone; test "$PATH" = "$path"; and echo same\n'
    )
    out = run([_shell("fish"), "-c", fish], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [prefix, "/before", "unset", "gone", "same"]
    assert list((cache / "leases").glob("*/*")) == []
    report = ok(envcrate("gc", "--cache", cache, "--max-size", "0", "--json", env=env))
    assert [r["prefix"] for r in report["removed"]] == [prefix]


def test_archive_file_and_url_refs_are_warm_the_second_time(shipped, small_crate, tmp_path, env):
    cache, ev = tmp_path / "cache", tmp_path / "ev.jsonl"
    by_file = ok(envcrate("ensure", small_crate.archive, "--cache", cache, "--json", env=env))
    assert by_file["state"] == "READY" and by_file["id"] == small_crate.id
    assert (
        ok(envcrate("ensure", small_crate.archive, "--cache", cache, "--json", env=env))["state"]
        == "HIT"
    )

    server = HttpServer(shipped)
    try:
        url = f"{server.url}/{blob_key(small_crate.blob)}"
        cache2 = tmp_path / "cache2"
        fails(envcrate("ensure", url, "--cache", cache2, env=env), "--sha256")
        args = [url, "--sha256", small_crate.blob, "--cache", cache2, "--events", ev, "--json"]
        first = ok(envcrate("ensure", *args, env=env))
        second = ok(envcrate("ensure", *args, env=env))
        assert (first["state"], second["state"]) == ("READY", "HIT")
        assert [e["state"] for e in events_of(ev)].count("DOWNLOADING") == 1
        bad = envcrate("ensure", url, "--sha256", "0" * 64, "--cache", tmp_path / "c3", env=env)
        fails(bad, "digest")
    finally:
        server.stop()


def test_caches_are_searched_in_order(shipped, small_crate, tmp_path, env):
    a, b, c = (tmp_path / n for n in "abc")
    first = ok(
        envcrate(
            "ensure", "small", "--store", shipped, "--cache", a, "--cache", b, "--json", env=env
        )
    )
    assert Path(first["prefix"]).parent.parent == a
    found = ok(envcrate("ensure", small_crate.id, "--cache", c, "--cache", a, "--json", env=env))
    assert found["state"] == "HIT" and found["prefix"] == first["prefix"]
    assert not (c / "e").exists()


def test_a_silent_holder_on_another_host_does_not_block(shipped, small_crate, tmp_path, env):
    """fcntl locks can be node-local on NFS: simulate a lock held here by a
    process whose heartbeat stopped, as a dead holder on another host looks."""
    cache, ev = tmp_path / "cache", tmp_path / "ev.jsonl"
    prefix = ok(
        envcrate(
            "ensure", "small", "--store", shipped, "--cache", tmp_path / "probe", "--json", env=env
        )
    )["prefix"]
    key = Path(prefix).name.split("-")[0]  # the crate's lock: <16 hex of the id>
    (cache / "locks").mkdir(parents=True)
    holder = cache / "locks" / f"{key}.holder"
    holder.write_text("elsewhere\n1\n")
    old = time.time() - 3600
    os.utime(holder, (old, old))
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(300)",
            str(cache / "locks" / f"{key}.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        done = ok(
            envcrate(
                "ensure",
                "small",
                "--store",
                shipped,
                "--cache",
                cache,
                "--events",
                ev,
                "--json",
                env=env,
            )
        )
        assert done["state"] == "READY"
        waiting = [e for e in events_of(ev) if e["state"] == "WAITING"]
        assert waiting and waiting[0]["holder"]["host"] == "elsewhere"
    finally:
        locker.send_signal(signal.SIGKILL)
        locker.wait()


def test_cache_info_verify_and_rm(shipped, small_crate, tmp_path, env):
    cache = tmp_path / "cache"
    prefix = Path(
        ok(envcrate("ensure", "small", "--store", shipped, "--cache", cache, "--json", env=env))[
            "prefix"
        ]
    )
    info = ok(envcrate("info", "small", "--cache", cache, "--json", env=env))
    assert info["id"] == small_crate.id
    listed = ok(envcrate("ls", "--cache", cache, "--json", env=env))["crates"]
    assert listed[0]["tags"] == ["small"] and listed[0]["prefix"] == str(prefix)
    assert ok(envcrate("verify", small_crate.id, "--cache", cache, "--json", env=env))["ok"]
    # Without --cache: the default caches ($ENVCRATE_CACHE here).
    assert ok(
        envcrate("verify", small_crate.id, "--json", env=dict(env, ENVCRATE_CACHE=str(cache)))
    )["ok"]
    fails(envcrate("verify", str(tmp_path / "none.tar.zst"), env=env), "no archive")

    target = next(prefix.glob("lib/python*/site-packages/six.py"))
    target.parent.chmod(0o755)
    target.chmod(0o644)
    target.write_text(target.read_text() + "\n# changed\n")
    (target.parent / "extra.py").write_text("")
    api = next(prefix.glob("lib/python*/site-packages/pyflakes/api.py"))
    api.parent.chmod(0o755)  # read-only: without write permission only root could unlink
    api.unlink()
    out = envcrate("verify", small_crate.id, "--cache", cache, "--json", env=env)
    assert out.returncode == 1
    report = json.loads(out.stdout)["entries"][0]
    assert [p.rsplit("/", 1)[-1] for p in report["modified"]] == ["six.py"]
    assert [p.rsplit("/", 1)[-1] for p in report["missing"]] == ["api.py"]
    assert [p.rsplit("/", 1)[-1] for p in report["extra"]] == ["extra.py"]

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        ok(
            envcrate(
                "ensure",
                "small",
                "--store",
                shipped,
                "--cache",
                cache,
                "--lease",
                str(sleeper.pid),
                "--json",
                env=env,
            )
        )
        fails(envcrate("rm", "small", "--cache", cache, env=env), "in use")
    finally:
        sleeper.kill()
        sleeper.wait()
    ok(envcrate("rm", "small", "--cache", cache, "--json", env=env))
    assert not prefix.exists()
    fails(envcrate("info", "small", "--cache", cache, env=env), "no crate")


def test_gc_cleans_what_killed_processes_left(tmp_path, env):
    cache = tmp_path / "cache"
    old = time.time() - 2 * 3600
    leftovers = [
        cache / "e" / ".0123456789abcdef-00000000.envcrate-abc",
        cache / "dl" / ".ab.vm-999999.part",
        cache / "locks" / "0123456789abcdef.lock",
        cache / "locks" / "0123456789abcdef.holder",
    ]
    fresh = cache / "e" / ".fedcba9876543210-00000000.envcrate-new"  # a fill in progress
    for p in leftovers + [fresh]:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.name.endswith("-abc") or p == fresh:
            (p / "lib").mkdir(parents=True)
            (p / "lib").chmod(0o555)
        else:
            p.write_text("")
    for p in leftovers:
        os.utime(p, (old, old))
    dry = ok(envcrate("gc", "--cache", cache, "--dry-run", "--json", env=env))
    assert sorted(dry["cleaned"]) == sorted(map(str, leftovers))
    assert all(os.path.lexists(p) for p in leftovers)
    done = ok(envcrate("gc", "--cache", cache, "--json", env=env))
    assert sorted(done["cleaned"]) == sorted(map(str, leftovers))
    assert not any(os.path.lexists(p) for p in leftovers)
    assert fresh.is_dir()


def test_ensure_from_s3(seaweed, s3_env, small_crate, tmp_path):
    url = f"s3://{seaweed.bucket()}/{tmp_path.name}"
    ok(
        envcrate(
            "push", small_crate.archive, "--store", url, "--tag", "s3-small", "--json", env=s3_env
        )
    )
    cache, ev = tmp_path / "cache", tmp_path / "ev.jsonl"
    done = ok(
        envcrate(
            "ensure",
            "s3-small",
            "--store",
            url,
            "--cache",
            cache,
            "--events",
            ev,
            "--json",
            env=s3_env,
        )
    )
    assert done["state"] == "READY" and done["id"] == small_crate.id
    assert check([Path(done["prefix"]) / "bin" / "python", "-c", "import six"]).returncode == 0
    assert [e["state"] for e in events_of(ev)].count("DOWNLOADING") == 1
    assert os.listdir(cache / "dl") == []
    again = ok(envcrate("ensure", small_crate.id, "--cache", cache, "--json", env=s3_env))
    assert again["state"] == "HIT"


def test_group_shared_cache(shipped, tmp_path, env):
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o2775)
    prefix = Path(
        ok(envcrate("ensure", "small", "--store", shipped, "--cache", cache, "--json", env=env))[
            "prefix"
        ]
    )
    for d in ("e", "locks", "used", "dl"):
        assert stat.S_IMODE((cache / d).stat().st_mode) & 0o2070 == 0o2070, d
    assert stat.S_IMODE(prefix.stat().st_mode) == 0o555  # readable by the group, writable by none


@pytest.mark.parametrize("where", ["main thread", "other thread"])
def test_waiting_for_the_lock_wakes_when_it_is_released(tmp_path, where):
    """Blocking in the kernel (main thread, SIGALRM free) or polling (any
    other thread): both give up after the period and get the lock once the
    holder lets go, and the main thread's SIGALRM is left as it was."""
    import fcntl
    import threading

    from envcrate.node.lock import _wait_for_lock

    lock = tmp_path / "x.lock"
    lock.touch()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.readline()",
            str(lock),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    fd = os.open(lock, os.O_RDWR)
    try:
        assert holder.stdout.readline().strip() == "locked"
        results = []

        def wait(seconds):
            if where == "main thread":
                return _wait_for_lock(fd, fcntl, seconds)
            t = threading.Thread(target=lambda: results.append(_wait_for_lock(fd, fcntl, seconds)))
            t.start()
            t.join()
            return results.pop()

        assert wait(0.3) is False
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert wait(30) is True
        assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        os.close(fd)
        holder.kill()
        holder.wait()


# ------------------------------------------------- processes, races and full disks


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A crate with numpy (the one large package), whose extraction lasts
    long enough to kill its filler in the middle of it."""
    from conftest import make_venv

    from envcrate import pack

    root = tmp_path_factory.mktemp("big")
    crate = pack(make_venv(root / "numpy", ["numpy"]), root)
    store = root / "store"
    publish(crate, store, tag="big")
    return store


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_killing_only_the_filler_kills_its_writers(big_store, tmp_path, env):
    """SIGKILL to the ensure process alone (not its group) in the middle of
    extracting: its forked writers die with it, even one that is busy (here
    frozen with SIGSTOP: a writer that is not waiting for its next request
    would otherwise go on writing into the fill directory the next filler
    removes, "Directory not empty"), and an immediate retry fills the entry."""
    cache, ev = tmp_path / "cache", tmp_path / "ev.jsonl"
    args = ["big", "--store", big_store, "--cache", cache, "--json"]
    victim = subprocess.Popen(
        [*CLI, "ensure", *args, "--events", ev],
        env=dict(env, ENVCRATE_TEST_STOP_AT="EXTRACTING"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    writers: list[int] = []
    try:
        wait_for(lambda: _stopped(victim.pid), 60, "the filler did not stop at EXTRACTING")
        # Stopped there, it has no writers yet: let it go on until it has
        # forked them, freeze them, and kill it alone.
        os.kill(victim.pid, signal.SIGCONT)
        writers = wait_for(lambda: _children(victim.pid), 30, "the filler forked no writers")
        for w in writers:
            os.kill(w, signal.SIGSTOP)
        victim.kill()
        victim.wait()
        wait_for(lambda: not any(map(_running, writers)), 5, "writers outlived the filler")
        again = ok(envcrate("ensure", *args, env=env))
        assert again["state"] == "READY"
        assert [n for n in os.listdir(cache / "e") if n.startswith(".")] == []
    finally:
        victim.kill()
        victim.wait()
        for w in writers:  # on failure: none is left behind
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_gc_never_removes_an_entry_between_a_hit_and_its_lease(shipped, tmp_path, env):
    """gc --max-size 0 in a loop beside many runs: each run's command finds
    its prefix there (it used to run in a deleted one, 2 runs in 120)."""
    import threading

    cache = tmp_path / "cache"
    args = ["small", "--store", shipped, "--cache", cache]
    ok(envcrate("ensure", *args, "--json", env=env))
    stop = threading.Event()
    gcs = []

    def collect():
        while not stop.is_set():
            gcs.append(envcrate("gc", "--cache", cache, "--max-size", "0", "--json", env=env))

    probe = (
        "import os, sys; sys.exit(0 if os.path.isdir(os.environ['VIRTUAL_ENV'] + '/lib') else 3)"
    )
    failed = []

    def runs(n):
        for _ in range(n):
            out = envcrate("run", *args, "--", "python", "-c", probe, env=env)
            if out.returncode != 0:
                failed.append((out.returncode, out.stderr))

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        workers = [threading.Thread(target=runs, args=(40,)) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=300)
    finally:
        stop.set()
        collector.join(timeout=120)
    assert failed == []
    assert all(g.returncode == 0 for g in gcs), [g.stderr for g in gcs if g.returncode]
    assert sum(len(json.loads(g.stdout)["removed"]) for g in gcs) > 0  # gc did remove meanwhile


def _cache_leftovers(cache: Path, memo: Path) -> list[str]:
    """What is in a cache (and the probe memo) besides ready entries and the
    files that belong to them."""
    keys = (
        {n for n in os.listdir(cache / "e") if not n.startswith(".")}
        if (cache / "e").exists()
        else set()
    )
    odd = []
    for dirpath, dirnames, filenames in os.walk(cache):
        rel = os.path.relpath(dirpath, cache)
        top = rel.split(os.sep)[0]
        if rel == "e":
            dirnames[:] = []
            odd += [f"e/{n}" for n in os.listdir(dirpath) if n not in keys]
            continue
        for name in filenames:
            p = f"{rel}/{name}"
            if top == "locks" and (name.endswith(".lock") or name[: -len(".use")] in keys):
                continue
            if top in ("used", "leases") and (name in keys or rel.split(os.sep)[-1] in keys):
                continue
            if top in ("blobs", "tags") and not name.startswith("."):
                continue
            odd.append(p)
    if memo.is_dir():
        odd += [f"memo/{n}" for n in os.listdir(memo) if len(n) != 16]
    return sorted(odd)


def test_a_full_disk_leaves_nothing_that_gc_does_not_clean(shipped, tmp_path, env):
    """ensure on a small filesystem filled almost full, leaving it more room
    each time: whatever phase the disk fills up in, what is left is what gc
    cleans (once old enough)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", disk]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cache = disk / "cache"
        env = dict(env, XDG_CACHE_HOME=str(disk / "xdg"))  # the probe memo too
        memo = disk / "xdg" / "envcrate" / "pythons"
        args = ["ensure", "small", "--store", shipped, "--cache", cache, "--json"]

        def free() -> int:
            st = os.statvfs(disk)
            return st.f_bavail * st.f_frsize

        before = free()
        ok(envcrate(*args, env=env))
        need = before - free()  # what one fill takes, memo included
        ok(envcrate("gc", "--cache", cache, "--max-size", "0", "--json", env=env))
        # Near the top the disk fills up at the last writes: the ready
        # marker, the blob index (written after the entry is in place).
        rooms = [0, 4096, 8192] + [need * k // 8 for k in range(1, 8)]
        rooms += [need - 4096 * k for k in range(8, -1, -1)]
        outcomes = []
        for room in rooms:
            subprocess.run(["rm", "-rf", str(memo), str(cache / "blobs")], check=True)
            filler = disk / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                os.posix_fallocate(fd, 0, max(free() - room, 1))
            except OSError:
                pass
            finally:
                os.close(fd)
            out = envcrate(*args, env=env)
            outcomes.append(out.returncode)
            if out.returncode:
                fails(out)
            filler.unlink()
            old = time.time() - 2 * 3600  # everything left is abandoned by now
            for dirpath, dirnames, filenames in os.walk(disk):
                for name in dirnames + filenames:
                    os.utime(os.path.join(dirpath, name), (old, old), follow_symlinks=False)
            ok(envcrate("gc", "--cache", cache, "--max-size", "0", "--json", env=env))
            assert _cache_leftovers(cache, memo) == [], (room, out.stderr)
        assert 1 in outcomes and 0 in outcomes, outcomes  # both filled up and fitted
    finally:
        run(["umount", "-l", disk])


def test_activate_covers_the_entry_until_the_shell_leases_it(shipped, small_crate, tmp_path, env):
    """Between activate and the eval of its output, gc keeps the entry (a
    ttl- lease of activate's own); the evaluating shell replaces it by its
    own lease."""
    cache = tmp_path / "cache"
    code = run([*CLI, "activate", "small", "--store", shipped, "--cache", cache], env=env)
    assert code.returncode == 0, code.stderr
    (short,) = (cache / "leases").glob("*/*")
    assert ".ttl-" in short.name
    kept = ok(envcrate("gc", "--cache", cache, "--max-size", "0", "--json", env=env))
    assert kept["removed"] == [] and kept["kept"][0]["leases"] == [short.name]
    out = run(["sh", "-c", code.stdout + 'echo "$$"; ls "$(dirname "$1")"', "sh", short], env=env)
    assert out.returncode == 0, out.stderr
    pid, *names = out.stdout.split()
    assert names == [short.name.replace(short.name.rsplit(".", 1)[1], pid)]
    old = time.time() - 120  # a ttl- lease older than a minute is dead
    code = run([*CLI, "activate", small_crate.id, "--cache", cache], env=env)
    assert code.returncode == 0, code.stderr
    (again,) = [p for p in (cache / "leases").glob("*/*") if ".ttl-" in p.name]
    os.utime(again, (old, old))
    report = ok(envcrate("gc", "--cache", cache, "--max-size", "0", "--json", env=env))
    assert [r["id"] for r in report["removed"]] == [small_crate.id]


def test_remove_tree_walks_a_tree_again_while_it_is_still_written(tmp_path, monkeypatch):
    """A writer that adds a file after the walk: rmtree fails (ENOTEMPTY)
    once, and the tree is walked again."""
    import errno
    import shutil

    from envcrate.fsutil import remove_tree

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub").chmod(0o555)
    real = shutil.rmtree
    calls = []

    def late_writer(path, *a, **kw):
        calls.append(path)
        if len(calls) == 1:
            os.chmod(tree / "sub", 0o755)
            (tree / "sub" / "late").write_text("")  # written as the walk ends
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(tree / "sub"))
        return real(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", late_writer)
    remove_tree(tree)
    assert not tree.exists() and len(calls) == 2
