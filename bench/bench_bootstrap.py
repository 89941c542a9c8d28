"""Warm, cold and concurrent `sh boot.sh prefix` (a script made by `envcrate
bootstrap`) of the reference crate, side by side with `python -c pass` and a
cold `envcrate ensure`.

    python3 bench/bench_bootstrap.py [--rounds N] [--warm-reps N] [--work DIR]

Builds the reference venv (recipes/reference-venv.sh) once under the work
directory (reused when it is there), packs it once as tar.zst and once as
tar.gz, and pushes both to one directory store and only the tar.gz to a
second one. `envcrate bootstrap` writes a script for each store. Then it runs
interleaved rounds of

- cold: envcrate ensure ID --store DIR --cache NEW          (the reference)
        sh boot.sh prefix, ENVCRATE_CACHE=NEW:
          the zstandard module (ENVCRATE_BOOT_PYTHON=this Python)
          the zstd command     (the same, and ENVCRATE_ZSTD=command)
          tar.gz               (the same, the script of the tar.gz-only store)
  in an order that rotates by one step each round (the first round starts
  with ensure, the second with the zstandard bootstrap, ...)
- 32 concurrent cold `sh boot.sh prefix` into one new cache (all started at
  once, timed until the last exits)  |  the single cold one (zstandard) above
- warm: sh boot.sh prefix  |  python -c pass, alternating, --warm-reps of each

envcrate (ensure, bootstrap, push) runs from a venv of its own
(WORK/tool-venv, reinstalled from this checkout each run), as users install
it; the script's cold path runs under this Python (`sys.executable`, not the
pyenv shim, which is itself a shell script), which has zstandard, and
`python -c pass` is that same interpreter (and, as bench_ensure.py's, the tool
venv's Python, a third side of the warm runs). The packed archives are kept
in the work directory and reused (delete them after a format change). Each
cold run goes into a fresh cache, all deleted at the end; each timed step
starts after a `sync`. The page cache cannot be dropped on this machine: the
store's archives are read from memory by every side alike. Prints every round and a
table of medians and ratios against their targets.
"""

from __future__ import annotations

import argparse
import json
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

from bench_pack_unpack import ensure_reference, timed, tool_env, tool_venv  # noqa: E402

ENSURE = "envcrate ensure (cold)"
BOOT = "sh boot.sh prefix (cold, zstandard)"
BOOT_CMD = "sh boot.sh prefix (cold, zstd command)"
BOOT_GZ = "sh boot.sh prefix (cold, tar.gz)"
MANY = "32 concurrent cold sh boot.sh prefix"
MANY_ENSURE = "32 concurrent cold envcrate ensure"
WARM = "sh boot.sh prefix (warm)"
PASS = "python -c pass"
PASS_VENV = "tool venv's python -c pass"

# (side A, side B, target ratio A/B or None)
ROWS = [
    (WARM, PASS, 0.3),
    (WARM, PASS_VENV, 0.3),
    (BOOT, ENSURE, 1.1),
    (BOOT_CMD, ENSURE, None),
    (BOOT_GZ, ENSURE, None),
    (MANY, BOOT, 1.3),
    (MANY_ENSURE, ENSURE, None),
]

CHECK = "import numpy, scipy, pandas, sklearn, matplotlib, requests"


def nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(os.cpu_count())


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    """A setup step: its output kept, its failure reported whole."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(
            f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout\n{p.stdout}--- stderr\n{p.stderr}"
        )
    return p


def packed(envcrate: list, ref: Path, work: Path, fmt: str, env: dict) -> Path:
    """The reference venv packed once in ``fmt`` (kept in the work directory)."""
    archive = work / f"boot-ref.{fmt}"
    if not archive.exists():
        print(f"packing {archive} ...", file=sys.stderr)
        run([*envcrate, "pack", ref, "--format", fmt, "-o", archive], env=env)
    return archive


def pushed(envcrate: list, archive: Path, store: Path, env: dict) -> str:
    out = run([*envcrate, "push", archive, "--store", store, "--json"], env=env).stdout
    return json.loads(out)["id"]


def timed_many(cmd: list, n: int, env: dict) -> tuple[float, list[float]]:
    """All ``n`` started at once: wall time until the last exits, and the CPU
    seconds (user + system, with the children each waited for) of each. All
    must print the same existing prefix."""
    os.sync()  # as timed(): nobody pays for an earlier step's writeback
    start = time.perf_counter()
    procs = [
        subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, env=env) for _ in range(n)
    ]
    codes, cpu = [], []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        codes.append(p.returncode)
        cpu.append(usage.ru_utime + usage.ru_stime)
    elapsed = time.perf_counter() - start
    outs = set()
    for p in procs:
        outs.add(p.stdout.read().decode())
        p.stdout.close()
    if any(codes):
        raise SystemExit(f"concurrent runs of {cmd[:2]} failed: exit codes {codes}")
    if len(outs) != 1 or not Path(next(iter(outs)).strip()).is_dir():
        raise SystemExit(f"concurrent runs of {cmd[:2]} printed {sorted(outs)}")
    return elapsed, cpu


def check_prefix(out: str, cache: Path, what: str, env: dict) -> Path:
    """The prefix printed exists, lies in ``cache`` and its python imports
    the reference packages."""
    lines = out.splitlines()
    if len(lines) != 1:
        raise SystemExit(f"{what}: expected one line (the prefix), got {out!r}")
    prefix = Path(lines[0])
    if not prefix.is_dir():
        raise SystemExit(f"{what}: printed {prefix}, which is no directory")
    if not prefix.resolve().is_relative_to(cache.resolve()):
        raise SystemExit(f"{what}: printed {prefix}, not in the cache {cache}")
    py = run([prefix / "bin" / "python", "-c", f"{CHECK}; import sys; print(sys.prefix)"], env=env)
    if Path(py.stdout.strip()) != prefix:
        raise SystemExit(f"{what}: {prefix}/bin/python has sys.prefix {py.stdout.strip()}")
    return prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warm-reps", type=int, default=50, help="warm runs of each side per round")
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="reference venv, archives and tool venv (default: a new temporary directory)",
    )
    args = ap.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="envcrate-bench-boot-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    ref = ensure_reference(work)
    env = tool_env()
    venv_python = tool_venv(work, env)
    envcrate = [venv_python.with_name("envcrate")]
    python = Path(sys.executable)
    zst = packed(envcrate, ref, work, "tar.zst", env)
    gz = packed(envcrate, ref, work, "tar.gz", env)
    run([python, "-c", "import zstandard"], env=env)  # the cold path's module is there
    many_name = MANY.replace("32", str(args.concurrent))
    many_ensure_name = MANY_ENSURE.replace("32", str(args.concurrent))
    waiter_cpu: dict[str, list[float]] = {}

    times: dict[str, list[float]] = {}
    rss: dict[str, int] = {}
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    try:
        both, gz_only = tmp / "store", tmp / "store-gz"
        crate = pushed(envcrate, zst, both, env)
        if pushed(envcrate, gz, both, env) != crate:
            raise SystemExit(f"{zst} and {gz} are not one crate")
        pushed(envcrate, gz, gz_only, env)
        boot, boot_gz = tmp / "boot.sh", tmp / "boot-gz.sh"
        run([*envcrate, "bootstrap", crate, "--store", both, "-o", boot], env=env)
        run([*envcrate, "bootstrap", crate, "--store", gz_only, "-o", boot_gz], env=env)
        script_bytes = boot.stat().st_size

        def boot_env(cache: Path, **extra) -> dict:
            return dict(env, ENVCRATE_CACHE=str(cache), ENVCRATE_BOOT_PYTHON=str(python), **extra)

        variants = {
            BOOT: (boot, {}),
            BOOT_CMD: (boot, {"ENVCRATE_ZSTD": "command"}),
            BOOT_GZ: (boot_gz, {}),
        }
        ensure = [*envcrate, "ensure", crate, "--store", both]

        # correctness, once, untimed: every cold variant, then the warm path
        # and cold ensure of the same crate
        prefixes = {}
        for name, (script, extra) in variants.items():
            cache = tmp / f"check-{len(prefixes)}"
            out = run(["sh", script, "prefix"], env=boot_env(cache, **extra)).stdout
            prefixes[name] = check_prefix(out, cache, name, env)
        warm_cache = tmp / "check-0"
        out = run(["sh", boot, "prefix"], env=boot_env(warm_cache)).stdout
        if Path(out.strip()) != prefixes[BOOT]:
            raise SystemExit(f"warm run printed {out!r}, the cold one {prefixes[BOOT]}")
        ens = run([*ensure, "--cache", tmp / "check-ensure"], env=env).stdout
        check_prefix(ens, tmp / "check-ensure", ENSURE, env)
        rel = {n: p.relative_to(p.parent.parent.parent) for n, p in prefixes.items()}
        print(
            f"checked: each cold variant printed a prefix in its cache whose python imports "
            f"{CHECK[7:]} ({rel[BOOT]}); the warm run printed the same prefix",
            file=sys.stderr,
        )

        def cold(name: str, cmd: list, run_env: dict) -> None:
            took, kib = timed(cmd, env=run_env)
            times.setdefault(name, []).append(took)
            rss[name] = max(rss.get(name, 0), kib)

        n = 0
        for i in range(args.rounds):
            # the four cold steps, each round starting one further along
            # (ensure first in round 1, the zstandard bootstrap in round 2, ...):
            # no side always runs first after the warm runs, or always after
            # another fill
            steps = [ENSURE, *variants]
            for name in steps[i % len(steps) :] + steps[: i % len(steps)]:
                n += 1
                if name == ENSURE:
                    cold(ENSURE, [*ensure, "--cache", tmp / f"c{n}"], env)
                else:
                    script, extra = variants[name]
                    cold(name, ["sh", script, "prefix"], boot_env(tmp / f"c{n}", **extra))
            # then the concurrent runs of each, in turn first
            many = [
                (many_name, ["sh", boot, "prefix"], boot_env),
                (many_ensure_name, None, None),
            ]
            for name, cmd, make_env in many if i % 2 == 0 else many[::-1]:
                n += 1
                if cmd is None:
                    cmd, run_env = [*ensure, "--cache", tmp / f"c{n}"], env
                else:
                    run_env = make_env(tmp / f"c{n}")
                took, cpu = timed_many(cmd, args.concurrent, run_env)
                times.setdefault(name, []).append(took)
                waiter_cpu.setdefault(name, []).extend(sorted(cpu)[:-1])  # less the filler
            warm_env = boot_env(warm_cache)
            for _ in range(args.warm_reps):
                times.setdefault(WARM, []).append(timed(["sh", boot, "prefix"], env=warm_env)[0])
                times.setdefault(PASS, []).append(timed([python, "-c", "pass"], env=env)[0])
                times.setdefault(PASS_VENV, []).append(
                    timed([venv_python, "-c", "pass"], env=env)[0]
                )
            w = times[WARM][-args.warm_reps :]
            p = times[PASS][-args.warm_reps :]
            pv = times[PASS_VENV][-args.warm_reps :]
            print(
                f"round {i + 1}/{args.rounds}: {ENSURE} {times[ENSURE][-1]:.3f}, "
                f"zstandard {times[BOOT][-1]:.3f}, command {times[BOOT_CMD][-1]:.3f}, "
                f"tar.gz {times[BOOT_GZ][-1]:.3f}, {args.concurrent} concurrent "
                f"{times[many_name][-1]:.3f} (ensure {times[many_ensure_name][-1]:.3f}); warm {statistics.median(w) * 1000:.1f} ms, "
                f"python -c pass {statistics.median(p) * 1000:.1f} ms, the tool venv's "
                f"{statistics.median(pv) * 1000:.1f} ms (medians of "
                f"{args.warm_reps})",
                file=sys.stderr,
            )
    finally:
        subprocess.run(["chmod", "-R", "u+w", tmp], check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    reps = args.warm_reps

    def per_round(a: str, b: str) -> list[float]:
        """Each round's ratio (the warm sides: of the round's medians)."""
        if a in (WARM, PASS, PASS_VENV):
            return [
                statistics.median(times[a][i * reps : (i + 1) * reps])
                / statistics.median(times[b][i * reps : (i + 1) * reps])
                for i in range(args.rounds)
            ]
        return [x / y for x, y in zip(times[a], times[b])]

    names = {MANY: many_name, MANY_ENSURE: many_ensure_name}
    rows = [(names.get(a, a), names.get(b, b), t) for a, b, t in ROWS]
    print(
        f"reference crate {crate[:19]}: {zst.stat().st_size / 1e6:.0f} MB tar.zst, "
        f"{gz.stat().st_size / 1e6:.0f} MB tar.gz, script {boot.name} "
        f"{script_bytes} bytes; {args.rounds} interleaved "
        f"rounds (warm: {args.warm_reps * args.rounds} runs of each side), medians; "
        f"nproc {nproc()}; cold path and python -c pass: {python} "
        f"(Python {sys.version.split()[0]}); the tool venv's python: {venv_python}\n"
    )
    print(
        "| comparison | A seconds | B seconds | ratio A/B | median of round ratios | target | met |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for a, b, target in rows:
        ratio = med[a] / med[b]
        digits = 4 if med[b] < 0.1 else 3
        met = "—" if target is None else ("pass" if ratio <= target else "FAIL")
        print(
            f"| {a} vs {b} | {med[a]:.{digits}f} | {med[b]:.{digits}f} | {ratio:.2f}x "
            f"| {statistics.median(per_round(a, b)):.2f}x "
            f"| {'—' if target is None else f'≤ {target}x'} | {met} |"
        )
    print()
    print("per round (warm: medians of the round's runs):\n")
    ratios = {(a, b): per_round(a, b) for a, b, _ in rows}
    print(
        "| round | warm / pass | warm / venv pass | zstandard / ensure | command / ensure "
        "| tar.gz / ensure | concurrent / one | concurrent ensure / one |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i in range(args.rounds):
        cells = [f"{ratios[a, b][i]:.2f}x" for a, b, _ in rows]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    print()
    print(
        "peak RSS MB (largest process in the tree): "
        + ", ".join(f"{k} {v / 1024:.0f}" for k, v in rss.items())
    )
    print(
        "CPU seconds per waiter of the concurrent runs (all but the one that used most), "
        "median: " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in waiter_cpu.items())
    )
    print(
        "the page cache cannot be dropped on this machine: the archives (read once by the "
        "check before round 1) come from memory for every side alike"
    )
    print(time.strftime("measured %Y-%m-%d %H:%M UTC", time.gmtime()))


if __name__ == "__main__":
    main()
