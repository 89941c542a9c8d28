"""Push and fetch the reference crate to S3 (SeaweedFS), side by side with awscli.

    python3 bench/bench_store.py [--rounds N] [--work DIR]

Packs the reference venv (built by bench_pack_unpack.py's recipe) once, starts
a SeaweedFS server on 127.0.0.1 (the test suite's fixture), then runs
interleaved rounds of

- up:   envcrate push ARCHIVE --store s3://bucket/rN  |  aws s3 cp ARCHIVE s3://bucket/awsN
- down: fetch of the crate (Store.fetch: download + digest check)
        |  aws s3 cp s3://bucket/<same blob object> FILE

each as a whole command (interpreter start-up included), and prints medians,
throughput and ratios. Every round uses fresh keys, so every push uploads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_pack_unpack import reference_archive, timed  # noqa: E402
from servers import SeaweedFS  # noqa: E402

PUSH = "envcrate push"
AWS_UP = "aws s3 cp (upload)"
FETCH = "envcrate fetch (Store.fetch)"
AWS_DOWN = "aws s3 cp (download)"

_FETCH = "import sys, envcrate; envcrate.open_store(sys.argv[1]).fetch(sys.argv[2], sys.argv[3])"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    archive = reference_archive(args.work)
    from envcrate.node.unpack import read_manifest
    from envcrate.stores import blob_key, file_digest

    crate_id = read_manifest(archive).id
    blob = file_digest(archive)
    size = archive.stat().st_size
    aws = [sys.executable, "-m", "awscli"]

    with tempfile.TemporaryDirectory(prefix="envcrate-bench-s3-", dir=args.work) as tmp:
        tmp = Path(tmp)
        server = SeaweedFS(tmp / "seaweed")
        server.start()
        env = server.env()
        bucket = server.bucket()
        times: dict[str, list[float]] = {}
        try:
            for i in range(args.rounds):
                store = f"s3://{bucket}/r{i}"
                t, _ = timed(
                    [
                        sys.executable,
                        "-m",
                        "envcrate.cli",
                        "push",
                        archive,
                        "--store",
                        store,
                        "--json",
                    ],
                    env=env,
                )
                times.setdefault(PUSH, []).append(t)
                t, _ = timed(
                    [*aws, "s3", "cp", "--quiet", archive, f"s3://{bucket}/aws{i}/ref.tar.zst"],
                    env=env,
                )
                times.setdefault(AWS_UP, []).append(t)
                down = tmp / f"d{i}"
                down.mkdir()
                t, _ = timed([sys.executable, "-c", _FETCH, store, crate_id, down], env=env)
                times.setdefault(FETCH, []).append(t)
                key = f"s3://{bucket}/r{i}/{blob_key(blob)}"
                t, _ = timed([*aws, "s3", "cp", "--quiet", key, down / "aws.tar.zst"], env=env)
                times.setdefault(AWS_DOWN, []).append(t)
                fetched = [p for p in down.iterdir() if p.name != "aws.tar.zst"]
                assert [file_digest(p) for p in fetched] == [blob], fetched
                assert file_digest(down / "aws.tar.zst") == blob
                for p in down.iterdir():
                    p.unlink()
                print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            server.stop()

    med = {k: statistics.median(v) for k, v in times.items()}
    mb = size / 1e6
    print(
        f"reference crate: {mb:.1f} MB archive; SeaweedFS on 127.0.0.1; "
        f"{args.rounds} interleaved rounds, medians; {os.cpu_count()} cores\n"
    )
    print("| step | seconds | MB/s | throughput vs awscli |")
    print("|---|---:|---:|---:|")
    for name, ref_name in (
        (PUSH, AWS_UP),
        (AWS_UP, AWS_UP),
        (FETCH, AWS_DOWN),
        (AWS_DOWN, AWS_DOWN),
    ):
        print(
            f"| {name} | {med[name]:.2f} | {mb / med[name]:.0f} | {med[ref_name] / med[name]:.2f}x |"
        )
    print(
        "\nwhole commands, interpreter start-up included; envcrate push also hashes the "
        "archive and writes the crate record, fetch checks the blob digest"
    )
    print(time.strftime("measured %Y-%m-%d", time.gmtime()))


if __name__ == "__main__":
    main()
