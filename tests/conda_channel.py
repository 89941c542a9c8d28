"""Real conda packages, a local channel and environments installed from it.

Conda channels cannot be reached from the test machines, so the tests build
their own packages (``.conda``: a stored zip of two zstd tarballs), index a
channel with py-rattler and install environments from it with py-rattler,
offline. Also used by ``bench/bench_conda.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import shutil
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

# The usual conda-build placeholder is 255 characters long; rattler refuses to
# install into a prefix longer than a binary placeholder.
PLACEHOLDER = ("/opt/conda-bld/envcrate_1700000000000/_h_env_" + "placehold_" * 30)[:255]
SUBDIR = "linux-64"


@dataclass
class Pkg:
    """A conda package to build: ``files`` maps a path to bytes (a file), or
    to ``("link", target)``; ``placeholders`` maps a path to "text" or
    "binary" (the file embeds :data:`PLACEHOLDER`)."""

    name: str
    version: str = "1.0"
    build: str = "0"
    files: dict = field(default_factory=dict)
    placeholders: dict = field(default_factory=dict)
    executables: set = field(default_factory=set)
    depends: list = field(default_factory=list)
    noarch_python: bool = False
    mtimes: dict = field(default_factory=dict)  # path -> mtime (default: a fixed one)

    @property
    def subdir(self) -> str:
        return "noarch" if self.noarch_python else SUBDIR

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.build}.conda"


def _tar_zst(members: list[tuple[str, object, int]], mtimes: dict | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content, mode in members:
            info = tarfile.TarInfo(name)
            info.mtime = (mtimes or {}).get(name, 1_700_000_000)
            if isinstance(content, tuple):
                info.type = tarfile.SYMTYPE
                info.linkname = content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                info.mode = mode
                tar.addfile(info, io.BytesIO(content))
    return zstandard.ZstdCompressor(level=1).compress(raw.getvalue())


def build(pkg: Pkg, channel: Path) -> Path:
    """Write ``pkg`` as a ``.conda`` file into ``channel/<subdir>/``."""
    paths, members = [], []
    for path in sorted(pkg.files):
        content = pkg.files[path]
        mode = 0o755 if path in pkg.executables else 0o644
        members.append((path, content, mode))
        if isinstance(content, tuple):
            paths.append({"_path": path, "path_type": "softlink", "size_in_bytes": 0})
            continue
        rec = {
            "_path": path,
            "path_type": "hardlink",
            "sha256": hashlib.sha256(content).hexdigest(),
            "size_in_bytes": len(content),
        }
        if path in pkg.placeholders:
            rec["file_mode"] = pkg.placeholders[path]
            rec["prefix_placeholder"] = PLACEHOLDER
        paths.append(rec)
    index = {
        "name": pkg.name,
        "version": pkg.version,
        "build": pkg.build,
        "build_number": 0,
        "depends": pkg.depends,
        "license": "BSD-3-Clause",
        "subdir": pkg.subdir,
        "timestamp": 1_700_000_000_000,
    }
    if pkg.noarch_python:
        index["noarch"] = "python"
    else:
        index.update(platform="linux", arch="x86_64")
    info = {
        "info/index.json": json.dumps(index, indent=2).encode(),
        "info/paths.json": json.dumps({"paths": paths, "paths_version": 1}, indent=2).encode(),
        "info/files": "".join(p + "\n" for p in sorted(pkg.files)).encode(),
    }
    if pkg.placeholders:
        info["info/has_prefix"] = "".join(
            f"{PLACEHOLDER} {mode} {path}\n" for path, mode in sorted(pkg.placeholders.items())
        ).encode()
    if pkg.noarch_python:
        info["info/link.json"] = json.dumps(
            {"noarch": {"type": "python"}, "package_metadata_version": 1}
        ).encode()
    stem = pkg.filename[: -len(".conda")]
    out = channel / pkg.subdir / pkg.filename
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("metadata.json", json.dumps({"conda_pkg_format_version": 2}))
        z.writestr(f"pkg-{stem}.tar.zst", _tar_zst(members, pkg.mtimes))
        z.writestr(f"info-{stem}.tar.zst", _tar_zst([(k, v, 0o644) for k, v in info.items()]))
    return out


def index(channel: Path) -> None:
    import rattler.index

    (channel / "noarch").mkdir(parents=True, exist_ok=True)
    (channel / SUBDIR).mkdir(parents=True, exist_ok=True)
    asyncio.run(rattler.index.index_fs(channel, force=True))


def install(channel: Path, prefix: Path, specs: list[str], pkgs_dir: Path) -> Path:
    """Solve ``specs`` against ``channel`` and install them into ``prefix``
    (rattler hardlinks from the package cache ``pkgs_dir``)."""
    import rattler

    async def go():
        records = await rattler.solve(
            [channel.absolute().as_uri()],
            specs,
            platforms=[SUBDIR, "noarch"],
            virtual_packages=[],
        )
        await rattler.install(
            records, prefix, cache_dir=pkgs_dir, show_progress=False, execute_link_scripts=False
        )

    asyncio.run(go())
    return prefix


# --------------------------------------------------------------------------- python


_SKIP_STDLIB = re.compile(
    r"^(test|site-packages|idlelib|tkinter|turtledemo|ensurepip|lib2to3|config-[^/]*)(/|$)"
    r"|(^|/)(__pycache__|tests?)(/|$)"
)


def set_runpath(elf: bytes, runpath: bytes) -> bytes:
    """``elf`` with its DT_RUNPATH/DT_RPATH string overwritten in place by
    ``runpath`` (no longer than the old one; the rest NUL-padded)."""
    lib = sysconfig.get_config_var("LIBDIR").encode()
    start = elf.find(lib + b"\0")
    if start < 0:
        return elf
    assert len(runpath) <= len(lib)
    return elf[:start] + runpath + b"\0" * (len(lib) - len(runpath)) + elf[start + len(lib) :]


def python_package() -> Pkg:
    """A ``python`` package made from the running CPython (a shared-library
    build, as conda's python is): its interpreter, libpython and the
    standard library without tests, site-packages and the GUI parts."""
    base = Path(sys.base_prefix)
    ver = "%d.%d" % sys.version_info[:2]
    files: dict = {}
    exe = (base / "bin" / f"python{ver}").read_bytes()
    files[f"bin/python{ver}"] = set_runpath(exe, b"$ORIGIN/../lib")
    files["bin/python3"] = ("link", f"python{ver}")
    files["bin/python"] = ("link", f"python{ver}")
    libdir = Path(sysconfig.get_config_var("LIBDIR"))
    ldlib = sysconfig.get_config_var("LDLIBRARY")
    if ldlib and (libdir / ldlib).exists():
        real = (libdir / ldlib).resolve()
        files[f"lib/{real.name}"] = real.read_bytes()
        if real.name != ldlib:
            files[f"lib/{ldlib}"] = ("link", real.name)
    stdlib = base / "lib" / f"python{ver}"
    for path in sorted(stdlib.rglob("*")):
        rel = path.relative_to(stdlib).as_posix()
        if _SKIP_STDLIB.search(rel) or not path.is_file() or path.is_symlink():
            continue
        files[f"lib/python{ver}/{rel}"] = path.read_bytes()
    # An empty site-packages, as conda's python has.
    files[f"lib/python{ver}/site-packages/README.txt"] = b"site-packages\n"
    v = "%d.%d.%d" % sys.version_info[:3]
    return Pkg("python", v, "0_cpython", files, executables={f"bin/python{ver}"})


def site_packages() -> str:
    return "lib/python%d.%d/site-packages" % sys.version_info[:2]


def compile_c(source: str, out: Path) -> Path | None:
    """Build a small C program, or None where no C compiler exists."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    src = out.with_suffix(".c")
    src.write_text(source)
    import subprocess

    subprocess.run([cc, "-O1", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def placeholder_program(workdir: Path) -> bytes | None:
    """An ELF that prints a path embedding :data:`PLACEHOLDER`."""
    out = compile_c(
        '#include <stdio.h>\nstatic const char data[] = "%s/share/greeting.txt";\n'
        "int main(void) { puts(data); return 0; }\n" % PLACEHOLDER,
        workdir / "where",
    )
    return None if out is None else out.read_bytes()
