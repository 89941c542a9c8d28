"""Reading a virtual environment (venv, virtualenv, uv) into entries and pins.

What is archived differs from the env on disk in three places, none of which
the crate id depends on the host for:

- the base-interpreter links (``bin/python*`` pointing outside the env, or
  copies of the interpreter made by ``--copies``) are described in the
  manifest instead of archived; relocation recreates them;
- ``pyvenv.cfg`` is archived without the lines that name the base interpreter
  or the env's own path (``home``, ``executable``, ``command``, ``base-*``);
  the manifest keeps the originals;
- timestamp-based ``.pyc`` files become unchecked-hash pycs (PEP 552), since
  archived mtimes are fixed and would make every pyc stale.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..crate.entry import Entry
from ..errors import SourceEnvError
from .base import SourceEnv, iter_walk, refuse_outside_link
from .dists import dist_pins, editable_installs, env_python

RELOCATED_CFG_KEYS = (
    "home",
    "executable",
    "command",
    "base-prefix",
    "base-exec-prefix",
    "base-executable",
)
_INTERPRETER_NAME = re.compile(r"^(python|pypy|𝜋thon)(\d+(\.\d+)?)?t?$")


def read_cfg(prefix: str) -> list[tuple[str, str, str]]:
    """(key, value, raw line) for every line of pyvenv.cfg."""
    out = []
    with open(os.path.join(prefix, "pyvenv.cfg"), encoding="utf-8", errors="surrogateescape") as f:
        for line in f.read().splitlines():
            key, sep, value = line.partition("=")
            out.append((key.strip().lower() if sep else "", value.strip(), line))
    return out


def load(
    prefix: str,
    exclude: tuple[str, ...] = (),
    allow_editable: bool = False,
    allow_system_site_packages: bool = False,
) -> SourceEnv:
    real = os.path.realpath(prefix)
    cfg = read_cfg(prefix)
    cfg_values = {k: v for k, v, _ in cfg if k}
    system_site = cfg_values.get("include-system-site-packages", "false").lower() == "true"
    if system_site and not allow_system_site_packages:
        raise SourceEnvError(
            f"{prefix} sees the system site-packages (include-system-site-packages = true), which will "
            "not exist where the crate is unpacked; recreate the venv without it or pass "
            "--allow-system-site-packages"
        )

    site_dirs = sorted(Path(prefix).glob("lib/*/site-packages"))
    editable = editable_installs(site_dirs, prefix, real, allow_editable)
    python = env_python(prefix)  # answers while the env is walked
    base_links: list[dict] = []
    source = SourceEnv(
        kind="venv",
        prefix=prefix,
        real_prefix=real,
        found=[],
        pins=[p for d in site_dirs for p in dist_pins(d)],
        python={},
        extra={
            "venv": {
                "base_links": base_links,
                "cfg": {k: v for k, v in cfg_values.items() if k in RELOCATED_CFG_KEYS},
            }
        },
        flags={"editable": editable, "system_site_packages": system_site},
    )

    def entries() -> Iterator[Entry]:
        for entry in iter_walk(prefix, real, exclude):
            if entry.path.startswith("bin/") and entry.path.count("/") == 1:
                name = entry.path[4:]
                if entry.type == "l" and entry.target == "" and _INTERPRETER_NAME.match(name):
                    base_links.append(
                        {"path": entry.path, "kind": "link", "target": os.readlink(entry.source)}
                    )
                    continue
                if entry.type == "f" and _INTERPRETER_NAME.match(name) and _is_elf(entry.source):
                    base_links.append({"path": entry.path, "kind": "copy"})
                    continue
            refuse_outside_link(entry)
            if entry.path == "pyvenv.cfg":
                entry.loader = _cfg_loader(cfg)
                entry.scan = False
            elif entry.path.endswith(".pyc") and "/__pycache__/" in entry.path:
                entry.pyc = True
                entry.scan = False
            yield entry
        source.python = _python_info(prefix, python(), cfg_values, site_dirs)

    source.walking = entries()
    return source


def _is_elf(path: str | None) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _cfg_loader(cfg: list[tuple[str, str, str]]):
    def load() -> bytes:
        kept = [raw for key, _, raw in cfg if key not in RELOCATED_CFG_KEYS]
        return ("\n".join(kept) + "\n").encode("utf-8", "surrogateescape")

    return load


def _python_info(
    prefix: str, found: dict | None, cfg: dict[str, str], site_dirs: list[Path]
) -> dict:
    if found is not None:
        return found
    # The base interpreter is gone or broken: read what pyvenv.cfg and lib/ say.
    version = cfg.get("version") or cfg.get("version_info") or ""
    m = re.match(r"(\d+\.\d+(\.\d+)?)", version)
    lib = site_dirs[0].parent.name if site_dirs else ""
    if not m:
        m = re.match(r"python(\d+\.\d+)", lib)
    if not m:
        raise SourceEnvError(
            f"cannot tell the Python version of {prefix}: its bin/python does not run and pyvenv.cfg "
            "has no version; repair the venv and pack again"
        )
    return {
        "implementation": (cfg.get("implementation") or "cpython").lower(),
        "version": m.group(1),
        "abiflags": "t" if lib.endswith("t") else "",
        "soabi": "",
    }
