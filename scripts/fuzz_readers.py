#!/usr/bin/env python3
"""Fuzz envcrate's archive and manifest readers for a while.

    scripts/fuzz_readers.py [--seconds N] [--seed S] [--out DIR]

The same contract as tests/crate/test_fuzz.py (whose checks this runs), with
random mutations for N seconds (300 by default) instead of a fixed budget:
whatever the bytes, ``unpack``, ``verify_archive``, ``read_manifest`` and
``Manifest.from_bytes`` fail only with an ``EnvcrateError`` whose message is
one line, a refused unpack leaves nothing anywhere, and a successful one
holds exactly the crate's table. Each case runs in a forked child (its own
process group), so a hang or a crash is found too and cannot stop the run.

Each distinct failure (reader, what went wrong, where it was raised) is
printed once, with its message and a reproducer written under DIR (the
archive or manifest bytes, and a note saying how it was made and how to
replay it); a summary ends the run. Exit status 1 if anything was found.
Run from the repository with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "crate")]

import test_fuzz as tf  # noqa: E402

from envcrate.crate.manifest import Manifest, canonical_json  # noqa: E402

CASE_TIMEOUT = 60.0  # seconds a case may take in all before it counts as hung


# --------------------------------------------------------------------------- random cases


def _position(rng: random.Random, seed: tf.Seed) -> int:
    n = len(seed.data)
    (h0, h1), (t0, t1) = seed.head, seed.tail
    pick = rng.random()
    if pick < 0.3:
        return rng.randrange(h0, max(h0 + 1, h1))
    if pick < 0.5:
        return rng.randrange(t0, max(t0 + 1, t1))
    if pick < 0.75:
        b = rng.choice(seed.boundaries)
        return min(n - 1, max(0, b + rng.randint(-4, 24)))
    return rng.randrange(n)


def _mutation(rng: random.Random, seed: tf.Seed, data: bytes) -> tf.Mutation:
    kind = rng.choice(tf.MUTATIONS)
    pos = min(_position(rng, seed), len(data) - 1)
    if kind == "flip":
        return tf.Mutation(kind, pos, mask=rng.randint(1, 255))
    if kind == "truncate":
        return tf.Mutation(kind, pos)
    end = min(len(data), pos + (rng.randint(1, 64) if rng.random() < 0.7 else rng.randint(1, 8192)))
    if kind == "overwrite":
        return tf.Mutation(kind, pos, end, junk=rng.randbytes(end - pos))
    if kind == "duplicate":
        return tf.Mutation(kind, pos, end, at=min(_position(rng, seed), len(data)))
    return tf.Mutation(kind, pos, end)


def _json_value(rng: random.Random, depth: int = 0):
    pick = rng.randrange(9 if depth < 2 else 7)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice([0, -1, 1, 2, 2**31, 2**63, -(2**70), rng.randint(-1000, 1000)])
    if pick == 3:
        return rng.choice([0.5, -1.5, 1e300, 1.0])
    if pick in (4, 5, 6):
        return rng.choice(["", "x", "..", "/", "../../x", "\n", "\x00", "sha256:", "é", "3.11"])
    if pick == 7:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["", "a", "path", "kind"]): _json_value(rng, depth + 1) for _ in range(2)}


def _crafted(rng: random.Random, seed: tf.Seed, sandbox: Path) -> tuple[str, dict]:
    pick = rng.random()
    if pick < 0.15:
        path = rng.choice(tf.REQUIRED)
        return f"without {'.'.join(map(str, path))}", tf.craft(seed, path, delete=True)
    if pick < 0.3:
        case = rng.choice(sorted(tf.SEMANTIC))
        path, value = tf.SEMANTIC[case]
        if isinstance(value, str) and "{sandbox}" in value:
            value = value.format(sandbox=sandbox)
        return f"semantic: {case}", tf.craft(seed, path, value)
    path = rng.choice(sorted(tf.FIELDS, key=str))
    ok = tf.FIELDS[path]
    for _ in range(100):
        value = _json_value(rng)
        if not ok(value):
            break
    return f"{'.'.join(map(str, path))} = {value!r}", tf.craft(seed, path, value)


def _tar_case(rng: random.Random, seed: tf.Seed) -> dict:
    """Valid frames around a tar stream with one or two damaged members."""
    members, done = list(seed.members), []
    for _ in range(rng.choice([1, 1, 2])):
        k = rng.randrange(len(members))
        n = len(members[k])
        if n == 0:  # cut away by the first change
            continue
        if rng.random() < 0.7:
            lo, hi = rng.choice(tf.HEADER_FIELDS)
            pos = min(n - 1, rng.randrange(lo, hi))
        else:
            pos = rng.randrange(n)
        kind = rng.choice(tf.MUTATIONS)
        end = min(n, pos + (rng.randint(1, 16) if rng.random() < 0.7 else rng.randint(1, 1024)))
        if kind == "flip":
            m = tf.Mutation(kind, pos, mask=rng.randint(1, 255))
        elif kind == "truncate":
            m = tf.Mutation(kind, pos)
        elif kind == "overwrite":
            alphabet = b"01234567 \x80\x00" if rng.random() < 0.5 else bytes(range(256))
            m = tf.Mutation(
                kind, pos, end, junk=bytes(rng.choice(alphabet) for _ in range(end - pos))
            )
        elif kind == "duplicate":
            m = tf.Mutation(kind, pos, end, at=rng.randrange(n + 1))
        else:
            m = tf.Mutation(kind, pos, end)
        members[k] = m.apply(members[k])
        done.append(f"member {k} {m}")
    layout = rng.choice(["stream", "frames"])
    data = tf.repack_members(members, layout)
    return {"kind": "tar", "fmt": "tar.zst", "what": "; ".join(done) + f" ({layout})", "data": data}


def _tail_case(rng: random.Random, seed: tf.Seed) -> dict:
    """The real crate with its index or seek table changed, framing intact."""
    _, index, seek = tf.tail_of(seed.data)
    i = rng.randrange(len(seek))
    what = rng.choice(["index value", "index entry", "seek size"])
    if what == "index value":
        j = rng.randint(0, 1)
        index[i][j] = rng.choice([rng.randint(-3, 40), 2**63, -(2**63), _json_value(rng)])
        desc = f"index[{i}][{j}] = {index[i][j]!r}"
    elif what == "index entry":
        k = rng.randrange(len(seek))
        op = rng.choice(["drop", "duplicate", "swap"])
        if op == "drop":
            del index[i]
        elif op == "duplicate":
            index.insert(i, index[k])
        else:
            index[i], index[k] = index[k], index[i]
        desc = f"index: {op} {i} {k}"
    else:
        j = rng.randint(0, 1)
        value = rng.choice(
            [rng.randrange(2**32), rng.randrange(4 << 20), seek[i][j] + rng.randint(-3, 3)]
        )
        seek[i] = (value, seek[i][1]) if j == 0 else (seek[i][0], value)
        desc = f"seek[{i}] {'csize' if j == 0 else 'dsize'} = {value}"
    return {
        "kind": "tail",
        "fmt": "tar.zst",
        "what": desc,
        "data": tf.with_tail(seed.data, index, seek),
    }


def make_case(rng: random.Random, seeds: dict[str, tf.Seed], sandbox: Path) -> dict:
    """A case: what it is, the bytes to write, and which checks to run."""
    pick = rng.random()
    if pick < 0.15:
        return _tar_case(rng, seeds["tar.zst"])
    if pick < 0.25:
        return _tail_case(rng, seeds["tar.zst"])
    if pick < 0.6:  # byte mutations, one to three stacked
        seed = seeds[rng.choice(["tar.zst", "tar.zst", "tar.gz"])]
        data, done = seed.data, []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            if not data:
                break
            m = _mutation(rng, seed, data)
            data = m.apply(data)
            done.append(str(m))
        return {"kind": "bytes", "fmt": seed.fmt, "what": "; ".join(done), "data": data}
    seed = seeds["tar.zst"]
    if pick < 0.9:  # a crafted manifest in a valid-looking archive
        what, manifest = _crafted(rng, seed, sandbox)
        layout = rng.choice(["stream", "frames"])
        raw = canonical_json(manifest)
        return {
            "kind": "manifest",
            "fmt": "tar.zst",
            "what": f"{what} ({layout})",
            "layout": layout,
            "data": tf.repack(seed, raw, layout),
            "manifest": raw,
            "alone": not what.startswith("semantic: ")
            or what[len("semantic: ") :] not in tf.NEEDS_TABLE,
        }
    # Manifest.from_bytes on its own: JSON values, or bytes
    if rng.random() < 0.5:
        raw = canonical_json(_json_value(rng))
    else:
        raw = rng.randbytes(rng.randint(0, 64))
    return {"kind": "from_bytes", "fmt": "", "what": "raw manifest bytes", "data": raw}


def run_case(case: dict, seeds: dict[str, tf.Seed], work: Path) -> list[dict]:
    """The problems of a case (run in the child)."""
    if case["kind"] == "from_bytes":
        got, problems = tf._call("Manifest.from_bytes", lambda: Manifest.from_bytes(case["data"]))
        if got is not None:
            problems += [
                tf.Problem(
                    p.reader,
                    "returned a manifest whose accessor raised " + p.kind,
                    p.message,
                    p.where,
                )
                for p in tf._call("Manifest.from_bytes", lambda: tf._use(got))[1]
            ]
    elif case["kind"] == "manifest":
        problems = tf.check_crafted(
            seeds["tar.zst"], json.loads(case["manifest"]), case["layout"], work, case["alone"]
        )
    else:
        archive, sandbox = tf._fresh(work, f"case.{case['fmt']}", case["data"])
        problems = tf.check_readers(archive, sandbox, seeds[case["fmt"]].id)
    return [p.__dict__ for p in problems]


def in_child(case: dict, seeds, work: Path) -> list[dict]:
    """Run the case in a forked child of its own process group; a hang or a
    crash is a problem too."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            os.setpgid(0, 0)
            out = json.dumps(run_case(case, seeds, work)).encode()
            with os.fdopen(w, "wb") as f:
                f.write(out)
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    try:
        os.setpgid(pid, pid)  # here too, so that the group exists before any kill
    except OSError:
        pass
    deadline = time.monotonic() + CASE_TIMEOUT
    chunks = []
    with os.fdopen(r, "rb", buffering=0) as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([f], [], [], left)[0]:
                _kill(pid)
                os.waitpid(pid, 0)
                return [
                    dict(reader="case", kind="hang", message=f"over {CASE_TIMEOUT:.0f} s", where="")
                ]
            chunk = f.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    _kill(pid)  # writers a crashed child left behind
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        return [dict(reader="case", kind=f"crashed ({sig})", message="", where="")]
    if os.WEXITSTATUS(status) != 0 or not chunks:
        return [
            dict(reader="case", kind=f"child exited {os.WEXITSTATUS(status)}", message="", where="")
        ]
    return json.loads(b"".join(chunks))


def _kill(pid: int) -> None:
    """Kill the child's process group (the child and the writers it forked)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- reporting


def _key(p: dict, case: dict) -> tuple:
    """What makes two failures the same: the reader, what went wrong and
    where it was raised; for a malformed manifest that was accepted (nothing
    raised), the field that was wrong."""
    kind = p["kind"]
    if kind.startswith("accepted it") or kind.startswith("left"):
        field = ""
        if case["kind"] == "manifest":
            field = case["what"].split(" = ", 1)[0].rsplit(" (", 1)[0]
        return (p["reader"], kind, field)
    return (p["reader"], kind, p["where"])


def write_reproducer(out: Path, n: int, case: dict, problem: dict) -> Path:
    ext = {"tar.zst": ".tar.zst", "tar.gz": ".tar.gz"}.get(case["fmt"], ".json")
    path = out / f"{n:03d}{ext}"
    path.write_bytes(case["data"])
    note = [
        f"case: {case['kind']} {case['fmt']}: {case['what']}",
        f"found: {problem['reader']}: {problem['kind']}: {problem['message']!r} at {problem['where']}",
    ]
    if case["kind"] == "from_bytes":
        note.append(
            f'replay: PYTHONPATH=src python3 -c "from envcrate.crate.manifest import Manifest; '
            f"Manifest.from_bytes(open('{path}', 'rb').read())\""
        )
    else:
        if case["kind"] == "manifest":
            (out / f"{n:03d}.manifest.json").write_bytes(case["manifest"])
        note.append(
            f"replay: PYTHONPATH=src python3 -m envcrate.cli unpack {path} /tmp/fuzz-replay-{n:03d}"
        )
        note.append(f"        PYTHONPATH=src python3 -m envcrate.cli verify {path}")
    (out / f"{n:03d}.txt").write_text("\n".join(note) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where reproducers go (default: a new temporary directory)",
    )
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="envcrate-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"fuzz_readers: seed {seed}, {args.seconds:.0f} s, reproducers in {out}", flush=True)

    with tempfile.TemporaryDirectory(prefix="envcrate-fuzz-work-") as tmp:
        tmp = Path(tmp)
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        seeds = tf.make_seeds(tmp, venv)
        for s in seeds.values():
            problems = [
                tf.Problem(**p)
                for p in run_case(
                    {"kind": "bytes", "fmt": s.fmt, "what": "seed", "data": s.data},
                    seeds,
                    tmp / "case",
                )
            ]
            if problems:
                print(f"the {s.fmt} seed itself breaks the contract: {problems}", file=sys.stderr)
                return 2
        found: dict[tuple, list] = {}
        outcomes: Counter = Counter()
        start = time.monotonic()
        cases = 0
        while time.monotonic() - start < args.seconds:
            work = tmp / "case"
            case = make_case(rng, seeds, work / "work" / "sandbox")  # see test_fuzz._fresh
            cases += 1
            work.mkdir(exist_ok=True)
            problems = in_child(case, seeds, work)
            tf._remove(work)
            outcomes[case["kind"]] += 1
            for p in problems:
                key = _key(p, case)
                if key in found:
                    found[key][0] += 1
                    continue
                n = len(found) + 1
                path = write_reproducer(out, n, case, p)
                found[key] = [1, p, case["what"], path]
                print(
                    f"[{n}] {p['reader']}: {p['kind']}: {p['message'][:300]!r}"
                    f" at {p['where'] or '-'}\n    case: {case['kind']} {case['fmt']}: {case['what'][:200]}"
                    f"\n    reproducer: {path}",
                    flush=True,
                )
        elapsed = time.monotonic() - start
    print(
        f"\nsummary: {cases} cases in {elapsed:.0f} s (seed {seed}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        + f"), {len(found)} distinct failures"
    )
    for (reader, kind, where), (count, _, _, path) in sorted(
        found.items(), key=lambda kv: (-kv[1][0], kv[0])
    ):
        # where it was raised, or for an accepted manifest the wrong field
        at = f" ({where})" if kind.startswith(("accepted", "left")) and where else ""
        at = at or (f" at {where}" if where else "")
        print(f"  {count:5d}  {reader}: {kind}{at}  [{path.name}]")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
