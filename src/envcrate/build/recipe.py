"""Recipes: an environment described once, in TOML (``envcrate.toml``).

::

    name = "md-tools"
    kind = "venv"                      # or "conda"
    python = "3.11"                    # venv: a version; conda: a spec ("3.11.*")
    requirements = ["numpy>=1.26"]     # venv: pip requirements
    index-urls = ["https://pypi.org/simple"]   # optional: the index, then extra ones
    find-links = ["wheels"]            # optional: directories or pages of wheels
    no-index = false                   # optional: only find-links
    specs = ["numpy 1.26.*"]           # conda: match specs
    channels = ["conda-forge"]         # conda: channel names or URLs
    pip = ["mdtraj"]                   # conda: pip requirements installed on top
    [env]                              # optional: build-time environment variables
    CFLAGS = "-O2"

Relative paths (find-links, file channels) are relative to the recipe's
directory. :meth:`Recipe.normalised` is what the lock's check hashes: every
field, sorted where order does not matter, paths as written (a lock made in
one checkout holds in another).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EnvcrateError

DEFAULT_NAME = "envcrate.toml"

_KEYS = {
    "name": str,
    "kind": str,
    "python": str,
    "requirements": list,
    "index-urls": list,
    "find-links": list,
    "no-index": bool,
    "specs": list,
    "channels": list,
    "pip": list,
    "env": dict,
}
_VENV_ONLY = ("requirements",)
_CONDA_ONLY = ("specs", "channels", "pip")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^3\.\d+(\.\d+)?$")


class RecipeError(EnvcrateError):
    """A recipe that cannot be read or is not a valid recipe."""


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    kind: str
    python: str
    requirements: tuple = ()
    index_urls: tuple = ()
    find_links: tuple = ()
    no_index: bool = False
    specs: tuple = ()
    channels: tuple = ()
    pip: tuple = ()
    env: dict = field(default_factory=dict)
    # find-links and channels as the recipe writes them (relative paths
    # stay relative): what the recipe's digest covers, so a lock made in one
    # checkout holds in another
    written: dict = field(default_factory=dict)

    @property
    def lock_path(self) -> Path:
        """The lock beside the recipe: ``envcrate.lock`` for
        ``envcrate.toml``, ``X.lock`` for ``X.toml``."""
        return self.path.with_suffix(".lock")

    def normalised(self) -> dict:
        """Every field as the build depends on it (order kept where it
        matters: indexes and channels are searched in order), paths as
        written."""
        return {
            "name": self.name,
            "kind": self.kind,
            "python": self.python,
            "requirements": sorted(self.requirements),
            "index-urls": list(self.index_urls),
            "find-links": list(self.written.get("find-links", self.find_links)),
            "no-index": self.no_index,
            "specs": sorted(self.specs),
            "channels": list(self.written.get("channels", self.channels)),
            "pip": sorted(self.pip),
            "env": dict(sorted(self.env.items())),
        }

    def digest(self) -> str:
        data = json.dumps(self.normalised(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(data.encode()).hexdigest()

    @property
    def pip_requirements(self) -> tuple:
        """What pip (uv) installs: a venv's requirements, a conda env's pip layer."""
        return self.requirements if self.kind == "venv" else self.pip


def find(path: str | os.PathLike | None) -> Path:
    """The recipe file: ``path`` (a file, or a directory holding
    ``envcrate.toml``), by default ``./envcrate.toml``."""
    p = Path(path) if path is not None else Path(DEFAULT_NAME)
    if p.is_dir():
        p = p / DEFAULT_NAME
    if not p.is_file():
        raise RecipeError(f"no recipe at {p}: write one (see recipes/ for examples) or name it")
    return p.absolute()


def load(path: str | os.PathLike | None = None) -> Recipe:
    """Read and check a recipe; a :class:`RecipeError` names the line and key
    of what is wrong."""
    p = find(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(
            f"cannot read the recipe {p}: {getattr(e, 'strerror', None) or e}"
        ) from None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.9 and 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{p}: not valid TOML: {e}") from None

    def bad(key: str, what: str) -> RecipeError:
        line = _line_of(text, key)
        where = f"{p}, line {line}" if line else str(p)
        return RecipeError(f"{where}: {key} {what}")

    for key, value in data.items():
        if key not in _KEYS:
            known = ", ".join(sorted(_KEYS))
            raise bad(key, f"is not a recipe key (the keys: {known})")
        want = _KEYS[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise bad(key, f"must be a {_TYPE_NAMES[want]}")
        if want is list and not all(isinstance(v, str) and v.strip() for v in value):
            raise bad(key, "must be a list of non-empty strings")
        if want is dict and not all(isinstance(v, str) for v in value.values()):
            raise bad(key, "values must be strings")
        if want is dict and not all(
            k and "=" not in k and "\0" not in k + v for k, v in value.items()
        ):
            raise bad(key, "names must be non-empty, without '=' (and no NUL anywhere)")
    for key in ("name", "kind", "python"):
        if key not in data:
            raise RecipeError(f"{p}: the recipe has no {key} (name, kind and python are needed)")
    if not _NAME.match(data["name"]):
        raise bad("name", "may hold letters, digits and . _ - (up to 64)")
    kind = data["kind"]
    if kind not in ("venv", "conda"):
        raise bad("kind", 'is "venv" or "conda"')
    others = _CONDA_ONLY if kind == "venv" else _VENV_ONLY
    for key in others:
        if key in data:
            raise bad(key, f"is not a key of a {kind} recipe")
    if kind == "venv" and not _VERSION.match(data["python"]):
        raise bad("python", 'of a venv recipe is a version, such as "3.11" or "3.11.7"')
    if kind == "conda" and not data.get("specs"):
        raise bad("specs", "are needed in a conda recipe (the packages to install)")
    if kind == "conda" and not data.get("channels"):
        raise bad("channels", "are needed in a conda recipe")
    base = p.parent

    def local(entry: str) -> str:
        if "://" in entry:
            return entry
        return str((base / os.path.expanduser(entry)).resolve())

    def channel(entry: str) -> str:
        if "://" in entry or not (entry.startswith((".", "/", "~")) or os.sep in entry):
            return entry  # a URL or a channel name
        return Path(local(entry)).as_uri()

    return Recipe(
        path=p,
        name=data["name"],
        kind=kind,
        python=data["python"],
        requirements=tuple(data.get("requirements", ())),
        index_urls=tuple(data.get("index-urls", ())),
        find_links=tuple(local(e) for e in data.get("find-links", ())),
        no_index=data.get("no-index", False),
        specs=tuple(data.get("specs", ())),
        channels=tuple(channel(c) for c in data.get("channels", ())),
        pip=tuple(data.get("pip", ())),
        env=dict(data.get("env", {})),
        written={k: list(data.get(k, ())) for k in ("find-links", "channels")},
    )


_TYPE_NAMES = {
    str: "string",
    list: "list of strings",
    bool: "boolean (true or false)",
    dict: "table",
}


def _line_of(text: str, key: str) -> int | None:
    """The line that sets ``key`` (a top-level key or a table), if found."""
    pattern = re.compile(r"^\s*(\[\s*)?[\"']?" + re.escape(key) + r"[\"']?\s*(=|\])")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return n
    return None
