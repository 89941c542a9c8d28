"""The cache as plain users see it: private caches, group-shared ones under
umask 022, 002 and 000, read-only ones (root ignores permission bits, so
these tests run the command line as the users of conftest's ``users``)."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GROUP, envcrate, fails, ok, publish, run


@pytest.fixture
def shipped(user_shipped):
    return user_shipped


@pytest.fixture
def env(user_dir) -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("ENVCRATE_", "AWS_"))}


def shared_cache(path: Path, env: dict) -> Path:
    """A project cache as its administrator (root here) sets it up: group
    GROUP, group-writable, set-group-id, and its directories made by
    ``envcrate gc`` as its owner (the owner of a sticky directory could
    remove what members put in it)."""
    path.mkdir()
    os.chown(path, 0, grp.getgrnam(GROUP).gr_gid)
    path.chmod(0o2775)
    ok(envcrate("gc", "--cache", path, "--json", env=env))
    assert (path / "e").stat().st_uid == 0
    return path


def succeeds(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, (out.args[-6:], out.stdout, out.stderr)
    return out


def world_writable(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & stat.S_IWOTH:
                found.append(f"{p} {stat.filemode(st.st_mode)}")
    return found


def test_the_owner_can_gc_and_rm_their_entries(users, shipped, small_crate, user_dir, env):
    me = users[0]
    cache = me.home / f"cache-{user_dir.name}"  # a cache of this test's own
    args = ["--store", shipped, "--cache", cache, "--json"]
    ok(me.envcrate("ensure", "small", *args, env=env))
    report = ok(me.envcrate("gc", "--cache", cache, "--max-size", "0", "--json", env=env))
    assert [r["id"] for r in report["removed"]] == [small_crate.id], report
    assert os.listdir(cache / "e") == []

    ok(me.envcrate("ensure", "small", *args, env=env))
    ok(me.envcrate("rm", small_crate.id, "--cache", cache, "--json", env=env))
    assert os.listdir(cache / "e") == []  # no trash left behind either


@pytest.fixture(scope="module")
def other_crate(small_venv, tmp_path_factory):
    """A second crate (the small venv without pyflakes' console script)."""
    from envcrate import pack

    return pack(small_venv, tmp_path_factory.mktemp("other"), exclude=("bin/pyflakes",))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000])
def test_a_group_shared_cache(users, shipped, small_crate, other_crate, user_dir, env, umask):
    one, two, outsider = users
    cache = shared_cache(user_dir / "shared", env)
    publish(other_crate, shipped, tag="other")
    args = ["--store", shipped, "--cache", cache]

    def as_(user, *a, **kw):
        return user.envcrate(*a, env=env, umask=umask, shared=True, **kw)

    # one fills, then removes its own entry; two fills cold with the lock,
    # lock directory and stamp one made. one fills the other crate.
    first = ok(as_(one, "ensure", "small", *args, "--json"))
    assert first["state"] == "READY"
    succeeds(as_(one, "run", "small", *args, "--", "python", "-c", "pass"))
    ok(as_(one, "rm", small_crate.id, "--cache", cache, "--json"))
    filled = ok(as_(two, "ensure", "small", *args, "--json"))
    assert filled["state"] == "READY"
    ones = Path(ok(as_(one, "ensure", "other", *args, "--json"))["prefix"])
    twos = Path(filled["prefix"])
    assert (twos.stat().st_uid, ones.stat().st_uid) == (two.uid, one.uid)
    # Both use both: run leases (in lease directories the other made), and
    # ensure --lease.
    for user in (one, two, one, two):
        for ref, prefix in (("small", twos), ("other", ones)):
            code = "import six, sys; print(sys.prefix)"
            out = as_(user, "run", ref, *args, "--", "python", "-c", code)
            assert out.returncode == 0 and out.stdout.strip() == str(prefix), out.stderr
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        ok(as_(one, "ensure", "small", *args, "--lease", str(sleeper.pid), "--json"))
        ok(as_(two, "ensure", "other", *args, "--lease", str(sleeper.pid), "--json"))
        kept = ok(as_(two, "gc", "--cache", cache, "--max-size", "0", "--json"))
        # Each member's lease keeps the other's entry too (by lease, not owner).
        assert kept["removed"] == [] and len(kept["kept"]) == 2, kept
        assert all(k.get("leases") for k in kept["kept"]), kept
    finally:
        sleeper.kill()
        sleeper.wait()

    # Neither may remove or replace the other's entry.
    for user, theirs, crate in ((one, twos, small_crate), (two, ones, other_crate)):
        moved = cache / "e" / f".{theirs.name}.moved"
        out = run(user.cmd(["mv", theirs, moved], umask, shared=True))
        assert out.returncode != 0 and theirs.is_dir() and not moved.exists()
        rename = f"import os; os.rename({str(theirs)!r}, {str(moved)!r})"
        out = run(user.cmd([sys.executable, "-c", rename], umask, shared=True))
        assert out.returncode != 0 and theirs.is_dir()
        swap = user_dir / f"swap-{user.name}"  # replacing: move it aside first
        out = run(user.cmd(["mv", "-T", theirs, swap], umask, shared=True))
        assert out.returncode != 0 and theirs.is_dir()
        refused = as_(user, "rm", crate.id, "--cache", cache)
        fails(refused, "owner")
        assert theirs.is_dir()
    for user, theirs in ((one, twos), (two, ones)):
        report = ok(as_(user, "gc", "--cache", cache, "--max-size", "0", "--dry-run", "--json"))
        assert [r["prefix"] for r in report["removed"]] == [str(ones if user is one else twos)]
        theirs_kept = [k for k in report["kept"] if k["prefix"] == str(theirs)]
        assert len(theirs_kept) == 1 and "owner" in theirs_kept[0]["error"], report
        text = as_(user, "gc", "--cache", cache, "--max-size", "0", "--dry-run")
        assert text.returncode == 0
        assert f"kept {theirs}: {theirs_kept[0]['error']}" in text.stdout.splitlines()
    report = ok(as_(one, "gc", "--cache", cache, "--max-size", "0", "--json"))
    assert [r["prefix"] for r in report["removed"]] == [str(ones)]
    assert [k["prefix"] for k in report["kept"]] == [str(twos)], report
    assert twos.is_dir() and not ones.exists()
    assert [n for n in os.listdir(cache / "e") if n.startswith(".")] == []

    # A user outside the group: the cache is read-only to them, and its
    # ready entries work all the same (no stamp, no lease).
    prefix = twos
    hit = ok(outsider.envcrate("ensure", small_crate.id, "--cache", cache, "--json", env=env))
    assert hit["state"] == "HIT" and hit["prefix"] == str(prefix)
    out = outsider.envcrate(
        "run", small_crate.id, "--cache", cache, "--", "python", "-c", "pass", env=env
    )
    assert out.returncode == 0 and "cannot lease" in out.stderr, out.stderr

    assert world_writable(cache) == []
    for d in ("e", "locks", "leases", "used", "dl", "blobs", "tags"):
        mode = (cache / d).stat().st_mode
        assert mode & 0o2070 == 0o2070, (d, oct(mode))
        assert bool(mode & stat.S_ISVTX) == (d in ("e", "locks", "dl", "blobs")), d
    ok(as_(two, "rm", small_crate.id, "--cache", cache, "--json"))  # the owner can
    assert os.listdir(cache / "e") == []


def test_a_private_cache_under_umask_000_is_not_world_writable(users, shipped, user_dir, env):
    me = users[0]
    cache = me.home / f"cache-{user_dir.name}"  # a cache of this test's own
    args = ["--store", shipped, "--cache", cache]
    ok(me.envcrate("ensure", "small", *args, "--json", env=env, umask=0o000))
    succeeds(me.envcrate("run", "small", *args, "--", "python", "-c", "pass", env=env, umask=0o000))
    assert world_writable(cache) == []


def test_a_read_only_cache_first_and_a_writable_one_after(users, shipped, user_dir, env):
    me = users[0]
    ro = user_dir / "ro"
    ro.mkdir(mode=0o755)  # root's
    rw = me.home / f"rw-{user_dir.name}"
    done = ok(
        me.envcrate(
            "ensure", "small", "--store", shipped, "--cache", ro, "--cache", rw, "--json", env=env
        )
    )
    assert Path(done["prefix"]).parent.parent == rw
    assert os.listdir(ro) == []
    fails(
        me.envcrate("ensure", "small", "--store", shipped, "--cache", ro, env=env),
        "no writable cache",
    )


def test_a_ready_entry_in_a_cache_the_user_cannot_write(users, shipped, small_crate, user_dir, env):
    """Another user's private cache, readable by all: ensure (whose stamp
    fails), ensure --lease and run (whose leases fail) still work."""
    owner, other, _ = users
    cache = owner.home / f"cache-{user_dir.name}"
    prefix = ok(
        owner.envcrate("ensure", "small", "--store", shipped, "--cache", cache, "--json", env=env)
    )["prefix"]
    (cache / "used").chmod(0o755)
    old = time.time() - 3600
    for p in (cache / "used").iterdir():
        os.utime(p, (old, old))  # due for a refresh
    stamps = {p.name: p.stat().st_mtime for p in (cache / "used").iterdir()}
    done = ok(other.envcrate("ensure", small_crate.id, "--cache", cache, "--json", env=env))
    assert done["state"] == "HIT" and done["prefix"] == prefix
    assert {p.name: p.stat().st_mtime for p in (cache / "used").iterdir()} == stamps
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        leased = other.envcrate(
            "ensure",
            small_crate.id,
            "--cache",
            cache,
            "--lease",
            str(sleeper.pid),
            "--json",
            env=env,
        )
        assert json.loads(leased.stdout or "{}").get("prefix") == prefix, leased.stderr
        assert leased.returncode == 0 and "cannot lease" in leased.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    out = other.envcrate(
        "run",
        small_crate.id,
        "--cache",
        cache,
        "--",
        "python",
        "-c",
        "import sys; print(sys.prefix)",
        env=env,
    )
    assert out.returncode == 0 and out.stdout.strip() == prefix, out.stderr


def test_errors_say_what_to_do(users, small_crate, user_dir, env):
    me = users[0]
    archive = user_dir / small_crate.archive.name
    shutil.copy(small_crate.archive, archive)
    closed = user_dir / "closed"
    closed.mkdir(mode=0o755)
    denied = me.envcrate("unpack", archive, closed / "x", env=env)
    fails(denied, "permission")
    assert "free space" not in denied.stderr and denied.stderr.count("\n") == 1
    missing = me.envcrate(
        "ensure",
        small_crate.id,
        "--cache",
        me.home / "c",
        "--events",
        user_dir / "no" / "ev",
        env=env,
    )
    fails(missing, "does not exist")
    assert "free space" not in missing.stderr and missing.stderr.count("\n") == 1


def test_read_only_filesystem_and_quota_messages(small_crate, tmp_path, monkeypatch, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    if run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", ro]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = envcrate("unpack", small_crate.archive, ro / "x")
        fails(out, "read-only filesystem")
        assert "free space" not in out.stderr
    finally:
        run(["umount", ro])

    import errno

    from envcrate import cli
    from envcrate.cli import caches

    def over_quota(args):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/some/cache/e")

    monkeypatch.setitem(caches.COMMANDS, "gc", over_quota)
    assert cli.main(["gc"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quota" in err and "/some/cache/e" in err


def test_gc_as_the_owner_makes_an_older_shared_cache_sticky(user_dir, env):
    """Directories an older envcrate made (2775, not sticky) get the sticky
    bit from their owner's next gc (or fill); the others are left as they are."""
    cache = user_dir / "old-shared"
    cache.mkdir()
    cache.chmod(0o2775)
    for d in ("e", "used"):
        (cache / d).mkdir()
        (cache / d).chmod(0o2775)
    ok(envcrate("gc", "--cache", cache, "--json", env=env))
    assert stat.S_IMODE((cache / "e").stat().st_mode) == 0o3775
    assert stat.S_IMODE((cache / "used").stat().st_mode) == 0o2775


# ------------------------------------------------ one member against another (review)
#
# In a group-shared cache every member may add names to its directories. These
# tests plant, as member two, what the security review found (symlinks, FIFOs,
# devices, a held lock, an entry) and check that member one's envcrate neither
# writes through them nor hangs on them. See cache_layout.md, Permissions.


def as_member(user, env, *args, **kw):
    return user.envcrate(*args, env=env, shared=True, **kw)


def member_sh(user, script: str) -> None:
    """``script`` run by ``/bin/sh`` as ``user`` with the shared group."""
    out = run(user.cmd(["sh", "-c", script], shared=True))
    assert out.returncode == 0, (script, out.stderr)


def private_file(user, path: Path, text: str, days_old: float = 0) -> Path:
    path.write_text(text)
    os.chown(path, user.uid, user.gid)
    path.chmod(0o600)
    if days_old:
        t = time.time() - days_old * 86400
        os.utime(path, (t, t))
    return path


def unchanged(path: Path, text: str) -> None:
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, stat.filemode(st.st_mode)
    assert path.read_text() == text


def test_symlinks_planted_in_locks_and_used_are_not_followed(
    users, shipped, small_crate, user_dir, env
):
    """H1: a member's symlinks under the names of the crate's lock and holder
    files (cold path) and of an entry's stamp (warm path) to the victim's
    files: nothing is truncated, written, chmod-ed or created through them."""
    one, two, _ = users
    cache = shared_cache(user_dir / "shared", env)
    secret = private_file(one, one.home / f"secret-{user_dir.name}", "top secret\n")
    rc = private_file(one, one.home / f"rc-{user_dir.name}", "# my precious rc\n")
    id16 = small_crate.id.split(":", 1)[1][:16]
    member_sh(
        two, f"ln -s {secret} {cache}/locks/{id16}.lock; ln -s {rc} {cache}/locks/{id16}.holder"
    )
    args = ["--store", shipped, "--cache", cache, "--json"]
    first = ok(as_member(one, env, "ensure", "small", *args))
    assert first["state"] == "READY"
    unchanged(secret, "top secret\n")
    unchanged(rc, "# my precious rc\n")
    # The stamp: used/ is not sticky; a dangling symlink there must not make
    # the victim create a (group-writable) file where the link points.
    key = os.path.basename(first["prefix"])
    job = one.home / f"job-{user_dir.name}.sh"
    member_sh(two, f"rm -f {cache}/used/{key}; ln -s {job} {cache}/used/{key}")
    warm = ok(as_member(one, env, "ensure", "small", *args))
    assert warm["state"] == "HIT"
    assert not os.path.lexists(job)


def test_part_and_index_files_cannot_be_planted(users, shipped, small_crate, user_dir, env):
    """H1: a download from an http store and the blob and tag index records
    it writes go to names no member can plant a symlink under in advance
    (the old ones were ``<pid>``-named: here the attacker knows the pid)."""
    from servers import HttpServer, wait_for

    from envcrate.node.leases import this_host

    one, two, _ = users
    cache = shared_cache(user_dir / "shared", env)
    notes = {
        n: private_file(one, one.home / f"{n}-{user_dir.name}", f"{n}\n")
        for n in ("notes", "blobidx", "tagidx")
    }
    server = HttpServer(shipped)
    pidfile, go = one.home / f"victim-{user_dir.name}.pid", user_dir / "go"
    script = f'echo $$ > {pidfile}; while [ ! -e {go} ]; do sleep 0.02; done; exec "$@"'
    argv = ["sh", "-c", script, "sh", sys.executable, "-m", "envcrate.cli", "ensure", "small"]
    argv += ["--store", server.url, "--cache", cache, "--json"]
    try:
        victim = subprocess.Popen(
            [str(a) for a in one.cmd(argv, shared=True)],
            env=one.env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        pid = wait_for(lambda: pidfile.read_text().strip(), 30, "the victim's pid")
        blob = small_crate.blob.split(":", 1)[1]
        host = this_host().replace(".", "_")
        member_sh(
            two,
            f"ln -s {notes['notes']} {cache}/dl/.{blob}.{host}-{pid}.part; "
            f"ln -s {notes['blobidx']} {cache}/blobs/.{blob}.{pid}.tmp; "
            f"mkdir -p {cache}/tags; ln -s {notes['tagidx']} {cache}/tags/.small.{pid}.tmp",
        )
        go.touch()
        out, err = victim.communicate(timeout=120)
    finally:
        server.stop()
    assert victim.returncode == 0, err
    assert json.loads(out)["state"] == "READY"
    for name, path in notes.items():
        unchanged(path, f"{name}\n")
    # The index records were written all the same, as regular files.
    assert (cache / "blobs" / blob).read_text().strip() == small_crate.id
    assert (cache / "tags" / "small").read_text().strip() == small_crate.id


def test_a_symlinked_lease_directory_is_not_cleaned(users, shipped, small_crate, user_dir, env):
    """H2: ``leases/<x>`` made a symlink to the victim's directory: neither
    ``gc`` nor ``ls --cache`` (which drop dead leases) removes anything there,
    whatever the names; in a real lease directory only regular files of the
    lease form are dropped."""
    one, two, _ = users
    cache = shared_cache(user_dir / "shared", env)
    data = one.home / f"data-{user_dir.name}"
    data.mkdir(mode=0o700)
    os.chown(data, one.uid, one.gid)
    files = {
        n: private_file(one, data / n, f"{n}\n", days_old=5)
        for n in ("results.csv", "thesis.tex", "otherhost.0123456789ab.42")
    }
    ok(as_member(one, env, "ensure", "small", "--store", shipped, "--cache", cache, "--json"))
    key = os.listdir(cache / "e")[0]
    member_sh(
        two,
        f"ln -s {data} {cache}/leases/0123456789abcdef-00000000; "
        f"mkdir -p {cache}/leases/{key}; ln -s {data}/thesis.tex {cache}/leases/{key}/x.0123456789ab.7",
    )
    ok(as_member(one, env, "ls", "--cache", cache, "--json"))
    ok(as_member(one, env, "gc", "--cache", cache, "--json"))
    for name, path in files.items():
        unchanged(path, f"{name}\n")


def test_fifos_and_devices_in_index_files_neither_hang_nor_flood(
    users, shipped, small_crate, user_dir, env
):
    """M3: tag records that are a FIFO (an open would block) or a symlink to
    ``/dev/zero`` (a read would not end) are skipped by ``ls --cache``; a
    FIFO under the crate's holder-file name does not block a cold fill."""
    one, two, _ = users
    cache = shared_cache(user_dir / "shared", env)
    id16 = small_crate.id.split(":", 1)[1][:16]
    member_sh(
        two,
        f"mkdir -p {cache}/tags; mkfifo {cache}/tags/fifo; ln -s /dev/zero {cache}/tags/zero; "
        f"mkfifo {cache}/locks/{id16}.holder",
    )
    args = ["--store", shipped, "--cache", cache, "--json"]
    ok(as_member(one, env, "ensure", "small", *args, timeout=120))
    # Under a memory limit: the old unbounded read would end in MemoryError.
    limited = ["sh", "-c", 'ulimit -v 2000000; exec "$@"', "sh", sys.executable, "-m"]
    out = run(
        one.cmd([*limited, "envcrate.cli", "ls", "--cache", cache, "--json"], shared=True),
        env=one.env(env),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert "Traceback" not in out.stderr
    assert any(small_crate.id == e["id"] for e in listed["crates"]), listed


LOCK_HOLDER = """
import fcntl, os, sys, time
lock, holder, held = sys.argv[1:4]
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
os.fchmod(fd, 0o664)
fcntl.lockf(fd, fcntl.LOCK_EX)
with open(holder, "w") as f:
    f.write("somehost\\n1\\n")
open(held, "w").close()
while True:  # a heartbeat that never stops
    os.utime(holder)
    time.sleep(0.5)
"""


def test_a_member_holding_the_crate_lock_forever_is_given_up_on(
    users, shipped, small_crate, user_dir, env
):
    """M5: a member takes the crate's lock and keeps its heartbeat fresh;
    another member's cold ensure waits at most ENVCRATE_LOCK_WAIT seconds,
    then fills itself."""
    from servers import wait_for

    one, two, _ = users
    cache = shared_cache(user_dir / "shared", env)
    id16 = small_crate.id.split(":", 1)[1][:16]
    held = two.home / f"held-{user_dir.name}"
    argv = [sys.executable, "-c", LOCK_HOLDER, f"{cache}/locks/{id16}.lock"]
    argv += [f"{cache}/locks/{id16}.holder", held]
    holder = subprocess.Popen([str(a) for a in two.cmd(argv, shared=True)])
    try:
        wait_for(held.exists, 30, "the member holding the lock")
        out = as_member(
            one,
            dict(env, ENVCRATE_LOCK_WAIT="3"),
            "ensure",
            "small",
            "--store",
            shipped,
            "--cache",
            cache,
            "--json",
            timeout=90,
        )
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(succeeds(out).stdout)["state"] == "READY"


def test_verify_tells_a_planted_entry(users, shipped, small_crate, user_dir, env):
    """H5: a member may add the entry of a crate that is not cached yet (and
    the warm path uses it: members trust each other's fills), but
    ``verify --cache`` checks the entry's file table and manifest against
    the crate id and reports a planted one."""
    one, two, _ = users
    private = one.home / f"cache-{user_dir.name}"
    real = Path(
        ok(
            one.envcrate(
                "ensure", "small", "--store", shipped, "--cache", private, "--json", env=env
            )
        )["prefix"]
    )
    good = ok(one.envcrate("verify", small_crate.id, "--cache", private, "--json", env=env))
    assert good["ok"], good
    cache = shared_cache(user_dir / "shared", env)
    e = cache / "e" / real.name
    # The real entry's ready marker, with no relocated files to check.
    head, _, record = (real / ".envcrate" / "ready").read_bytes().rpartition(b"\n")
    marker = json.loads(record)
    marker["local"] = {}
    ready = two.home / f"ready-{user_dir.name}"
    ready.write_bytes(head + b"\n" + json.dumps(marker).encode())
    ready.chmod(0o644)
    table = '["d","755",0,"","bin"]\\n["f","755",%d,"%s","bin/python"]\\n'
    member_sh(
        two,
        f"E={e}; mkdir -p $E/.envcrate $E/bin; "
        "printf '#!/bin/sh\\necho PWNED\\n' > $E/bin/python; chmod 755 $E/bin/python; "
        "H=$(sha256sum $E/bin/python | cut -c1-64); "
        f"printf '{table}' $(stat -c %s $E/bin/python) $H > $E/.envcrate/files.jsonl; "
        f"cp {ready} $E/.envcrate/ready; cp {real}/.envcrate/manifest.json $E/.envcrate/; chmod -R a-w $E",
    )
    hit = ok(as_member(one, env, "ensure", small_crate.id, "--cache", cache, "--json"))
    assert hit["state"] == "HIT"  # trusted, as every member's fill is
    out = as_member(one, env, "verify", small_crate.id, "--cache", cache, "--json")
    assert out.returncode != 0, out.stdout
    report = json.loads(out.stdout)
    assert not report["ok"] and "not the crate" in report["entries"][0]["error"], report
    text = as_member(one, env, "verify", small_crate.id, "--cache", cache)
    assert text.returncode != 0 and "Traceback" not in text.stderr, text.stderr
    assert text.stderr.strip().count("\n") == 0 and text.stderr.startswith("envcrate: error:"), (
        text.stderr
    )


def test_the_shell_lease_of_activate_is_not_written_through_a_symlink(
    users, shipped, small_crate, user_dir, env
):
    """H1: the evaluating shell makes its own lease ``leases/<key>/<host>.<boot>.<$$>``
    in a group-writable directory; a member's symlink under that name (the
    pid known here; guessed or sprayed otherwise) to the victim's file: the
    shell removes the name and creates its lease new, the file is intact."""
    from servers import wait_for

    from envcrate.node.leases import lease_name

    one, two, _ = users
    cache = shared_cache(user_dir / "shared", env)
    args = ["--store", shipped, "--cache", cache]
    key = os.path.basename(ok(as_member(one, env, "ensure", "small", *args, "--json"))["prefix"])
    succeeds(as_member(one, env, "run", "small", *args, "--", "true"))  # makes leases/<key>
    rc = private_file(one, one.home / f"rc-{user_dir.name}", "# my precious rc\n")
    pidfile, go = one.home / f"shell-{user_dir.name}.pid", user_dir / "go"
    cli = f"{sys.executable} -m envcrate.cli activate small {' '.join(map(str, args))} --shell sh"
    script = (
        f"echo $$ > {pidfile}; while [ ! -e {go} ]; do sleep 0.02; done; "
        f'out=$({cli}) || exit 9; eval "$out"; echo "$VIRTUAL_ENV"'
    )
    shell = subprocess.Popen(
        [str(a) for a in one.cmd(["sh", "-c", script], shared=True)],
        env=one.env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pid = wait_for(lambda: pidfile.read_text().strip(), 30, "the shell's pid")
        lease = cache / "leases" / key / lease_name(pid)
        member_sh(two, f"ln -s {rc} {lease}")
        go.touch()
        out, err = shell.communicate(timeout=120)
    finally:
        shell.kill()
        shell.wait()
    assert shell.returncode == 0, err
    assert out.strip() == str(cache / "e" / key)
    unchanged(rc, "# my precious rc\n")
    st = lease.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == one.uid
