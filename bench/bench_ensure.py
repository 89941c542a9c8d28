"""Cold and warm `envcrate ensure` of the reference crate, side by side with
the ways people get an env onto a node today.

    python3 bench/bench_ensure.py [--rounds N] [--installs N] [--work DIR]

Publishes the reference archive (bench_store.py's, packed once) to a
directory store, then runs interleaved rounds of

- cold:  envcrate ensure ID --store DIR --cache NEW  |  tar -I zstd -xf of the same archive
- 32 concurrent cold ensures into one new cache      |  a single cold ensure
- warm:  envcrate ensure ID (the console script)     |  python -c pass

envcrate runs from a venv of its own (bench/work/tool-venv, reinstalled from
this checkout each run), as users install it, and `python -c pass` is that
venv's Python.

and, --installs times (they need the package index and take minutes):
`python -m venv` + `pip install -r <pins>` and `uv venv` + `uv pip install -r
<pins>` with a cold uv cache. Every cold run goes to a fresh directory; all
are deleted at the end. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_pack_unpack import reference_archive, timed, tool_env, tool_venv  # noqa: E402

COLD = "envcrate ensure (cold, directory store)"
TAR = "tar -I zstd -xf"
MANY = "32 concurrent cold ensure"
WARM = "envcrate ensure (warm)"
PASS = "python -c pass"
PIP = "python -m venv + pip install -r pins"
UV = "uv venv + uv pip install -r pins (cold uv cache)"


_IN_PROCESS = (
    "import sys, time, statistics, envcrate\n"
    "ref, cache = sys.argv[1], sys.argv[2]\n"
    "envcrate.ensure(ref, None, cache)\n"
    "laps = []\n"
    "for _ in range(1000):\n"
    "    t = time.perf_counter(); envcrate.ensure(ref, None, cache); laps.append(time.perf_counter() - t)\n"
    "print(statistics.median(laps) * 1000)\n"
)


def timed_many(cmd: list, n: int, env: dict) -> float:
    os.sync()  # as timed(): nobody pays for an earlier step's writeback
    start = time.perf_counter()
    procs = [
        subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, env=env)
        for _ in range(n)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"failed: {codes}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--installs", type=int, default=1, help="rounds of pip and uv installs")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    archive = reference_archive(args.work)
    from envcrate.node.unpack import read_manifest
    from envcrate.stores import open_store

    manifest = read_manifest(archive)
    env = tool_env()
    python = tool_venv(args.work, env)
    envcrate = [python.with_name("envcrate")]

    times: dict[str, list[float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="envcrate-bench-ensure-", dir=args.work))
    try:
        store = tmp / "store"
        from envcrate.stores import file_digest

        blob = file_digest(archive)
        open_store(store).publish(archive, manifest.data, "tar.zst", blob, archive.stat().st_size)
        ensure = [*envcrate, "ensure", manifest.id, "--store", store]
        warm_cache = tmp / "warm"
        subprocess.run(
            [*ensure, "--cache", warm_cache], check=True, env=env, stdout=subprocess.DEVNULL
        )
        for i in range(args.rounds):
            times.setdefault(COLD, []).append(
                timed([*ensure, "--cache", tmp / f"cold{i}"], env=env)[0]
            )
            (tmp / f"tar{i}").mkdir()
            times.setdefault(TAR, []).append(
                timed(["tar", "-I", "zstd", "-xf", archive, "-C", tmp / f"tar{i}"])[0]
            )
            times.setdefault(MANY, []).append(
                timed_many([*ensure, "--cache", tmp / f"many{i}"], 32, env)
            )
            for _ in range(10):
                times.setdefault(WARM, []).append(
                    timed([*ensure, "--cache", warm_cache], env=env)[0]
                )
                times.setdefault(PASS, []).append(timed([python, "-c", "pass"], env=env)[0])
            print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
        inproc = subprocess.run(
            [python, "-c", _IN_PROCESS, manifest.id, str(warm_cache)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        in_process_ms = float(inproc.stdout)

        pins = tmp / "pins.txt"
        out = subprocess.run(
            [*envcrate, "info", archive, "--pins"], check=True, capture_output=True, text=True
        )
        pins.write_text(out.stdout)
        uv = shutil.which("uv")
        for i in range(args.installs):
            venv = tmp / f"pip{i}"
            pip_cmd = (
                f"'{sys.executable}' -m venv '{venv}' && '{venv}/bin/pip' install -q "
                f"--no-cache-dir -r '{pins}'"
            )
            times.setdefault(PIP, []).append(timed(["sh", "-c", pip_cmd])[0])
            if uv:
                uvenv = dict(env, UV_CACHE_DIR=str(tmp / f"uvcache{i}"))
                uv_cmd = (
                    f"'{uv}' venv -q --python '{sys.executable}' '{tmp}/uv{i}' && "
                    f"VIRTUAL_ENV='{tmp}/uv{i}' '{uv}' pip install -q -r '{pins}'"
                )
                times.setdefault(UV, []).append(timed(["sh", "-c", uv_cmd], env=uvenv)[0])
            print(f"install round {i + 1}/{args.installs} done", file=sys.stderr)
    finally:
        subprocess.run(["chmod", "-R", "u+w", tmp], check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"reference crate: {manifest.data['files']['count']} files, "
        f"{manifest.file_bytes / 1e6:.0f} MB unpacked, {archive.stat().st_size / 1e6:.0f} MB archive; "
        f"{args.rounds} interleaved rounds (warm: {10 * args.rounds} runs), {args.installs} install "
        f"rounds, medians; {os.cpu_count()} cores\n"
    )
    print("| step | seconds | ratio | against |")
    print("|---|---:|---:|---|")
    rows = [
        (COLD, TAR),
        (TAR, TAR),
        (MANY, COLD),
        (WARM, PASS),
        (PASS, PASS),
        (PIP, COLD),
        (UV, COLD),
    ]
    for name, against in rows:
        if name in med and against in med:
            print(f"| {name} | {med[name]:.3f} | {med[name] / med[against]:.2f}x | {against} |")
    print(f"\nenvcrate.ensure() in-process, warm: {in_process_ms:.3f} ms (median of 1000 calls)")
    if UV in med:
        print(f"cold ensure / uv install: {med[COLD] / med[UV]:.2f}x")
    print(time.strftime("measured %Y-%m-%d", time.gmtime()))


if __name__ == "__main__":
    main()
