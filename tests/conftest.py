"""Shared fixtures: real venvs built from a local wheelhouse.

The test command fills the wheelhouse once (``pip download -r
tests/wheels.txt``); every venv here installs from it with ``--no-index``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = Path(os.environ.get("ENVCRATE_WHEELHOUSE", ROOT / ".wheelhouse"))
SMALL = ["six", "markupsafe", "pyflakes"]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run([str(c) for c in cmd], **kw)


def check(cmd, **kw) -> subprocess.CompletedProcess:
    out = run(cmd, **kw)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def make_venv(path: Path, packages=(), creator: str = "venv") -> Path:
    """A real venv made by ``creator`` with ``packages`` installed by pip."""
    if not WHEELHOUSE.is_dir():
        pytest.fail(f"no wheelhouse at {WHEELHOUSE}: run the README's test command, which fills it")
    if creator == "venv":
        check([sys.executable, "-m", "venv", "--without-pip", path])
    elif creator == "venv-copies":
        check([sys.executable, "-m", "venv", "--without-pip", "--copies", path])
    elif creator == "virtualenv":
        check(
            [
                sys.executable,
                "-m",
                "virtualenv",
                "--no-pip",
                "--no-setuptools",
                "--no-wheel",
                "--no-periodic-update",
                path,
            ]
        )
    elif creator == "uv":
        check([shutil.which("uv") or "uv", "venv", "--python", sys.executable, path])
    else:
        raise ValueError(creator)
    if packages:
        install(path, packages)
    return path


def install(venv: Path, packages) -> None:
    check(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            WHEELHOUSE,
            *packages,
        ],
        env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )


def envcrate(*args, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "envcrate.cli", *args], **kw)


def ok(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def fails(out: subprocess.CompletedProcess, *words: str) -> str:
    assert out.returncode == 1, (out.stdout, out.stderr)
    err = out.stderr.strip()
    assert err.startswith("envcrate: error: ") and "\n" not in err, err
    assert "Traceback" not in out.stderr
    for w in words:
        assert w in err, err
    return err


def publish(crate, store, tag: str | None = None):
    """Publish ``crate`` (a packed :class:`~envcrate.Crate`) in ``store`` (a
    path or URL), tagged ``tag``; returns ``store``."""
    from envcrate.stores import open_store

    open_store(store).publish(
        crate.archive, crate.manifest.data, "tar.zst", crate.blob, crate.size, tag=tag
    )
    return store


@pytest.fixture(scope="session")
def small_venv(tmp_path_factory) -> Path:
    """A shared venv with six, markupsafe (a C extension) and pyflakes (a
    console script). Tests must not modify it."""
    return make_venv(tmp_path_factory.mktemp("src") / "small", SMALL)


@pytest.fixture(scope="session")
def small_crate(small_venv, tmp_path_factory):
    from envcrate import pack

    return pack(small_venv, tmp_path_factory.mktemp("crate"))


def text_files_naming(root: Path, needle: str) -> list[str]:
    """Text files under root (no NUL in them) that contain needle; the
    crate's own metadata (.envcrate/) records the original prefix on purpose."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d != ".envcrate"]
        for name in filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                continue
            data = p.read_bytes()
            if b"\0" not in data and needle.encode() in data:
                found.append(str(p.relative_to(root)))
    return found


# --------------------------------------------------------------------------- users

# Root ignores permission bits, which hides every permission bug of a cache:
# the tests that matter run the command line as these plain users. The first
# two share GROUP (a project group); the third is in no group of theirs.
USERS = ("envcrate-t1", "envcrate-t2", "envcrate-t3")
GROUP = "envcrate-tg"


@dataclass
class User:
    name: str
    uid: int
    gid: int  # the user's own group
    home: Path  # owned by the user, reachable by everyone (0711 chain)

    def cmd(self, argv, umask: int = 0o022, shared: bool = False) -> list[str]:
        """``argv`` run as this user (supplementary group GROUP when
        ``shared``, none otherwise) under ``umask``."""
        groups = ["--groups", GROUP] if shared else ["--clear-groups"]
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            *groups,
            "sh",
            "-c",
            f'umask {umask:03o}; exec "$@"',
            "sh",
            *map(str, argv),
        ]

    def env(self, base: dict) -> dict:
        e = dict(base, HOME=str(self.home), USER=self.name, LOGNAME=self.name)
        e["XDG_CACHE_HOME"] = str(self.home / ".cache")
        e["XDG_DATA_HOME"] = str(self.home / ".local" / "share")
        return e

    def envcrate(self, *args, env: dict, umask: int = 0o022, shared: bool = False, **kw):
        argv = [sys.executable, "-m", "envcrate.cli", *args]
        return run(self.cmd(argv, umask, shared), env=self.env(env), **kw)


def reachable(path: Path) -> Path:
    """Let every user traverse (not list) ``path``'s ancestors, as far up as
    they lack it: pytest's temporary directories are 0700."""
    path = Path(path).resolve()
    for d in [path, *path.parents]:
        mode = d.stat().st_mode
        if not mode & 0o001:
            d.chmod((mode & 0o7777) | 0o001)
    return path


def _ensure_accounts() -> None:
    """Create the group and users once per machine; both xdist workers may
    get here at once, so under a lock, and "already exists" is fine."""
    import fcntl

    fd = os.open("/tmp/envcrate-test-users.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        out = run(["groupadd", GROUP])
        assert out.returncode in (0, 9), out.stderr  # 9: the group exists
        for name in USERS:
            extra = ["-G", GROUP] if name != USERS[2] else []
            out = run(["useradd", "-M", "-U", "-s", "/bin/sh", *extra, name])
            assert out.returncode in (0, 9), out.stderr  # 9: the user exists
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def users() -> list[User]:
    """Three plain users (root only: ``useradd``; skipped otherwise) who can
    run this Python: its ancestors (``/root`` is 0700) are made traversable."""
    if os.geteuid() != 0:
        pytest.skip("creating the plain test users needs root (useradd); run as root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run commands as the test users")
    import pwd

    _ensure_accounts()
    reachable(Path(sys.executable).parent)
    reachable(Path(sys.executable).resolve().parent)
    for p in sys.path:  # the interpreter's library and this checkout's src/
        if p and os.path.isdir(p):
            reachable(Path(p))
    homes = Path(tempfile.mkdtemp(prefix="envcrate-homes-"))
    homes.chmod(0o711)
    found = []
    for name in USERS:
        pw = pwd.getpwnam(name)
        home = homes / name
        home.mkdir(mode=0o711)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        found.append(User(name, pw.pw_uid, pw.pw_gid, home))
    yield found
    shutil.rmtree(homes, ignore_errors=True)


@pytest.fixture
def user_dir() -> Path:
    """A directory of this test's that the test users can reach (0711, under
    /tmp): not under pytest's basetemp, whose ``/tmp/pytest-of-root`` every
    pytest session starting on this machine makes 0700 again."""
    d = Path(tempfile.mkdtemp(prefix="envcrate-test-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)  # as root: read-only entries included


# --------------------------------------------------------------------------- stores


@pytest.fixture
def shipped(small_crate, tmp_path):
    """The small crate published, tagged ``small``, in a directory store of
    this test's own."""
    return publish(small_crate, tmp_path / "store", tag="small")


@pytest.fixture
def env(tmp_path) -> dict:
    """The environment of envcrate subprocesses: no store or cache by default
    (the default ones are this test's own, under tmp_path)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ENVCRATE_", "AWS_"))}
    e["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    e["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    return e


@pytest.fixture
def user_shipped(small_crate, user_dir):
    """The small crate in a directory store that the test users can read."""
    store = user_dir / "store"
    publish(small_crate, store, tag="small")
    return store


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real S3 server (SeaweedFS) for this test session, stopped at the end."""
    from servers import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@dataclass
class Backend:
    kind: str
    writer: str  # URL to publish to
    reader: str  # URL to read from (the HTTP server for "http")
    env: dict  # environment for envcrate subprocesses

    def cli(self, *args, **kw):
        return envcrate(*args, env=self.env, **kw)


def _without_aws() -> dict:
    return {
        k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "ENVCRATE_STORE"
    }


def use_aws_env(monkeypatch, env: dict) -> dict:
    """Point this process's AWS configuration (only) at ``env``'s."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """This process's environment pointed at the test S3 server."""
    return use_aws_env(monkeypatch, seaweed.env())


@pytest.fixture(params=["fs", "s3", "http"])
def backend(request, tmp_path):
    """One store per test on each backend; HTTP serves a directory store."""
    if request.param == "s3":
        env = request.getfixturevalue("s3_env")
        seaweed = request.getfixturevalue("seaweed")
        url = f"s3://{seaweed.bucket()}/{tmp_path.name}"
        yield Backend("s3", url, url, env)
    elif request.param == "fs":
        (tmp_path / "store").mkdir()  # an empty store (a missing directory is no store)
        yield Backend("fs", str(tmp_path / "store"), str(tmp_path / "store"), _without_aws())
    else:
        from servers import HttpServer

        root = tmp_path / "store"
        root.mkdir()
        server = HttpServer(root)
        yield Backend("http", str(root), server.url, _without_aws())
        server.stop()
