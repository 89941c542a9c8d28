"""Builds: a recipe's lock installed into a temporary prefix, packed and
shipped, unless the store already maps the build key to a crate.

The build key is the sha256 of the format version, the recipe's kind, name,
Python and build-time variables, the lock's pins and the target platform:
what decides the crate's content. Not the recipe's paths or indexes (where
the pinned, hashed files come from does not change them), nor the time.
``builds/<key>.json`` in the store maps it to the crate (written after the
crate is published); ``envcrate ensure --recipe`` looks it up the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..crate.manifest import SCHEMA
from ..crate.platform import host_platform
from ..errors import EnvcrateError
from . import lock as locks
from .recipe import Recipe, load


class BuildError(EnvcrateError):
    """A build that failed: the installer's last lines, nothing published."""


@dataclass(frozen=True)
class Built:
    id: str
    key: str
    built: bool  # False: the store had it, nothing was built
    seconds: float
    tag: str | None = None


def build_key(recipe: Recipe, lock: locks.Lock) -> str:
    data = {
        "format": SCHEMA,
        "kind": recipe.kind,
        "name": recipe.name,
        "python": recipe.python,
        "env": dict(sorted(recipe.env.items())),
        "lock": lock.body,
        "platform": host_platform(),
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def resolve(recipe_path, store) -> str:
    """The crate id a built recipe maps to in ``store`` (its lock must
    match it), for ``ensure --recipe``; nothing is built."""
    from ..stores import open_store

    recipe = load(recipe_path)
    key = build_key(recipe, locks.read(recipe))
    store = open_store(store)
    crate_id = store.build_target(key)
    if crate_id is None:
        raise EnvcrateError(
            f"{recipe.path.name} ({recipe.name}) is not built in {store.url}: run "
            f"`envcrate build {recipe.path} --store {store.url}`"
        )
    return crate_id


def build(
    recipe_path=None,
    store=None,
    *,
    tag: str | None = None,
    progress: bool = False,
    say=None,
) -> Built:
    """Build the recipe at ``recipe_path`` into ``store`` unless it is there
    (see the module's docstring). The lock is made first when the recipe has
    none; a lock that no longer matches its recipe is an error. ``say``
    gets a line for each step."""
    from ..shipping import ship
    from ..stores import check_tag, open_store

    start = time.monotonic()
    say = say or (lambda line: None)
    recipe = load(recipe_path)
    if tag is not None:
        check_tag(tag)
    if not recipe.lock_path.exists():
        say(f"locking {recipe.path.name} (no {recipe.lock_path.name} yet)")
        locks.write(recipe)
    lock = locks.read(recipe)
    key = build_key(recipe, lock)
    store = open_store(store)
    have = store.build_target(key)
    if have is not None:
        if tag is not None:
            store.set_tag(have, tag)
        return Built(have, key, False, time.monotonic() - start, tag)
    store.require_writable()
    work = Path(tempfile.mkdtemp(prefix="envcrate-build-"))
    try:
        prefix = work / recipe.name  # the name is in activate's prompt: the same every build
        if recipe.kind == "venv":
            _build_venv(recipe, lock, prefix, say)
        else:
            _build_conda(recipe, lock, prefix, work, say)
        say(f"packing and shipping {prefix.name} to {store.url}")
        shipped = ship(str(prefix), store, tag=tag, progress=progress)
        store.set_build(key, shipped.id, recipe.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Built(shipped.id, key, True, time.monotonic() - start, tag)


def find_python(version: str) -> str:
    """An interpreter of ``version`` (X.Y, or X.Y.Z exactly) on this machine:
    ``$ENVCRATE_BUILD_PYTHON``, else ``pythonX.Y`` on PATH, else what uv finds."""
    major_minor = ".".join(version.split(".")[:2])
    candidates = [os.environ.get("ENVCRATE_BUILD_PYTHON"), shutil.which(f"python{major_minor}")]
    for exe in filter(None, candidates):
        found = _version_of(exe)
        if found and (
            found == version or (version.count(".") == 1 and found.startswith(version + "."))
        ):
            return exe
    done = subprocess.run(
        [locks.uv_bin(), "python", "find", "--no-python-downloads", version],
        capture_output=True,
        text=True,
    )
    exe = done.stdout.strip()
    if done.returncode == 0 and exe:
        return exe
    raise BuildError(
        f"no Python {version} on this machine for the venv: install one, or set "
        "ENVCRATE_BUILD_PYTHON to its path"
    )


def _version_of(exe: str) -> str | None:
    try:
        done = subprocess.run(
            [exe, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = done.stdout.strip()
    return out if done.returncode == 0 and re.fullmatch(r"\d+\.\d+\.\d+", out) else None


def _run(step: str, cmd: list, recipe: Recipe) -> None:
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=locks.build_env(recipe)
    )
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        said = [
            line for line in lines if line.startswith(("error:", "cause:", "Caused by:", "ERROR:"))
        ]
        tail = said[-3:] or lines[-3:]
        shown = " | ".join(tail) if tail else f"exit status {done.returncode}"
        raise BuildError(f"building {recipe.name} failed at {step}: {shown}")


def _install_pip(recipe: Recipe, pins: str, python: Path, work: Path, say) -> None:
    if not pins.strip():
        return
    req = work / "requirements.lock.txt"
    req.write_text(pins, encoding="utf-8")
    count = sum(1 for line in pins.splitlines() if "==" in line)
    say(f"installing {count} pinned distributions with uv")
    _run(
        "uv pip sync",
        [
            locks.uv_bin(),
            "pip",
            "sync",
            req,
            "--python",
            python,
            "--require-hashes",
            "--compile-bytecode",
            "--quiet",
            *locks.uv_index_args(recipe),
        ],  # fmt: skip
        recipe,
    )
    req.unlink()


def _build_venv(recipe: Recipe, lock: locks.Lock, prefix: Path, say) -> None:
    python = find_python(recipe.python)
    say(f"creating the venv {prefix.name} (Python {_version_of(python)}, {python})")
    _run("uv venv", [locks.uv_bin(), "venv", "--quiet", "--python", python, prefix], recipe)
    _install_pip(recipe, lock.pip, prefix / "bin" / "python", prefix.parent, say)


def _build_conda(recipe: Recipe, lock: locks.Lock, prefix: Path, work: Path, say) -> None:
    """The locked packages, solved again from the recipe's channels with
    each pinned exactly and checked against the lock's sha256, installed by
    py-rattler (from its package cache); then the pip layer."""
    import asyncio

    try:
        import rattler
    except ImportError:
        raise BuildError("py-rattler is not installed: pip install py-rattler") from None

    wanted = {}
    for url, sha in lock.conda:
        stem = url.rsplit("/", 1)[-1]
        for ext in (".conda", ".tar.bz2"):
            if stem.endswith(ext):
                stem = stem[: -len(ext)]
        name, version, build_str = stem.rsplit("-", 2)
        wanted[name] = (f"{name} =={version} {build_str}", url, sha)
    platform = locks.conda_platform()  # the lock's (the build key holds the platform)
    say(f"installing {len(wanted)} locked conda packages with py-rattler")

    async def go():
        records = await rattler.solve(
            list(recipe.channels),
            [spec for spec, _, _ in wanted.values()],
            platforms=[platform, "noarch"],
            virtual_packages=[],
        )
        for r in records:
            pin = wanted.get(r.name.normalized)
            if pin is None or r.sha256 is None or r.sha256.hex() != pin[2]:
                raise BuildError(
                    f"the channels no longer serve {r.url} as locked (sha256 differs or not in "
                    f"the lock): re-lock {recipe.path.name}"
                )
        if len(records) != len(wanted):
            raise BuildError(
                f"the channels no longer serve every package of {lock.path.name}: re-lock"
            )
        cache = os.environ.get("RATTLER_CACHE_DIR")  # else rattler's own (~/.cache/rattler)
        await rattler.install(
            records,
            prefix,
            cache_dir=Path(cache) if cache else None,
            show_progress=False,
            execute_link_scripts=False,
        )

    try:
        asyncio.run(go())
    except BuildError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()
        raise BuildError(
            f"building {recipe.name} failed at the conda install: {text[-1] if text else e}"
        ) from None
    _install_pip(recipe, lock.pip, prefix / "bin" / "python", work, say)


def main_say(line: str) -> None:
    print(f"envcrate: {line}", file=sys.stderr)
