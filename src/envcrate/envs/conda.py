"""Reading a conda environment (conda, mamba, micromamba, pixi) into entries and pins.

conda-pack's reader of package records does the conda part (``paths.json``
or ``has_prefix``, noarch python remapping); this module puts its answer on
top of envcrate's own walk of the prefix. What is archived differs from the
env on disk in these places, so that the crate id does not depend on where
the env was built:

- files managed by conda are archived as the package cache holds them, with
  their prefix placeholders (the manifest lists each placeholder and whether
  it is replaced as text or in binary form);
- ``conda-meta/*.json`` records are archived without the paths of the
  package cache (``link.source``, ``extracted_package_dir``,
  ``package_tarball_full_path``) and without the digest and size that files
  with a placeholder had in the original prefix (``sha256_in_prefix``,
  ``size_in_bytes`` in ``paths_data``);
- timestamp ``.pyc`` files become unchecked-hash pycs, as for venvs.

Files not managed by conda (pip installs, files written later) are archived
as they are and scanned for the env's prefix.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
from pathlib import Path

from ..crate.entry import Entry
from ..errors import SourceEnvError
from .base import (
    SourceEnv,
    as_bytes,
    inside,
    matches_any,
    prefix_spellings,
    refuse_outside_link,
    walk,
)
from .dists import dist_pins, editable_installs, env_python
from .venv import unplace

# Top-level names of a conda installation that are not part of an env (as
# conda-pack skips them), and the shims old condas leave in child envs.
_NOT_ENV = {
    "pkgs",
    "envs",
    "conda-bld",
    ".conda_lock",
    "users",
    "conda-recipes",
    ".index",
    ".unionfs",
    ".nonadmin",
}
_SHIMS = {"bin/conda", "bin/activate", "bin/deactivate"}
_HOST_FIELDS = ("extracted_package_dir", "package_tarball_full_path")


def load(
    prefix: str,
    exclude: tuple[str, ...] = (),
    allow_editable: bool = False,
    allow_missing_files: bool = False,
    allow_missing_cache: bool = False,
) -> SourceEnv:
    from conda_pack import core as conda_pack

    real = os.path.realpath(prefix)
    env_prefixes = (prefix.rstrip("/"), real.rstrip("/"))
    records = _records(prefix)
    python = env_python(prefix)
    site = conda_pack.find_site_packages(prefix)  # lib/pythonX.Y/site-packages or None
    walked = walk(prefix, real, exclude)
    on_disk = {e.path: e for e in walked}

    managed: dict[str, object] = {}  # target -> conda_pack File
    missing: list[str] = []
    uncached: list[str] = []
    for info in records:
        label = _label(info)
        source = _package_dir(info, prefix)
        if source is None:
            uncached.append(label)
            continue
        if info.get("noarch") == "python" or conda_pack.read_noarch_type(source) == "python":
            if site is None:
                raise SourceEnvError(
                    f"{prefix} has the noarch python package {label} but no python package"
                )
        files = conda_pack.load_managed_package(
            dict(info, link={"source": source}), prefix, site, on_disk
        )
        gone = [
            f.target
            for f in files
            if f.target not in on_disk and not (exclude and matches_any(f.target, exclude))
        ]
        if gone:
            missing.append(_listing(label, "deleted", gone))
        for f in files:
            managed[f.target] = f

    if uncached and not allow_missing_cache:
        raise SourceEnvError(
            "the package cache no longer holds these packages, so their prefix placeholders "
            f"cannot be found: {', '.join(uncached)}; reinstall them (conda/mamba install "
            "--force-reinstall) or pass --allow-missing-cache to pack their files as they are "
            "in the env (relocatable only to a prefix no longer than this one)"
        )

    entries: list[Entry] = []
    overwritten: dict[str, list[str]] = {}
    owner = _owners(records)
    spellings = as_bytes(prefix_spellings(prefix, real))
    placed: set[str] = set()
    for entry in walked:
        top = entry.path.split("/", 1)[0]
        f = managed.get(entry.path)
        if f is None and (top in _NOT_ENV or entry.path in _SHIMS):
            continue
        refuse_outside_link(entry)
        if entry.type == "f":
            if f is not None and inside(f.source, env_prefixes) is None:
                if not _from_package(entry, f):
                    overwritten.setdefault(owner.get(entry.path, "?"), []).append(entry.path)
            if entry.path.startswith("conda-meta/") and entry.path.endswith(".json"):
                entry.loader = _record_loader(entry.source)
                entry.scan = False
            elif entry.path.endswith(".pyc") and "/__pycache__/" in entry.path:
                entry.pyc = True
                entry.scan = False
            if (
                f is None and entry.path not in owner
            ):  # no package's: pip's, pycs compiled at install
                unplace(entry, spellings, placed)
        entries.append(entry)

    for pkg, paths in sorted(overwritten.items()):
        missing.append(_listing(pkg, "overwritten", paths))
    if missing and not allow_missing_files:
        raise SourceEnvError(
            "files managed by conda were deleted or overwritten (often by pip): "
            + "; ".join(missing)
            + "; repair the env (conda install --force-reinstall those packages) or pass "
            "--allow-missing-files to pack the env as it is"
        )

    site_dirs = [Path(prefix, site)] if site and os.path.isdir(os.path.join(prefix, site)) else []
    editable = editable_installs(site_dirs, prefix, real, allow_editable)
    return SourceEnv(
        kind="conda",
        prefix=prefix,
        real_prefix=real,
        found=entries,
        pins=[_conda_pin(info) for info in records] + _pip_pins(site_dirs, site, managed),
        python=_python(python(), records),
        extra={"conda": {"site_packages": site}},
        flags={
            "editable": editable,
            "missing_files": missing,
            "missing_cache": uncached,
        },
    )


def _records(prefix: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(prefix), "conda-meta", "*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise SourceEnvError(
                f"cannot read the conda record {path} ({e}); repair the env"
            ) from None
        if isinstance(info, dict) and info.get("name"):
            out.append(info)
    return out


def _label(info: dict) -> str:
    return f"{info.get('name')} {info.get('version')}"


def _owners(records: list[dict]) -> dict[str, str]:
    return {path: _label(info) for info in records for path in info.get("files") or ()}


def _listing(label: str, what: str, paths: list[str]) -> str:
    paths = sorted(paths)
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    return f"{label}: {what} {', '.join(paths[:3])}{more}"


def _from_package(entry: Entry, f) -> bool:
    """Point ``entry`` at the package cache's copy of its file; False when
    the env's file is not that file (overwritten), which is left as it is."""
    try:
        st = os.lstat(f.source)
    except OSError:
        return True  # the cache lacks this one file: pack the env's copy
    if not stat.S_ISREG(st.st_mode):
        return True
    placeholder = f.prefix_placeholder if f.file_mode in ("text", "binary") else None
    if placeholder is None and st.st_size != entry.size:
        return False
    entry.source = f.source
    entry.size = st.st_size
    entry.scan = False
    if placeholder:
        entry.placeholder = placeholder
        entry.placeholder_mode = f.file_mode
    return True


def _package_dir(info: dict, prefix: str) -> str | None:
    """The extracted package in a package cache that the record came from
    (conda and rattler record it; pixi's records may not, so the usual
    package caches are searched by file name)."""
    candidates = [(info.get("link") or {}).get("source"), info.get("extracted_package_dir")]
    fn = info.get("fn") or ""
    stem = re.sub(r"(\.conda|\.tar\.bz2)$", "", fn)
    if stem:
        candidates += [os.path.join(d, stem) for d in package_caches(prefix)]
    for c in candidates:
        if c and os.path.isdir(os.path.join(c, "info")):
            return c
    return None


def package_caches(prefix: str) -> list[str]:
    """Package cache directories to look in, most specific first."""
    dirs = [d for d in os.environ.get("CONDA_PKGS_DIRS", "").split(",") if d]
    dirs += _condarc_list("pkgs_dirs")
    parent = os.path.dirname(prefix.rstrip("/"))
    if os.path.basename(parent) == "envs":
        dirs.append(os.path.join(os.path.dirname(parent), "pkgs"))
    dirs.append(os.path.join(prefix, "pkgs"))
    home = os.path.expanduser("~")
    dirs += [
        os.path.join(home, ".conda", "pkgs"),
        os.path.join(os.environ.get("RATTLER_CACHE_DIR", ""), "pkgs")
        if os.environ.get("RATTLER_CACHE_DIR")
        else os.path.join(home, ".cache", "rattler", "cache", "pkgs"),
        os.path.join(os.environ.get("MAMBA_ROOT_PREFIX", os.path.join(home, "micromamba")), "pkgs"),
    ]
    return [os.path.expanduser(d) for d in dict.fromkeys(dirs)]


def condarc_files() -> list[str]:
    """conda's configuration files, in the order conda reads them."""
    home = os.path.expanduser("~")
    out = [
        "/etc/conda/.condarc",
        "/etc/conda/condarc",
        "/var/lib/conda/.condarc",
        "/var/lib/conda/condarc",
    ]
    root = os.environ.get("CONDA_ROOT") or os.environ.get("MAMBA_ROOT_PREFIX")
    if root:
        out.append(os.path.join(root, ".condarc"))
    out += [
        os.path.join(home, ".config", "conda", ".condarc"),
        os.path.join(home, ".conda", ".condarc"),
        os.path.join(home, ".condarc"),
        os.path.join(home, ".mambarc"),
    ]
    if os.environ.get("CONDARC"):
        out.append(os.environ["CONDARC"])
    return out


def _condarc_list(key: str) -> list[str]:
    """The entries of a top-level list ``key`` in the condarc files (the
    block form ``key:\\n  - a`` and the flow form ``key: [a, b]``), without
    a YAML parser."""
    out: list[str] = []
    for path in condarc_files():
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        inside = False
        for line in lines:
            if line.startswith(key + ":"):
                rest = line[len(key) + 1 :].split("#", 1)[0].strip()
                if rest.startswith("["):
                    out += [_unquote(x) for x in rest.strip("[]").split(",") if x.strip()]
                inside = not rest
            elif inside:
                item = line.split("#", 1)[0].strip()
                if item.startswith("- "):
                    out.append(_unquote(item[2:]))
                elif item:
                    inside = False
    return [os.path.expandvars(os.path.expanduser(d)) for d in out]


def _unquote(text: str) -> str:
    return text.strip().strip("'\"")


def find_named(name: str) -> str:
    """The prefix of the conda env called ``name``, found as conda would,
    without running conda: ``envs_dirs`` of the configuration,
    ``$CONDA_ENVS_PATH``, the root installs' ``envs/``, and the envs conda
    registered in ``~/.conda/environments.txt``."""
    dirs = [d for d in os.environ.get("CONDA_ENVS_PATH", "").split(os.pathsep) if d]
    dirs += _condarc_list("envs_dirs")
    for var in ("CONDA_ROOT", "MAMBA_ROOT_PREFIX", "CONDA_PREFIX"):
        root = os.environ.get(var)
        if root:
            dirs.append(os.path.join(root, "envs"))
    home = os.path.expanduser("~")
    dirs.append(os.path.join(home, ".conda", "envs"))
    for d in dict.fromkeys(dirs):
        candidate = os.path.join(os.path.expanduser(d), name)
        if os.path.isdir(os.path.join(candidate, "conda-meta")):
            return candidate
    registered = []
    try:
        with open(os.path.join(home, ".conda", "environments.txt"), encoding="utf-8") as f:
            registered = [line.strip() for line in f if line.strip()]
    except OSError:
        pass
    for path in registered:
        if os.path.basename(path.rstrip("/")) == name and os.path.isdir(
            os.path.join(path, "conda-meta")
        ):
            return path
    raise SourceEnvError(
        f"no conda env named {name!r} in {', '.join(dict.fromkeys(dirs))} or "
        "~/.conda/environments.txt; pass the env's path instead"
    )


def _record_loader(path: str):
    def load() -> bytes:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        for key in _HOST_FIELDS:
            if key in info:
                info[key] = ""
        if isinstance(info.get("link"), dict) and "source" in info["link"]:
            info["link"]["source"] = ""
        for rec in (info.get("paths_data") or {}).get("paths") or ():
            if isinstance(rec, dict) and rec.get("prefix_placeholder"):
                # Digest and size of the file as it was in the original prefix.
                rec.pop("sha256_in_prefix", None)
                rec.pop("size_in_bytes", None)
        return json.dumps(info, indent=1, sort_keys=True).encode() + b"\n"

    return load


def _conda_pin(info: dict) -> dict:
    pin = {"kind": "conda"}
    for key in ("name", "version", "build", "build_number", "channel", "subdir", "url", "fn"):
        if info.get(key) is not None:
            pin[key] = info[key]
    for key in ("md5", "sha256"):
        if info.get(key):
            pin[key] = info[key]
    return pin


def _pip_pins(site_dirs: list[Path], site: str | None, managed: dict) -> list[dict]:
    """Distributions in site-packages (``site_dirs``: the one at ``site``,
    when it exists) that conda did not install."""
    if not site_dirs:
        return []
    conda_dirs = {
        t.split("/", 4)[3] for t in managed if t.startswith(site + "/") and t.count("/") > 3
    }
    return dist_pins(site_dirs[0], skip=conda_dirs.__contains__)


def _python(found: dict | None, records: list[dict]) -> dict:
    if found is not None:
        return found
    for info in records:
        if info.get("name") in ("python", "pypy"):
            return {
                "implementation": "pypy" if info["name"] == "pypy" else "cpython",
                "version": info.get("version", ""),
                "abiflags": "",
                "soabi": "",
            }
    return {}
