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

And the env's own path does not stay in what is archived where venvs embed
it (so one venv built at two paths packs to one crate, byte for byte, when
its directory has the same name):

- scripts in ``bin/`` (shebangs, ``activate``), ``.pth`` and ``.egg-link``
  files that name the prefix are archived with :data:`PLACEHOLDER` in its
  place, as conda packages carry theirs; relocation writes the new prefix;
- a pyc's code objects name the file they were compiled from: that name is
  archived as :data:`PLACEHOLDER` + the source's path (the import system
  sets the real name when it loads the module);
- ``RECORD`` files list a hash for each installed file; those of pycs and of
  the files above no longer match what is archived and are left empty (as
  RECORD allows), and a prefix in them becomes the placeholder too.

A prefix found anywhere else (a binary, a data file) stays in the archive
and relocation replaces it, as before: the crate id then depends on it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from ..crate.entry import Entry
from ..crate.pyc import source_of, with_filename
from ..errors import SourceEnvError
from ..fsutil import read_file
from .base import SourceEnv, as_bytes, iter_walk, prefix_spellings, refuse_outside_link
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
# What archived venv files say instead of the prefix they were built at.
PLACEHOLDER = "/envcrate-venv-prefix-placeholder"
_TEXT_MAX = 1 << 20  # scripts and .pth files larger than this are left as they are


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

    source_prefixes = prefix_spellings(prefix, real)
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
                # as hints (never trusted); the env's own path (in "command") as
                # the placeholder, so the manifest is the same wherever it was built
                "cfg": {
                    k: _replace_str(v, source_prefixes)
                    for k, v in cfg_values.items()
                    if k in RELOCATED_CFG_KEYS
                },
            }
        },
        flags={"editable": editable, "system_site_packages": system_site},
        placeholder=PLACEHOLDER,
    )

    spellings = as_bytes(source_prefixes)
    placed: set[str] = set()  # files archived with the placeholder

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
                entry.size = len(entry.loader())  # as archived (the head's room is made for it)
                entry.scan = False
            elif entry.path.endswith(".pyc") and "/__pycache__/" in entry.path:
                entry.pyc = True
                entry.scan = False
                unplace(entry, spellings, placed)
            else:
                unplace(entry, spellings, placed)
            yield entry
        source.python = _python_info(prefix, python(), cfg_values, site_dirs)

    source.walking = entries()
    return source


def unplace(entry: Entry, spellings: list[bytes], placed: set[str]) -> None:
    """Archive ``entry`` without the env's path where installers put it
    (see the module's docstring): a pyc's code file name, a script, .pth or
    .egg-link file naming the prefix, a RECORD's rows for those. Also used
    for the files of a conda env that no package installed (pip's)."""
    if entry.type != "f":
        return
    if entry.pyc:
        _name_pyc(entry, spellings)
    elif entry.size <= _TEXT_MAX:
        if entry.path.endswith(".dist-info/RECORD"):
            _normalise_record(entry, spellings, placed)
        elif (entry.path.startswith("bin/") and entry.path.count("/") == 1) or entry.path.endswith(
            (".pth", ".egg-link")
        ):
            if _place_text(entry, spellings):
                placed.add(entry.path)


class _Content:
    """An entry's archived bytes, made by the walk (which must know their
    size) and handed to the writer once; made again when asked for later
    (``identify`` before packing), or when the walk is far ahead of the
    writer: at most :data:`HELD` bytes wait in memory (a pack of 5,000 pycs
    held them all, 100 MB more)."""

    _lock = threading.Lock()
    _held = 0

    def __init__(self, data: bytes, make):
        self._make = make
        with _Content._lock:
            keep = _Content._held + len(data) <= HELD
            if keep:
                _Content._held += len(data)
        self._data = data if keep else None

    def __call__(self) -> bytes:
        data, self._data = self._data, None
        if data is None:
            return self._make()
        self._release(len(data))
        return data

    def __del__(self) -> None:  # never handed over (a pack that failed): give its share back
        if getattr(self, "_data", None) is not None:
            self._release(len(self._data))

    @staticmethod
    def _release(n: int) -> None:
        with _Content._lock:
            _Content._held -= n


HELD = 32 << 20


def _reader(entry: Entry):
    """A function that reads the file of ``entry`` as the walk found it (its
    size then: the entry's changes to the archived one)."""
    path, size = entry.source, entry.size

    def read() -> bytes:
        try:
            data, _ = read_file(path, nofollow=True)
        except OSError as e:
            raise SourceEnvError(f"cannot read {path}: {e.strerror}") from None
        if len(data) != size:
            raise SourceEnvError(f"{path} changed while it was being packed; pack again")
        return data

    return read


def _set_content(entry: Entry, data: bytes, make) -> None:
    entry.loader = _Content(data, make)
    entry.size = len(data)


def _name_pyc(entry: Entry, spellings: list[bytes]) -> None:
    """Archive the pyc with its code's file name under the placeholder. Its
    header is still rewritten where it is laid out (``entry.pyc`` stays):
    by a packing worker, which hashes the source from the frame."""
    source, read = source_of(entry.path), _reader(entry)
    # as marshal writes a str (surrogates of undecodable bytes included)
    names = [
        s.decode("utf-8", "surrogateescape").encode("utf-8", "surrogatepass") for s in spellings
    ]
    raw = read()
    named = with_filename(raw, source, PLACEHOLDER, names)
    if named is not raw:
        _set_content(entry, named, lambda: with_filename(read(), source, PLACEHOLDER, names))


def _replace_str(text: str, spellings: list[str]) -> str:
    for s in spellings:  # longest first
        text = text.replace(s, PLACEHOLDER)
    return text


def _replace(data: bytes, spellings: list[bytes]) -> bytes:
    for s in spellings:  # longest first
        data = data.replace(s, PLACEHOLDER.encode())
    # pip and uv write a /bin/sh trampoline instead of a shebang over 127
    # bytes: what they wrote depends on the build path's length, so it is
    # archived as the shebang (relocation makes a trampoline where needed)
    m = _TRAMPOLINE.match(data)
    return b"#!" + m.group(2) + b"\n" + data[m.end() :] if m else data


_TRAMPOLINE = re.compile(
    rb"\A#!/bin/sh\n'''exec' ([\"']?)("
    + re.escape(PLACEHOLDER.encode())
    + rb"/bin/[^\s\"']+)\1 \"\$0\" \"\$@\"\n' '''\n"
)


def _place_text(entry: Entry, spellings: list[bytes]) -> bool:
    """Archive a text file that names the prefix with the placeholder
    instead (relocation writes the new prefix); True if it does."""
    read = _reader(entry)
    data = read()
    if b"\0" in data or not any(s in data for s in spellings):
        return False
    _set_content(entry, _replace(data, spellings), lambda: _replace(read(), spellings))
    entry.placeholder, entry.placeholder_mode = PLACEHOLDER, "text"
    return True


def _normalise_record(entry: Entry, spellings: list[bytes], placed) -> None:
    """Empty the hash and size of RECORD rows whose files are archived with
    other bytes than were installed: pycs and the files archived with the
    placeholder (``placed``: scripts in bin/ sort before lib/)."""
    site = os.path.dirname(os.path.dirname(entry.path))
    read = _reader(entry)
    placed = frozenset(placed)  # as the walk has them now: make() gives the same bytes each time

    def make() -> bytes:
        data = read()
        lines = data.decode("utf-8", "surrogateescape").splitlines(keepends=True)
        out = [_record_row(line, site, placed) for line in lines]
        text = "".join(out).encode("utf-8", "surrogateescape")
        return _replace(text, spellings) if b"\0" not in text else text

    data = make()
    if data != read():
        _set_content(entry, data, make)
        if PLACEHOLDER.encode() in data and b"\0" not in data:
            entry.placeholder, entry.placeholder_mode = PLACEHOLDER, "text"


def _record_row(line: str, site: str, placed) -> str:
    body = line.rstrip("\r\n")
    fields = body.rsplit(",", 2)
    if len(fields) != 3 or not fields[1]:
        return line
    path = fields[0]
    if path.startswith('"'):
        import csv

        try:
            path = next(csv.reader([body]))[0]
        except (csv.Error, StopIteration, IndexError):
            return line
    rel = os.path.normpath(os.path.join(site, path))
    if path.endswith(".pyc") or rel in placed:
        return fields[0] + ",," + line[len(body) :]
    return line


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
