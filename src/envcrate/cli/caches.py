"""Commands on caches: ``ensure``, ``activate``, ``run``, ``gc``, and the
``--cache`` forms of ``ls``, ``rm`` and ``verify``."""

from __future__ import annotations

import os
import sys

from ..errors import EnvcrateError
from . import emit  # not .common: a warm ``ensure`` imports no parser code

# The parsers' and the other commands' helpers, imported when they run.


def add_ensure(add) -> None:
    from .common import add_ensure_options, add_json, add_progress

    p = add("ensure", help="materialise a crate into the cache once; print its prefix")
    add_ensure_options(p)
    p.add_argument("--lease", type=int, metavar="PID", help="keep it from gc while PID runs")
    add_json(p)
    add_progress(p)


def add_activate(add) -> None:
    from .common import add_ensure_options

    p = add("activate", help="print shell code that activates a crate (for eval)")
    add_ensure_options(p)
    p.add_argument("--shell", choices=["sh", "bash", "zsh", "fish"], help="default: from $SHELL")


def add_run(add) -> None:
    from .common import add_ensure_options

    p = add("run", help="run a command in a crate")
    add_ensure_options(p)
    p.add_argument("--", dest="dashdash", metavar="COMMAND [ARG]...", help="the command to run")


def add_gc(add) -> None:
    from .common import add_cache, add_json

    p = add("gc", help="remove least-recently-used, unleased crates from caches")
    add_cache(p)
    p.add_argument("--max-size", metavar="SIZE", help="shrink each cache below SIZE (e.g. 20G)")
    p.add_argument(
        "--unused-for", metavar="DURATION", help="remove crates unused this long (e.g. 30d)"
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    add_json(p)


def _ensure(args, lease: int | str | None = None):
    from ..node.ensure import ensure_crate

    ref = args.ref
    recipe = getattr(args, "recipe", None)
    if (ref is None) == (recipe is None):
        raise EnvcrateError(
            f"name a crate (REF) or a recipe (--recipe RECIPE), not {'both' if ref else 'neither'}"
        )
    if recipe is not None:
        from ..build.builder import resolve

        ref = resolve(recipe, args.store)
    return ensure_crate(
        ref,
        args.cache,
        locate=_locator(args.store),
        python=args.python,
        sha256=args.sha256,
        events=args.events,
        report=getattr(args, "report", None),
        lease=lease,
        progress=getattr(args, "progress", False),
    )


def _locator(store):
    """:func:`envcrate.fetching.locator`, imported only when a store is
    needed: a warm ``ensure`` never imports it."""

    def locate(ref: str, crate_id: str | None):
        from ..fetching import locator

        return locator(store)(ref, crate_id)

    return locate


def cmd_ensure(args) -> int:
    done = _ensure(args, args.lease)
    obj = {"id": done.id, "prefix": done.path, "state": done.state}
    obj["seconds"] = round(done.seconds, 6)
    return emit(args, obj, done.path)


def _manifest_kind(prefix) -> str:
    from ..node.cache import read_marker

    return (read_marker(prefix) or {}).get("kind") or "venv"


def cmd_activate(args) -> int:
    from ..node import activation, leases

    # A short-lived lease of our own covers the entry until the evaluating
    # shell has made its lease (with its $$) and removed this one.
    done = _ensure(args, lease=f"{leases.TTL_MARK}{os.getpid()}")
    act = activation.environment(done.prefix, _manifest_kind(done.prefix), dict(os.environ))
    shell = activation.detect_shell(args.shell)
    lease = (leases.lease_dir(done.cache, done.key), leases.lease_name(""), done.lease)
    sys.stdout.write(activation.shell_code(shell, act, lease))
    return 0


def cmd_run(args) -> int:
    from ..node import activation

    argv = args.argv
    if not argv:
        raise EnvcrateError("no command to run: envcrate run REF -- COMMAND [ARG]...")
    done = _ensure(
        args, lease=os.getpid()
    )  # exec keeps the pid: the lease lasts as long as COMMAND
    act = activation.environment(done.prefix, _manifest_kind(done.prefix), dict(os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        activation.exec_in(act, argv)
    except OSError as e:
        print(f"envcrate: error: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


def cmd_gc(args) -> int:
    from ..node import admin as cache_admin
    from ..node.cache import cache_list
    from .common import human_size

    report = cache_admin.gc(
        cache_list(args.cache),
        max_size=cache_admin.parse_size(args.max_size) if args.max_size else None,
        unused_for=cache_admin.parse_duration(args.unused_for) if args.unused_for else None,
        dry_run=args.dry_run,
    )
    if args.json:
        return emit(args, report, "")
    verb = "would free" if args.dry_run else "freed"
    for r in report["removed"]:
        print(
            f"{'would remove' if args.dry_run else 'removed'} {r['prefix']} ({human_size(r['size'])})"
        )
    for k in report["kept"]:
        why = f"in use by {', '.join(k['leases'])}" if k.get("leases") else k.get("error", "")
        print(f"kept {k['prefix']}: {why}")
    for c in report["cleaned"]:
        print(f"{'would clean' if args.dry_run else 'cleaned'} {c}")
    print(f"{verb} {human_size(report['freed'])} in {len(report['removed'])} crates")
    return 0


def ls_cache(args) -> int:
    import time

    from ..ids import short_id
    from ..node import admin as cache_admin
    from ..node.cache import cache_list
    from .common import human_size, print_table

    found = cache_admin.entries(cache_list(args.cache))
    if args.json:
        return emit(args, {"crates": found}, "")
    rows = [("ID", "TAGS", "NAME", "SIZE", "LAST USE", "IN USE", "PREFIX")]
    for e in found:
        rows.append(
            (
                short_id(e["id"]),
                ",".join(e["tags"]) or "-",
                e["name"] or "-",
                human_size(e["size"]),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_use"])),
                str(len(e["in_use"])) if e["in_use"] else "-",
                e["prefix"],
            )
        )
    print_table(rows)
    return 0


def rm_cache(args) -> int:
    from pathlib import Path

    from ..node import admin as cache_admin
    from ..node.cache import cache_list

    removed = []
    for e in cache_admin.find(cache_list(args.cache), args.ref):
        if e["in_use"]:
            raise EnvcrateError(
                f"{e['prefix']} is in use ({', '.join(e['in_use'])}); "
                "stop those processes or wait, then remove it"
            )
        try:
            if cache_admin.remove(Path(e["cache"]), e["key"]):
                removed.append(e["prefix"])
        except cache_admin.Kept as why:
            raise EnvcrateError(
                f"cannot remove {e['prefix']}: {why}; ask them, or use a cache of your own "
                "(--cache DIR)"
                if "owner" in str(why)
                else f"cannot remove {e['prefix']}: {why}; wait and try again"
            ) from None
    if not args.json:
        for r in removed:
            print(f"removed {r}", file=sys.stderr)
    return emit(args, {"id": e["id"], "removed": removed}, e["id"])


def verify_cache(args) -> int:
    from pathlib import Path

    from ..node import admin as cache_admin
    from ..node.cache import cache_list

    if args.ref.endswith((".tar.zst", ".tar.gz")) and not args.cache:
        raise EnvcrateError(f"no archive at {args.ref}")
    if os.path.isdir(args.ref) and not args.cache:
        if not os.path.isfile(os.path.join(args.ref, ".envcrate", "files.jsonl")):
            raise EnvcrateError(f"{args.ref} is not an unpacked crate (no .envcrate/files.jsonl)")
        prefixes = [Path(args.ref)]
    else:
        prefixes = [Path(e["prefix"]) for e in cache_admin.find(cache_list(args.cache), args.ref)]
    results = [cache_admin.verify(p) for p in prefixes]
    bad = [r for r in results if not r["ok"]]
    if args.json:
        import json

        print(json.dumps({"ok": not bad, "entries": results}))
    else:
        for r in results:
            if r["ok"]:
                print(f"ok: {r['prefix']} matches {r['id']}", file=sys.stderr)
            for what in ("modified", "missing", "extra"):
                for path in r[what]:
                    print(f"{what}: {r['prefix']}/{path}")
    if bad:
        r = bad[0]
        first = next(f"{w} {p}" for w in ("modified", "missing", "extra") for p in r[w])
        n = sum(len(r[w]) for w in ("modified", "missing", "extra"))
        print(
            f"envcrate: error: {r['prefix']} differs from crate {r['id']} ({n} paths, first: {first}); "
            "remove it with `envcrate rm REF --cache DIR` and ensure it again",
            file=sys.stderr,
        )
        return 1
    return 0


EXAMPLES = {
    "ensure": [
        "prefix=$(envcrate ensure md-tools:2026-11 --cache /scratch/$USER/envcrate)",
        "envcrate ensure https://host/md.tar.zst --sha256 DIGEST --lease $$",
    ],
    "activate": ['eval "$(envcrate activate md-tools:2026-11)"   # later: deactivate'],
    "run": ["envcrate run md-tools:2026-11 -- python simulate.py --steps 1000"],
    "gc": [
        "envcrate gc --max-size 20G",
        "envcrate gc --cache /scratch/$USER/envcrate --unused-for 30d --dry-run",
    ],
}
PARSERS = {"ensure": add_ensure, "activate": add_activate, "run": add_run, "gc": add_gc}
COMMANDS = {"ensure": cmd_ensure, "activate": cmd_activate, "run": cmd_run, "gc": cmd_gc}
