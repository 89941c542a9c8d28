"""Pack and unpack the reference venv, side by side with the reference tools.

    python3 bench/bench_pack_unpack.py [--rounds N] [--work DIR] [--unpack-only]

Builds the reference venv (recipes/reference-venv.sh: numpy, scipy, pandas,
matplotlib, scikit-learn, requests) once under the work directory, then runs
interleaved rounds of

- pack:   envcrate pack  |  venv-pack -o x.tar.gz  |  tar -I 'zstd -T0 -3' -cf
- unpack: envcrate unpack (extract + relocate)  |  tar -I zstd -xf  |  tar -xzf

and prints medians, ratios, archive sizes and peak memory. envcrate runs from
a venv of its own (bench/work/tool-venv, reinstalled from this checkout), as
users install it. Every extraction
goes to a fresh directory, all deleted at the end (deleting between runs
slows file creation on this machine's filesystem and would measure that).
Timings drift on shared machines: only the ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _rss import floor_note, measure  # noqa: E402

PACK = "envcrate pack"
VENV_PACK = "venv-pack -o x.tar.gz"
TAR_ZSTD = "tar -I 'zstd -T0 -3' -cf"
UNPACK = "envcrate unpack"
UNTAR_ZSTD = "tar -I zstd -xf"
UNTAR_GZ = "tar -xzf (venv-pack's)"


def timed(cmd: list, **kw) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command, started once the
    previous steps' dirty pages are written back (``sync``, not timed), so
    that no tool pays for the writeback of another's files. The command runs
    under bench/_rss.py's launcher: waited on from here, its ``ru_maxrss``
    would start at this process's own peak (see there)."""
    os.sync()
    code, elapsed, kib = measure(cmd, stdout=subprocess.DEVNULL, **kw)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(map(str, cmd))}")
    return elapsed, kib


class Results:
    """Timings (all rounds), peak RSS and archive size of each step."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.rss: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def record(self, name: str, result: tuple[float, int], archive: Path | None = None) -> None:
        self.times.setdefault(name, []).append(result[0])
        self.rss[name] = max(self.rss.get(name, 0), result[1])
        if archive is not None:
            self.sizes[name] = archive.stat().st_size


def tool_env(drop: tuple[str, ...] = ()) -> dict:
    """The environment the tools run in: no ``ENVCRATE_*`` settings (nor the
    variables starting with ``drop``), and bytecode caches allowed, as
    installed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVCRATE_", *drop))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def tool_venv(work: Path, env: dict) -> Path:
    """envcrate installed as a user installs it: a venv of its own (start-up
    then does not pay for whatever the developer's Python loads from .pth
    files), reinstalled from this checkout on every run."""
    venv = work / "tool-venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run(
        [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--force-reinstall",
            "--no-deps",
            ROOT,
        ],
        check=True,
        env=env,
    )
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", ROOT], check=True, env=env
    )
    return venv / "bin" / "python"


def ensure_reference(work: Path) -> Path:
    ref = work / "ref"
    if not (ref / "pyvenv.cfg").exists():
        print(f"building the reference venv in {ref} ...", file=sys.stderr)
        subprocess.run(["sh", str(ROOT / "recipes" / "reference-venv.sh"), str(ref)], check=True)
    return ref


def reference_archive(work: Path) -> Path:
    """The reference venv packed once (the store and cache benchmarks use it)."""
    archive = work / "ref.tar.zst"
    if not archive.exists():
        ref = ensure_reference(work)
        subprocess.run(
            [sys.executable, "-m", "envcrate.cli", "pack", ref, "-o", archive],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return archive


def du(path: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                files += 1
                size += os.lstat(p).st_size
    return files, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument(
        "--unpack-only",
        action="store_true",
        help="pack each archive once (untimed), then time only the extractions",
    )
    args = ap.parse_args()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    ref = ensure_reference(work)
    files, size = du(ref)
    runs = work / f"run-{os.getpid()}"
    runs.mkdir()
    env = tool_env()
    envcrate = [tool_venv(args.work, env).with_name("envcrate")]
    venv_pack = shutil.which("venv-pack") or "venv-pack"

    results = Results()
    record, times, rss, sizes = results.record, results.times, results.rss, results.sizes

    try:
        for i in range(args.rounds):
            d = runs / f"r{i}"
            d.mkdir()
            if not (args.unpack_only and i > 0):  # else: round 0's archives
                a = d / "envcrate.crate.tar.zst"
                record(PACK, timed([*envcrate, "pack", ref, "-o", a], env=env), a)
                v = d / "venv-pack.tar.gz"
                record(VENV_PACK, timed([venv_pack, "-p", ref, "-o", v, "-q"]), v)
                t = d / "tar.tar.zst"
                record(TAR_ZSTD, timed(["tar", "-C", ref, "-I", "zstd -T0 -3", "-cf", t, "."]), t)
            record(UNPACK, timed([*envcrate, "unpack", a, d / "u-envcrate"], env=env))
            (d / "u-tar").mkdir()
            record(UNTAR_ZSTD, timed(["tar", "-I", "zstd", "-xf", t, "-C", d / "u-tar"]))
            (d / "u-gz").mkdir()
            record(UNTAR_GZ, timed(["tar", "-xzf", v, "-C", d / "u-gz"]))
            took = ", ".join(f"{k.split(' (')[0]} {v[-1]:.2f}" for k, v in times.items())
            print(f"round {i + 1}/{args.rounds}: {took}", file=sys.stderr)
        check = subprocess.run(
            [
                runs / "r0" / "u-envcrate" / "bin" / "python",
                "-c",
                "import numpy, scipy, pandas, sklearn, matplotlib",
            ],
            capture_output=True,
            text=True,
        )
        unpacked_ok = check.returncode == 0
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"reference venv: {files} files, {size / 1e6:.0f} MB; {args.rounds} interleaved rounds, medians; 2 cores\n"
    )
    if args.unpack_only:
        print("(--unpack-only: the pack steps ran once, untimed for the comparison)\n")
    print(
        "| step | seconds | vs venv-pack | vs tar+zstd | archive MB | vs tar+zstd size | peak RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    tz = sizes[TAR_ZSTD]
    for name in (PACK, VENV_PACK, TAR_ZSTD):
        print(
            f"| {name} | {med[name]:.2f} | {med[name] / med[VENV_PACK]:.2f}x | {med[name] / med[TAR_ZSTD]:.2f}x "
            f"| {sizes[name] / 1e6:.1f} | {sizes[name] / tz:.3f}x | {rss[name] / 1024:.0f} |"
        )
    print()
    print("| step | seconds | vs tar -I zstd -xf | vs tar -xzf | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for name in (UNPACK, UNTAR_ZSTD, UNTAR_GZ):
        print(
            f"| {name} | {med[name]:.2f} | {med[name] / med[UNTAR_ZSTD]:.2f}x "
            f"| {med[name] / med[UNTAR_GZ]:.2f}x | {rss[name] / 1024:.0f} |"
        )
    print(f"\n{floor_note()}")
    print(
        f"\nunpacked reference env imports numpy, scipy, pandas, sklearn, matplotlib: {'yes' if unpacked_ok else 'NO'}"
    )


if __name__ == "__main__":
    main()
