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

import _imp
import json
import os
import re
import subprocess
from pathlib import Path

from ..entry import Entry
from ..errors import SourceEnvError
from ..fsutil import read_file
from .base import SourceEnv, walk

RELOCATED_CFG_KEYS = (
    "home",
    "executable",
    "command",
    "base-prefix",
    "base-exec-prefix",
    "base-executable",
)
_INTERPRETER_NAME = re.compile(r"^(python|pypy|𝜋thon)(\d+(\.\d+)?)?t?$")

_PYTHON_INFO = (
    "import json, sys, sysconfig;"
    "print(json.dumps({'implementation': sys.implementation.name,"
    "'version': '%d.%d.%d' % sys.version_info[:3],"
    "'abiflags': getattr(sys, 'abiflags', ''),"
    "'soabi': sysconfig.get_config_var('SOABI') or ''}))"
)


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

    entries: list[Entry] = []
    base_links: list[dict] = []
    for entry in walk(prefix, real, exclude):
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
        if entry.type == "l" and entry.target == "":
            raise SourceEnvError(
                f"{entry.path} is a link to {os.readlink(entry.source)}, outside the env; "
                f"remove it or pack without it: --exclude '{entry.path}'"
            )
        if entry.path == "pyvenv.cfg":
            entry.loader = _cfg_loader(cfg)
            entry.scan = False
        elif entry.path.endswith(".pyc") and "/__pycache__/" in entry.path:
            entry.loader = _pyc_loader(entry.source)
            entry.scan = False
        entries.append(entry)

    site_dirs = sorted(Path(prefix).glob("lib/*/site-packages"))
    editable = _editable_installs(site_dirs, prefix, real)
    if editable and not allow_editable:
        raise SourceEnvError(
            "editable or out-of-env installs will not exist where the crate is unpacked: "
            + "; ".join(editable)
            + "; install them normally or pass --allow-editable"
        )
    return SourceEnv(
        kind="venv",
        prefix=prefix,
        real_prefix=real,
        entries=entries,
        pins=[p for d in site_dirs for p in _pins(d)],
        python=_python_info(prefix, cfg_values, site_dirs),
        extra={
            "venv": {
                "base_links": base_links,
                "cfg": {k: v for k, v in cfg_values.items() if k in RELOCATED_CFG_KEYS},
            }
        },
        flags={"editable": editable, "system_site_packages": system_site},
    )


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


def _pyc_loader(path: str):
    """Rewrite a timestamp pyc as an unchecked-hash pyc; drop it when stale."""

    def load() -> bytes | None:
        data, _ = read_file(path)
        if len(data) < 16:
            return data
        flags = int.from_bytes(data[4:8], "little")
        if flags & 1:  # already hash-based: make it unchecked
            return data[:4] + b"\x01\0\0\0" + data[8:]
        cache_dir, base = os.path.split(path)
        source = os.path.join(os.path.dirname(cache_dir), base.split(".", 1)[0] + ".py")
        try:
            code, st = read_file(source)
        except OSError:
            return data  # sourceless: leave as is
        if data[8:12] != (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") or data[12:16] != (
            len(code) & 0xFFFFFFFF
        ).to_bytes(4, "little"):
            return None  # stale: the interpreter would not have used it either
        # The pyc's own magic number keys the hash, as importlib does.
        return (
            data[:4]
            + b"\x01\0\0\0"
            + _imp.source_hash(int.from_bytes(data[:4], "little"), code)
            + data[16:]
        )

    return load


def _editable_installs(site_dirs: list[Path], prefix: str, real: str) -> list[str]:
    found = []
    inside = (prefix.rstrip("/") + "/", real.rstrip("/") + "/")
    for site in site_dirs:
        for p in sorted(site.iterdir()):
            name = p.name
            if name.startswith("__editable__") and name.endswith((".pth", "_finder.py")):
                if name.endswith(".pth"):
                    found.append(f"{_dist_of_editable(name)} (PEP 660 editable, {name})")
            elif name.endswith(".egg-link"):
                found.append(f"{name[: -len('.egg-link')]} (egg-link)")
            elif name.endswith(".pth"):
                for line in p.read_text(errors="replace").splitlines():
                    line = line.strip()
                    if not line or line.startswith(("#", "import ", "import\t")):
                        continue
                    if os.path.isabs(line) and not (line + "/").startswith(inside):
                        found.append(f"{name} (adds {line}, outside the env)")
            elif name.endswith(".dist-info"):
                direct = p / "direct_url.json"
                if direct.is_file():
                    try:
                        info = json.loads(direct.read_text())
                    except ValueError:
                        continue
                    if (info.get("dir_info") or {}).get("editable"):
                        found.append(f"{_dist_name(p)} (editable from {info.get('url', '?')})")
    return found


def _dist_of_editable(name: str) -> str:
    core = name[len("__editable__") :].lstrip("_.").rsplit(".pth", 1)[0]
    return core.split("-", 1)[0]


def _metadata(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, sep, value = line.partition(":")
                if sep and key in ("Name", "Version") and key not in out:
                    out[key] = value.strip()
    except OSError:
        pass
    return out


def _dist_name(dist_info: Path) -> str:
    return _metadata(dist_info / "METADATA").get("Name") or dist_info.name.split("-", 1)[0]


def _pins(site: Path) -> list[dict]:
    pins = []
    for p in sorted(site.iterdir()):
        if p.name.endswith(".dist-info"):
            meta = _metadata(p / "METADATA")
        elif p.name.endswith(".egg-info"):
            meta = _metadata(p / "PKG-INFO" if p.is_dir() else p)
        else:
            continue
        if not meta.get("Name"):
            continue
        pin = {
            "kind": "pypi",
            "name": meta["Name"],
            "version": meta.get("Version", ""),
            "source": {"type": "index"},
        }
        installer = p / "INSTALLER"
        if installer.is_file():
            pin["installer"] = installer.read_text(errors="replace").strip()
        direct = p / "direct_url.json"
        if direct.is_file():
            try:
                pin["source"] = _source_of(json.loads(direct.read_text()))
            except ValueError:
                pass
        pins.append(pin)
    return pins


def _source_of(direct: dict) -> dict:
    url = direct.get("url", "")
    if "vcs_info" in direct:
        vcs = direct["vcs_info"]
        return {"type": "vcs", "url": url, "vcs": vcs.get("vcs"), "commit": vcs.get("commit_id")}
    source: dict = {"type": "local" if url.startswith("file:") else "url", "url": url}
    archive = direct.get("archive_info") or {}
    hashes = dict(archive.get("hashes") or {})
    if not hashes and "=" in archive.get("hash", ""):
        algo, _, value = archive["hash"].partition("=")
        hashes[algo] = value
    if hashes:
        source["hashes"] = hashes
    if (direct.get("dir_info") or {}).get("editable"):
        source["editable"] = True
    return source


def _python_info(prefix: str, cfg: dict[str, str], site_dirs: list[Path]) -> dict:
    try:
        out = subprocess.run(
            [os.path.join(prefix, "bin", "python"), "-I", "-c", _PYTHON_INFO],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode == 0:
            return json.loads(out.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
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
