"""``envcrate bootstrap``: a POSIX sh script that brings a crate to nodes
without envcrate (:mod:`envcrate.bootstrap`)."""

import sys

from . import emit


def add_bootstrap(add) -> None:
    from .common import add_json, add_store

    p = add(
        "bootstrap",
        help="write a sh script that activates a crate on nodes without envcrate",
        description="Write one self-contained POSIX sh script for a crate: `. ./boot.sh` "
        "activates it, `sh boot.sh prefix` prints its prefix, `sh boot.sh run -- CMD` runs a "
        "command in it. A crate ready in a cache costs no Python; the first use on a node "
        "fills the cache with envcrate's own compute side, embedded in the script, under the "
        "node's Python 3.6 or later.",
    )
    p.add_argument("ref", metavar="REF", help="crate id, 12+ hex prefix or tag in the store")
    add_store(p)
    p.add_argument(
        "--cache",
        action="append",
        default=[],
        metavar="DIR",
        help="a cache on the node (repeatable, searched in order; $VARIABLES are expanded "
        "there); default: $ENVCRATE_CACHE, else ~/.cache/envcrate",
    )
    p.add_argument(
        "--presign",
        type=int,
        metavar="SECONDS",
        help="for an s3:// store: put presigned URLs valid this long in the script "
        "(no credentials on the node)",
    )
    p.add_argument(
        "--report", metavar="URL", help="nodes send their events here (a directory or s3://)"
    )
    p.add_argument("--python", metavar="PATH", help="the node's interpreter (absolute path)")
    p.add_argument(
        "--stage",
        action="store_true",
        help="also download the crate's archives beside the script (the script looks there first)",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="default: envcrate-boot-<id12>.sh")
    add_json(p)


def cmd_bootstrap(args) -> int:
    from ..bootstrap import bootstrap

    path, config = bootstrap(
        args.ref,
        args.store,
        args.cache,
        presign=args.presign,
        report=args.report,
        python=args.python,
        output=args.output,
        stage=args.stage,
    )
    if not args.json:
        print(f"wrote {path} for {config['id']}", file=sys.stderr)
    return emit(
        args,
        {"path": str(path), "id": config["id"], "archives": config["archives"]},
        str(path),
    )


PARSERS = {"bootstrap": add_bootstrap}
COMMANDS = {"bootstrap": cmd_bootstrap}
EXAMPLES = {
    "bootstrap": [
        "envcrate bootstrap md-tools:2026-11 --store /project/envcrate/store -o boot.sh",
        "envcrate bootstrap md-tools --store s3://lab-envs/crates --presign 86400 "
        "--cache '$TMPDIR/envcrate' --report /project/runs/r1/report",
        "then, on a node: . ./boot.sh   or   sh boot.sh run -- python simulate.py",
    ]
}
