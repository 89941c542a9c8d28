"""Python distributions installed in an env: pins and editable installs
(shared by venvs and conda envs, whose pip-installed packages look alike)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

from ..errors import SourceEnvError

_PYTHON_INFO = (
    "import json, sys, sysconfig;"
    "print(json.dumps({'implementation': sys.implementation.name,"
    "'version': '%d.%d.%d' % sys.version_info[:3],"
    "'abiflags': getattr(sys, 'abiflags', ''),"
    "'soabi': sysconfig.get_config_var('SOABI') or ''}))"
)


def env_python(prefix: str) -> Callable[[], dict | None]:
    """Start asking the env's ``bin/python`` for its implementation, version
    and ABI; the returned function waits for the answer (None when it does
    not run). Loaders start it before walking the env, which it overlaps."""
    try:
        proc = subprocess.Popen(
            [os.path.join(prefix, "bin", "python"), "-I", "-B", "-c", _PYTHON_INFO],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    except OSError:
        return lambda: None

    def answer() -> dict | None:
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
        try:
            return json.loads(out) if proc.returncode == 0 else None
        except ValueError:
            return None

    return answer


def editable_installs(
    site_dirs: list[Path], prefix: str, real: str, allowed: bool = False
) -> list[str]:
    """Editable and out-of-env installs in ``site_dirs``; an error naming them
    unless ``allowed`` (``--allow-editable``)."""
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
    if found and not allowed:
        raise SourceEnvError(
            "editable or out-of-env installs will not exist where the crate is unpacked: "
            + "; ".join(found)
            + "; install them normally or pass --allow-editable"
        )
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


def dist_pins(site: Path, skip=lambda name: False) -> list[dict]:
    """A pin per distribution in ``site`` whose metadata directory name
    ``skip`` does not reject."""
    pins = []
    for p in sorted(site.iterdir()):
        if skip(p.name):
            continue
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
