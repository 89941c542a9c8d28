"""Shared fixtures: real venvs built from a local wheelhouse.

The test command fills the wheelhouse once (``pip download -r
tests/wheels.txt``); every venv here installs from it with ``--no-index``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


# --------------------------------------------------------------------------- stores


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
        yield Backend("fs", str(tmp_path / "store"), str(tmp_path / "store"), _without_aws())
    else:
        from servers import HttpServer

        root = tmp_path / "store"
        root.mkdir()
        server = HttpServer(root)
        yield Backend("http", str(root), server.url, _without_aws())
        server.stop()
