"""Conda envs: envcrate against conda-pack, side by side in one run.

Builds (once) a reference conda env in bench/work/conda-ref: a local channel
made from the reference venv (a ``python`` package from this CPython, one
package per distribution in the venv, console scripts with a prefix
placeholder in their shebang) installed offline with py-rattler. Then, in
interleaved rounds:

- pack: ``envcrate pack`` | ``conda-pack --format tar.zst`` | ``conda-pack --format tar.gz``
  (conda-pack with ``--n-threads -1``);
- cold ensure: ``envcrate ensure ARCHIVE --cache DIR`` (extract, relocate,
  ready) | ``tar -xzf`` of conda-pack's tar.gz followed by ``conda-unpack``.

Every extraction goes to a fresh directory; all are deleted at the end.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _rss import floor_note  # noqa: E402
from bench_pack_unpack import Results, du, ensure_reference, timed, tool_env, tool_venv  # noqa: E402
from conda_channel import PLACEHOLDER, Pkg, build, index, install, python_package  # noqa: E402

PACK = "envcrate pack"
CP_ZST = "conda-pack --format tar.zst"
CP_GZ = "conda-pack --format tar.gz"
ENSURE = "envcrate ensure (cold)"
CP_UNPACK = "tar -xzf + conda-unpack"


def _dist_packages(venv: Path) -> list[Pkg]:
    """A conda package per distribution installed in ``venv``, from RECORD."""
    site = next(venv.glob("lib/python*/site-packages"))
    inside = site.relative_to(venv).as_posix()
    pkgs = []
    for dist in sorted(site.glob("*.dist-info")):
        name, version = dist.name[: -len(".dist-info")].split("-", 1)
        if name in ("pip", "setuptools"):
            continue
        files, mtimes, placeholders, executables = {}, {}, {}, set()
        with open(dist / "RECORD", newline="") as f:
            for row in csv.reader(f):
                if not row:
                    continue
                path = os.path.normpath(os.path.join(inside, row[0]))
                src = venv / path
                if path.startswith("..") or not src.is_file() or src.is_symlink():
                    continue
                data = src.read_bytes()
                if path.startswith("bin/") and data.startswith(b"#!" + str(venv).encode()):
                    data = data.replace(str(venv).encode(), PLACEHOLDER.encode(), 1)
                    placeholders[path] = "text"
                files[path] = data
                mtimes[path] = int(src.stat().st_mtime)
                if os.access(src, os.X_OK):
                    executables.add(path)
        pkgs.append(
            Pkg(
                name.lower().replace("_", "-"),
                version,
                files=files,
                placeholders=placeholders,
                executables=executables,
                depends=["python"],
                mtimes=mtimes,
            )
        )
    return pkgs


def ensure_conda_reference(work: Path) -> Path:
    env = work / "conda-ref"
    if (env / "conda-meta").is_dir():
        return env
    print(f"building the reference conda env in {env} ...", file=sys.stderr)
    venv = ensure_reference(work)
    channel = work / "conda-channel"
    shutil.rmtree(channel, ignore_errors=True)
    pkgs = [python_package(), *_dist_packages(venv)]
    for pkg in pkgs:
        build(pkg, channel)
    index(channel)
    install(channel, env, [p.name for p in pkgs], work / "conda-pkgs")
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    args = ap.parse_args()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    ref = ensure_conda_reference(work)
    files, size = du(ref)
    env = tool_env(drop=("CONDA",))
    python = tool_venv(work, env)
    envcrate = [python.with_name("envcrate")]
    conda_pack = [python.with_name("conda-pack")]
    runs = work / f"conda-run-{os.getpid()}"
    runs.mkdir()
    results = Results()
    record, times, rss, sizes = results.record, results.times, results.rss, results.sizes

    try:
        for i in range(args.rounds):
            d = runs / f"r{i}"
            d.mkdir()
            a = d / "envcrate.crate.tar.zst"
            record(PACK, timed([*envcrate, "pack", ref, "-o", a], env=env), a)
            cz = d / "cp.tar.zst"
            cmd = [*conda_pack, "-p", ref, "-q", "--n-threads", "-1", "-o"]
            record(CP_ZST, timed([*cmd, cz, "--format", "tar.zst"], env=env), cz)
            cg = d / "cp.tar.gz"
            record(CP_GZ, timed([*cmd, cg, "--format", "tar.gz"], env=env), cg)
            record(ENSURE, timed([*envcrate, "ensure", a, "--cache", d / "cache"], env=env))
            x = d / "x"
            x.mkdir()
            unpack = f"tar -xzf {cg} -C {x} && {x}/bin/python {x}/bin/conda-unpack"
            record(CP_UNPACK, timed(["sh", "-c", unpack], env=env))
            print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
        prefix = next((runs / "r0" / "cache" / "e").iterdir())
        check = subprocess.run(
            [prefix / "bin" / "python", "-c", "import numpy, scipy, pandas, sklearn, matplotlib"],
            capture_output=True,
            env={"PATH": "/usr/bin:/bin"},
        )
        ok = check.returncode == 0
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"reference conda env: {files} files, {size / 1e6:.0f} MB; {args.rounds} interleaved rounds, medians; "
        f"{os.cpu_count()} cores\n"
    )
    print("| step | seconds | vs conda-pack tar.zst | archive MB | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for name in (PACK, CP_ZST, CP_GZ):
        print(
            f"| {name} | {med[name]:.2f} | {med[name] / med[CP_ZST]:.2f}x "
            f"| {sizes[name] / 1e6:.1f} | {rss[name] / 1024:.0f} |"
        )
    print()
    print("| step | seconds | vs tar -xzf + conda-unpack | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for name in (ENSURE, CP_UNPACK):
        print(
            f"| {name} | {med[name]:.2f} | {med[name] / med[CP_UNPACK]:.2f}x | {rss[name] / 1024:.0f} |"
        )
    print(f"\n{floor_note()}")
    print(
        "\nensured conda env imports numpy, scipy, pandas, sklearn, matplotlib "
        f"(env -i PATH=/usr/bin:/bin): {'yes' if ok else 'NO'}"
    )


if __name__ == "__main__":
    main()
