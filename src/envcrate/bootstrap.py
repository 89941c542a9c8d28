"""``envcrate bootstrap``: one POSIX sh script that brings a crate to a node
without envcrate (design.md, Node side).

The story: resolve the ref in the store, say where a node finds each of the
crate's archives (the store's own path for a directory store on a shared
filesystem, the URL of an HTTP(S) store, a presigned URL of an S3 one, and
a staged copy beside the script), and write the script: the warm path in
sh (:file:`node/boot.sh`), and for the cold path envcrate's own compute side
(:data:`PAYLOAD`: :mod:`envcrate.node` and the readers it imports, the very
modules this envcrate runs) with :mod:`envcrate.node.boot` as its entry,
for the node's Python 3.6+.
"""

import base64
import json
import os
import re
import zlib
from pathlib import Path

from . import __version__
from .errors import EnvcrateError
from .ids import short_id

# The modules the script carries: everything the cold path imports on a node
# (tests/node/test_boot.py runs it under every Python 3.6 to 3.13 here with
# nothing but these; test_house checks they are 3.6-clean).
PAYLOAD = (
    "envcrate",
    "envcrate.errors",
    "envcrate.ids",
    "envcrate.fsutil",
    "envcrate.procs",
    "envcrate.progress",
    "envcrate.network",
    "envcrate.crate",
    "envcrate.crate.container",
    "envcrate.crate.extract",
    "envcrate.crate.frames",
    "envcrate.crate.head",
    "envcrate.crate.manifest",
    "envcrate.crate.plan",
    "envcrate.crate.platform",
    "envcrate.crate.reading",
    "envcrate.crate.record",
    "envcrate.crate.tar",
    "envcrate.crate.tree",
    "envcrate.crate.zstdio",
    "envcrate.node",
    "envcrate.node.activation",
    "envcrate.node.boot",
    "envcrate.node.cache",
    "envcrate.node.compat",
    "envcrate.node.ensure",
    "envcrate.node.events",
    "envcrate.node.fill",
    "envcrate.node.leases",
    "envcrate.node.lock",
    "envcrate.node.relocate",
    "envcrate.node.report",
    "envcrate.node.sources",
    "envcrate.node.unpack",
)

_ROOT = Path(__file__).resolve().parent


def module_file(name: str) -> Path:
    parts = name.split(".")[1:]
    package = _ROOT.joinpath(*parts, "__init__.py")
    return package if package.is_file() else _ROOT.joinpath(*parts[:-1], parts[-1] + ".py")


def payload() -> bytes:
    """The modules as compressed JSON: ``{name: [is_package, source]}``."""
    sources = {}
    for name in PAYLOAD:
        path = module_file(name)
        sources[name] = [path.name == "__init__.py", path.read_text(encoding="utf-8")]
    return zlib.compress(json.dumps(sources, sort_keys=True).encode(), 9)


# Run by the node's Python from the script's here-document. Python 2 and 3.5
# must be able to parse it (they exit 3, and the script tries the next
# Python): no f-strings or annotations here; the modules are compiled later.
_LOADER = '''import sys
# `python -` put the current directory first: a json.py there must not run
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
if sys.version_info < (3, 6):
    sys.exit(3)
import binascii, json, zlib
from importlib.machinery import ModuleSpec
sys.dont_write_bytecode = True
_CONFIG = json.loads(binascii.a2b_base64("@CONFIG@").decode("utf-8"))
_SOURCES = json.loads(zlib.decompress(binascii.a2b_base64("""
@PAYLOAD@
""")).decode("utf-8"))


class _Embedded:
    """envcrate's compute side, from this script (first on sys.meta_path:
    an envcrate installed on the node, of another version, is not used).
    No importlib.abc or importlib.util: they cost more to import (15 ms)
    than everything else a waiter does before it finds the crate ready."""

    def find_spec(self, name, path=None, target=None):
        if name not in _SOURCES:
            return None
        return ModuleSpec(name, self, is_package=_SOURCES[name][0])

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        package, source = _SOURCES[module.__name__]
        where = "<envcrate bootstrap>/" + module.__name__.replace(".", "/")
        module.__file__ = where + ("/__init__.py" if package else ".py")
        exec(compile(source, module.__file__, "exec"), module.__dict__)


sys.meta_path.insert(0, _Embedded())
from envcrate.node.boot import main
sys.exit(main(_CONFIG, sys.argv[1:]))
'''

_SAFE_CACHE = re.compile(r"[A-Za-z0-9_./${}@+,=: -]*")
_SAFE_WORD = re.compile(r"[A-Za-z0-9_./+-]+")


def render(config: dict, caches: "list[str]") -> str:
    """The script for ``config`` (what :func:`envcrate.node.boot.main`
    reads) and the caches to search when the node sets no
    ``$ENVCRATE_CACHE``."""
    for c in caches:
        if not _SAFE_CACHE.fullmatch(c) or "$(" in c:
            raise EnvcrateError(
                f"--cache {c!r}: a bootstrap cache may hold letters, digits, '/._-+@,=:', "
                "spaces and $VARIABLES (expanded on the node; write $HOME, not ~), nothing else"
            )
    pythons = []
    if config["kind"] == "venv":
        pythons.append("python" + ".".join(config["python_version"].split(".")[:2]))
    template = (_ROOT / "node" / "boot.sh").read_text(encoding="utf-8")
    encoded = base64.b64encode(payload()).decode()
    lines = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    loader = _LOADER.replace("@PAYLOAD@", lines).replace(
        "@CONFIG@", base64.b64encode(json.dumps(config, sort_keys=True).encode()).decode()
    )
    name = "".join(ch if ch.isprintable() else "?" for ch in str(config.get("name") or "env"))
    shown = ":".join(caches) if caches else "$XDG_CACHE_HOME/envcrate (~/.cache/envcrate)"
    values = {
        "@NAME@": name,
        "@ID@": config["id"],
        "@ID16@": config["id"].split(":", 1)[1][:16],
        "@VERSION@": __version__,
        "@CACHES_SHOWN@": shown,
        "@CACHES@": '"' + ":".join(caches) + '"' if caches else "",
        "@PYTHON@": _sq(config.get("python") or ""),
        "@REPORT@": _sq(config.get("report") or ""),
        "@PYTHONS@": " ".join(p for p in pythons if _SAFE_WORD.fullmatch(p)),
    }
    values["@LOADER@"] = loader.rstrip("\n")
    # One pass: a value (a record's name, say) is never read for placeholders.
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m.group()], template)


def _sq(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def bootstrap(
    ref: str,
    store=None,
    caches: "list[str]" = (),
    *,
    presign: "int | None" = None,
    report: "str | None" = None,
    python: "str | None" = None,
    output: "str | os.PathLike | None" = None,
    stage: bool = False,
) -> "tuple[Path, dict]":
    """Write the bootstrap script of ``ref`` (resolved in ``store``) and
    return its path and the config it carries. ``stage``: also download the
    crate's archives beside the script, where the script looks first."""
    from .stores import blob_key, open_store
    from .stores.base import archive_name

    opened = open_store(store)
    opened.check_present()
    crate_id = opened.resolve(ref)
    rec, _ = opened.listed_archive(crate_id)
    s3 = opened.url.startswith("s3://")
    if presign is not None and not opened.can_presign:
        raise EnvcrateError(f"--presign: {opened.url} hands out no URLs; use an s3:// store")
    if s3 and presign is None and not stage:
        raise EnvcrateError(
            f"{opened.url} is an S3 store: give --presign SECONDS (the node gets URLs "
            "that need no credentials), or --stage the archive beside the script"
        )
    if python is not None and not os.path.isabs(python):
        raise EnvcrateError(f"--python {python}: give the interpreter's absolute path on the node")
    out = Path(output) if output else Path(f"envcrate-boot-{short_id(crate_id)}.sh")
    if not out.parent.is_dir():
        raise EnvcrateError(f"cannot write {out}: no such directory {out.parent}")
    archives = []
    for a in rec["archives"]:
        if a["format"] not in ("tar.zst", "tar.gz") or opened.blob_state(a) == "missing":
            continue
        key = blob_key(a["blob"])
        entry = {
            "format": a["format"],
            "blob": a["blob"],
            "size": a["size"],
            "staged": archive_name(rec, crate_id, a["format"]),
            "paths": [],
            "urls": [],
        }
        if hasattr(opened, "root"):
            entry["paths"].append(str(Path(opened.root, key)))
        elif not s3 or presign is not None:
            entry["urls"].append(opened.presign(key, presign or 0))  # HTTP: the URL itself
        archives.append(entry)
    if not archives:
        raise EnvcrateError(f"{crate_id} has no archive in {opened.url} that a node can read")
    if stage:
        for a in archives:
            opened.fetch(crate_id, out.parent.resolve(), a["format"])
    config = {
        "id": crate_id,
        "name": rec.get("name"),
        "kind": rec["kind"],
        "python_version": rec["python"]["version"],
        "python": python,
        "report": report,
        "archives": archives,
        "envcrate": __version__,
    }
    text = render(config, list(caches))
    from .crate.record import atomic_write

    atomic_write(out, text.encode(), 0o755)
    return out, config
