"""Rewriting an extracted crate for the prefix it will live at.

Text files: plain replacement of the placeholder (for venvs, the original
prefix). Binary files: as conda does it, the placeholder is replaced inside
each NUL-terminated string, which is padded with NULs so the file keeps its
length; a new prefix longer than the placeholder is an error naming the file
and the longest prefix that fits. Shebangs that would exceed 127 bytes use
pip's ``/bin/sh`` trampoline. For venvs, the base-interpreter links and the
interpreter lines of ``pyvenv.cfg`` are recreated for the chosen interpreter.

``root`` is where the files are now (a temporary directory); ``prefix`` is
where they will be used from once renamed into place.
"""

import os
import re
import shutil

from ..crate.manifest import Manifest
from ..errors import RelocationError, UnsafeArchiveError
from ..fsutil import write_all
from .compat import Interpreter

MAX_SHEBANG = 127


def relocate(
    root: str, prefix: str, manifest: "Manifest", interpreter: "Interpreter | None"
) -> None:
    new = prefix.encode("utf-8", "surrogateescape")
    # Longest placeholder first, so a longer spelling is not half-replaced by
    # a shorter one; then in the spec's order, whatever the list's.
    records = sorted(
        manifest.prefix_files,
        key=lambda r: (-len(r["placeholder"]), r["path"], r["placeholder"], r["mode"]),
    )
    for rec in records:
        path = _member_path(root, rec["path"])
        old = rec["placeholder"].encode("utf-8", "surrogateescape")
        with open(path, "rb") as f:
            data = f.read()
        if rec.get("mode") == "binary":
            out = binary_replace(data, old, new, rec["path"])
        else:
            out = data.replace(old, new)
            if out.startswith(b"#!"):
                out = fix_shebang(out)
        if out != data:
            _rewrite(path, out)
    if manifest.kind == "venv" and interpreter is not None:
        _repoint_venv(root, prefix, manifest, interpreter)


def _member_path(root: str, rel: str) -> str:
    """The path of a file the manifest lists for relocation: a file of the
    crate's table (checked before extraction, see :mod:`envcrate.crate.tree`),
    which no link lies above."""
    path = os.path.join(root, rel)
    if not os.path.isfile(path) or os.path.islink(path):
        raise UnsafeArchiveError(
            f"{rel} is listed for relocation but is not a regular file of the crate"
        )
    return path


def _rewrite(path: str, data: bytes) -> None:
    import tempfile

    mode = os.lstat(path).st_mode & 0o777
    # A name of its own beside the file (a crate may list any name).
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".envcrate-")
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def binary_replace(data: bytes, old: bytes, new: bytes, name: str = "") -> bytes:
    if len(new) > len(old):
        if old not in data:
            return data
        raise RelocationError(
            f"{name} embeds its prefix in binary form, which can only be replaced by a path of at most "
            f"{len(old)} bytes; {new.decode(errors='replace')} has {len(new)}: choose a shorter destination"
        )
    pat = re.compile(re.escape(old) + b"([^\0]*?)\0")

    def sub(m: "re.Match") -> bytes:
        count = m.group().count(old)
        return m.group().replace(old, new) + b"\0" * ((len(old) - len(new)) * count)

    out = pat.sub(sub, data)
    assert len(out) == len(data)
    return out


_PYTHON_SHEBANG = re.compile(rb"^#!(\S*/(?:python|pypy)[0-9.]*t?)(\s.*)?$")


def fix_shebang(data: bytes) -> bytes:
    """Use pip's ``/bin/sh`` trampoline where a python shebang is too long
    for older kernels (127 bytes)."""
    end = data.find(b"\n")
    line = data if end < 0 else data[:end]
    if len(line) <= MAX_SHEBANG:
        return data
    m = _PYTHON_SHEBANG.match(line)
    if not m:
        return data
    exe = m.group(1)
    args = (m.group(2) or b"").strip()
    quoted = b"'" + exe.replace(b"'", b"'\\''") + b"'"
    trampoline = (
        b"#!/bin/sh\n'''exec' "
        + quoted
        + (b" " + args if args else b"")
        + b' "$0" "$@"\n'
        + b"' '''"
    )
    return trampoline + (b"" if end < 0 else data[end:])


def _repoint_venv(root: str, prefix: str, manifest: "Manifest", it: "Interpreter") -> None:
    venv = manifest.venv
    for link in venv.get("base_links", []):
        path = os.path.join(root, link["path"])
        if os.path.lexists(path):
            raise UnsafeArchiveError(
                f"{link['path']} exists in the crate but is a base-interpreter link"
            )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if link["kind"] == "copy":
            shutil.copyfile(it.executable, path)
            os.chmod(path, 0o755)
        else:
            os.symlink(it.executable, path)
    old_cfg = venv.get("cfg", {})
    new_values = {
        "home": os.path.dirname(it.executable),
        "executable": os.path.realpath(it.executable),
        "base-prefix": it.base_prefix,
        "base-exec-prefix": it.base_exec_prefix,
        "base-executable": it.executable,
    }
    if "command" in old_cfg:
        # What created the env, as venv writes it; made from the interpreter
        # and the prefix alone (the manifest's own line is a hint at most).
        new_values["command"] = f"{it.executable} -m venv {prefix}"
    cfg_path = os.path.join(root, "pyvenv.cfg")
    if not os.path.isfile(cfg_path) or os.path.islink(cfg_path):
        raise RelocationError("the venv crate has no pyvenv.cfg; it was not packed from a venv")
    with open(cfg_path, encoding="utf-8", errors="surrogateescape") as f:
        kept = f.read().splitlines()
    head = [f"home = {new_values['home']}"] if "home" in old_cfg else []
    tail = [f"{k} = {new_values[k]}" for k in old_cfg if k != "home" and k in new_values]
    text = "\n".join(head + kept + tail) + "\n"
    _rewrite(cfg_path, text.encode("utf-8", "surrogateescape"))
