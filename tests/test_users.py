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
from conftest import GROUP, envcrate, run
from test_stores import fails, ok

from envcrate.stores import open_store


@pytest.fixture
def shipped(small_crate, user_dir):
    """The small crate in a directory store the users can read."""
    store = user_dir / "store"
    open_store(store).publish(
        small_crate.archive,
        small_crate.manifest.data,
        "tar.zst",
        small_crate.blob,
        small_crate.size,
        tag="small",
    )
    return store


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
    cache = me.home / "cache"
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
    open_store(shipped).publish(
        other_crate.archive,
        other_crate.manifest.data,
        "tar.zst",
        other_crate.blob,
        other_crate.size,
        tag="other",
    )
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
    cache = me.home / "cache"
    args = ["--store", shipped, "--cache", cache]
    ok(me.envcrate("ensure", "small", *args, "--json", env=env, umask=0o000))
    succeeds(me.envcrate("run", "small", *args, "--", "python", "-c", "pass", env=env, umask=0o000))
    assert world_writable(cache) == []


def test_a_read_only_cache_first_and_a_writable_one_after(users, shipped, user_dir, env):
    me = users[0]
    ro = user_dir / "ro"
    ro.mkdir(mode=0o755)  # root's
    rw = me.home / "rw"
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
    cache = owner.home / "cache"
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

    def over_quota(args):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/some/cache/e")

    monkeypatch.setitem(cli.COMMANDS, "gc", over_quota)
    with pytest.raises(SystemExit):
        cli.main(["gc"])
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
