"""`envcrate build` of the reference recipe (recipes/scientific.toml: numpy,
scipy, pandas, matplotlib, scikit-learn, requests), side by side with making
the same env by hand, all from warm local package caches.

    python3 bench/bench_build.py [--rounds N] [--warm-reps N] [--work DIR]

The recipe is copied into the work directory with this machine's Python and
the test wheelhouse (`.wheelhouse`, which the test command fills) as its only
package source (`find-links`, `no-index`): nothing comes from the network,
and every side installs the same files. It is locked once (`envcrate lock`);
the pip and uv sides install those pins too:

- cold build: `envcrate build RECIPE --store NEW` (a store without the crate:
  uv venv, uv pip sync --require-hashes --compile-bytecode, pack, ship)
- pip: `python -m venv D && D/bin/pip install --no-index --find-links WH
  --require-hashes -r LOCK` (pip compiles pycs by default)
- uv: `uv venv D && uv pip sync LOCK --python D/bin/python --no-index
  --find-links WH --compile-bytecode` (uv's cache warm after the first round)
- warm build: `envcrate build RECIPE --store S`, S having the crate (nothing
  is built: the store maps the build key to it)

Cold rounds rotate their order; the warm builds run --warm-reps times per
round between them. envcrate runs from a venv of its own (WORK/tool-venv,
reinstalled from this checkout). Every env and store goes into a fresh
directory, all deleted at the end. Prints every round and a table of medians
and ratios.
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

from bench_bootstrap import run  # noqa: E402
from bench_pack_unpack import timed, tool_env, tool_venv  # noqa: E402

COLD = "envcrate build (cold: store without the crate)"
PIP = "python -m venv + pip install -r lock"
UV = "uv venv + uv pip sync lock"
WARM = "envcrate build (warm: store has the crate)"
ROWS = [(COLD, UV, None), (COLD, PIP, None), (WARM, UV, 0.1), (WARM, PIP, None)]
CHECK = "import numpy, scipy, pandas, matplotlib, sklearn, requests"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm-reps", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--wheelhouse", type=Path, default=ROOT / ".wheelhouse")
    args = ap.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="envcrate-bench-build-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    wh = args.wheelhouse.absolute()
    env = tool_env()
    venv_python = tool_venv(work, env)
    envcrate = [venv_python.with_name("envcrate")]
    uv = run([venv_python, "-c", "import uv; print(uv.find_uv_bin())"], env=env).stdout.strip()
    python = Path(sys.executable).resolve()
    text = (ROOT / "recipes" / "scientific.toml").read_text()
    ver = "%d.%d" % sys.version_info[:2]
    recipe = work / "scientific.toml"
    recipe.write_text(
        text.replace('python = "3.11"', f'python = "{ver}"')
        + f'find-links = ["{wh}"]\nno-index = true\n'
    )
    build_env = dict(env, ENVCRATE_BUILD_PYTHON=str(python))
    run([*envcrate, "lock", recipe], env=build_env)
    lock = work / "scientific.lock"
    times: dict[str, list[float]] = {}
    rss: dict[str, int] = {}
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    try:
        warm_store = tmp / "warm-store"
        first = json.loads(
            run([*envcrate, "build", recipe, "--store", warm_store, "--json"], env=build_env).stdout
        )
        cache = tmp / "check-cache"
        ran = run(
            [*envcrate, "run", first["id"], "--store", warm_store, "--cache", cache, "--",
             "python", "-c", CHECK],
            env=env,
        )  # fmt: skip
        del ran
        print(f"checked: the built crate {first['id'][:19]} imports the stack", file=sys.stderr)
        n = 0

        def side(name: str, cmds: list) -> None:
            total, peak = 0.0, 0
            for cmd, run_env in cmds:
                took, kib = timed(cmd, env=run_env)
                total += took
                peak = max(peak, kib)
            times.setdefault(name, []).append(total)
            rss[name] = max(rss.get(name, 0), peak)

        for i in range(args.rounds):
            steps = [COLD, PIP, UV]
            for name in steps[i % 3 :] + steps[: i % 3]:
                n += 1
                d = tmp / f"e{n}"
                if name == COLD:
                    side(COLD, [([*envcrate, "build", recipe, "--store", d], build_env)])
                elif name == PIP:
                    side(PIP, [
                        ([python, "-m", "venv", d], env),
                        ([d / "bin" / "pip", "install", "-q", "--disable-pip-version-check",
                          "--no-index", "--find-links", wh, "--require-hashes", "-r", lock], env),
                    ])  # fmt: skip
                else:
                    side(UV, [
                        ([uv, "venv", "-q", "--python", python, d], env),
                        ([uv, "pip", "sync", "-q", lock, "--python", d / "bin" / "python",
                          "--no-index", "--find-links", wh, "--compile-bytecode"], env),
                    ])  # fmt: skip
            for _ in range(args.warm_reps):
                side(WARM, [([*envcrate, "build", recipe, "--store", warm_store], build_env)])
            w = statistics.median(times[WARM][-args.warm_reps :])
            print(
                f"round {i + 1}/{args.rounds}: cold build {times[COLD][-1]:.2f}, pip "
                f"{times[PIP][-1]:.2f}, uv {times[UV][-1]:.2f}, warm build {w:.3f} "
                f"(median of {args.warm_reps})",
                file=sys.stderr,
            )
    finally:
        subprocess.run(["chmod", "-R", "u+w", tmp], check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    pins = sum(1 for line in lock.read_text().splitlines() if "==" in line)
    print(
        f"recipes/scientific.toml, {pins} pinned distributions from {wh} (no network); "
        f"{args.rounds} interleaved rounds, warm builds {args.warm_reps} per round; medians; "
        f"Python {sys.version.split()[0]}; nproc {os.cpu_count()}\n"
    )
    print("| comparison | A seconds | B seconds | ratio A/B | target | met |")
    print("|---|---:|---:|---:|---:|---|")
    for a, b, target in ROWS:
        ratio = med[a] / med[b]
        met = "—" if target is None else ("pass" if ratio <= target else "FAIL")
        shown = "—" if target is None else f"≤ {target}x"
        print(f"| {a} vs {b} | {med[a]:.3f} | {med[b]:.3f} | {ratio:.3f}x | {shown} | {met} |")
    print()
    print(
        "peak RSS MB (largest process): " + ", ".join(f"{k} {v / 1024:.0f}" for k, v in rss.items())
    )
    print(time.strftime("measured %Y-%m-%d %H:%M UTC", time.gmtime()))


if __name__ == "__main__":
    main()
