"""Commands on stores: ``push``, ``ship``, ``ls``, ``tag``, ``rm``, ``fsck``, ``url``
(``ls`` and ``rm`` of caches with ``--cache`` are :mod:`.caches`'s)."""

from __future__ import annotations

import sys

from ..errors import EnvcrateError
from .common import (
    add_cache,
    add_json,
    add_pack_options,
    add_progress,
    add_store,
    emit,
    human_size,
    pack_options,
    print_table,
)


def add_push(add) -> None:
    p = add("push", help="publish a packed archive to a store")
    p.add_argument("archive", help="a crate archive made by `envcrate pack`")
    add_store(p)
    p.add_argument("--tag", metavar="NAME", help="also point this tag at the crate")
    add_json(p)
    add_progress(p)


def add_ship(add) -> None:
    p = add("ship", help="pack an env and publish it, unless the store has it")
    p.add_argument(
        "env", nargs="?", help="the env's prefix (default: $VIRTUAL_ENV, then $CONDA_PREFIX)"
    )
    add_store(p)
    p.add_argument("--tag", metavar="NAME", help="also point this tag at the crate")
    add_pack_options(p, output=False)
    add_json(p)
    add_progress(p)


def add_ls(add) -> None:
    p = add("ls", help="list the crates in a store, or in caches with --cache")
    add_store(p)
    add_cache(p)
    add_json(p)


def add_tag(add) -> None:
    p = add("tag", help="point a tag at a crate in a store")
    p.add_argument("ref", metavar="REF", help="crate id, 12+ hex prefix or tag in the store")
    p.add_argument(
        "name", metavar="NAME", help="the tag: letters, digits and . _ : + - (moved if it exists)"
    )
    add_store(p)
    add_json(p)


def add_rm(add) -> None:
    p = add("rm", help="remove a crate from a store, or from caches with --cache")
    p.add_argument(
        "ref",
        metavar="REF",
        help="crate id, 12+ hex prefix or tag (with --cache: or a prefix path)",
    )
    add_store(p)
    add_cache(p)
    p.add_argument("--force", action="store_true", help="remove it even when tagged (and the tags)")
    add_json(p)


def add_fsck(add) -> None:
    p = add("fsck", help="check a store for unusable objects; --repair removes them")
    add_store(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove orphan blobs older than an hour, damaged archives (and records left "
        "with none) and broken tags",
    )
    add_json(p)


def add_url(add) -> None:
    p = add("url", help="print a presigned HTTPS URL and the digest of a crate's archive")
    p.add_argument("ref", metavar="REF", help="crate id, 12+ hex prefix or tag in the store")
    add_store(p, "s3:// or https:// store (default: $ENVCRATE_STORE)")
    p.add_argument(
        "--expires", type=int, default=3600, metavar="SECONDS", help="validity (default 3600)"
    )
    p.add_argument("--format", choices=["tar.zst", "tar.gz"], help="which archive (default: first)")
    add_json(p)


def _shipped(args, shipped) -> int:
    obj = {
        "id": shipped.id,
        "blob": shipped.blob,
        "size": shipped.size,
        "format": shipped.format,
        "store": shipped.store,
        "uploaded": shipped.uploaded,
        "kept": shipped.kept,
        "seconds": round(shipped.seconds, 3),
    }
    if not args.json:
        if shipped.kept:
            what = (
                f"already has this crate as {shipped.format} with other bytes (blob "
                f"{shipped.blob}), intact: kept it, uploaded nothing"
            )
        else:
            what = "uploaded" if shipped.uploaded else "already there, uploaded nothing"
        print(f"{shipped.store}: {what} ({human_size(shipped.size)})", file=sys.stderr)
    return emit(args, obj, shipped.id)


def cmd_push(args) -> int:
    from ..progress import wanted
    from ..shipping import push

    return _shipped(
        args, push(args.archive, args.store, tag=args.tag, progress=wanted(args.progress))
    )


def cmd_ship(args) -> int:
    from ..shipping import ship

    return _shipped(args, ship(args.env, args.store, tag=args.tag, **pack_options(args)))


def cmd_ls(args) -> int:
    if args.cache:
        from .caches import ls_cache

        return ls_cache(args)
    from ..ids import short_id
    from ..stores import open_store

    store = open_store(args.store)
    problems: list[str] = []
    crates = store.listing(problems)
    for p in problems:  # the rest is listed: one bad object does not hide them
        print(f"envcrate: warning: {p}", file=sys.stderr)
    if args.json:
        return emit(args, {"store": store.url, "crates": crates, "problems": problems}, "")
    rows = [("ID", "TAGS", "NAME", "KIND", "PYTHON", "SIZE", "CREATED")]
    for c in crates:
        rows.append(
            (
                short_id(c["id"]),
                ",".join(c["tags"]) or "-",
                c["name"] or "-",
                c["kind"] or "-",
                c["python"] or "-",
                human_size(c["size"]),
                c["created"],
            )
        )
    print_table(rows)
    return 0


def cmd_tag(args) -> int:
    from ..stores import open_store

    store = open_store(args.store)
    crate_id = store.set_tag(args.ref, args.name)
    return emit(args, {"id": crate_id, "tag": args.name, "store": store.url}, crate_id)


def cmd_rm(args) -> int:
    if args.cache:
        from .caches import rm_cache

        return rm_cache(args)
    from ..stores import open_store

    store = open_store(args.store)
    removed = store.remove(args.ref, force=args.force)
    if not args.json:
        tags = f" and tags {', '.join(removed['tags'])}" if removed["tags"] else ""
        print(f"removed {removed['id']}{tags} from {store.url}", file=sys.stderr)
    return emit(args, dict(removed, store=store.url), removed["id"])


def cmd_fsck(args) -> int:
    from ..stores import open_store
    from ..stores.fsck import fsck

    store = open_store(args.store)
    report = fsck(store, repair=args.repair)
    if args.json:
        import json

        print(json.dumps(report))
    else:
        for p in report["problems"]:
            state = "repaired" if p["repaired"] else "problem"
            print(f"{state}: {p['problem']} {p['key']}: {p['detail']}")
        for key in report["recent"]:
            print(f"recent: {key} has no record yet (less than an hour old: maybe a push)")
        for line in report["repaired"]:
            print(f"did: {line}")
        c = report["checked"]
        counts = f"{c['records']} records, {c['blobs']} blobs, {c['tags']} tags"
        if not report["problems"]:
            print(f"{store.url}: no problems ({counts})")
    left = [p for p in report["problems"] if not p["repaired"]]
    if left:
        hint = (
            "what is left needs a person: push the crate again, or remove it with "
            "`envcrate rm ID --force`"
            if args.repair
            else f"`envcrate fsck --store {store.url} --repair` fixes what it can"
        )
        print(
            f"envcrate: error: {len(left)} problem{'s' * (len(left) != 1)} in {store.url} "
            f"(first: {left[0]['problem']} "
            f"{left[0]['key']}); {hint}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_url(args) -> int:
    from ..stores import blob_key, open_store

    store = open_store(args.store)
    if not store.can_presign:
        raise EnvcrateError(
            f"{store.url} cannot hand out URLs; use an s3:// store (or an https:// one)"
        )
    crate_id = store.resolve(args.ref)
    _, a = store.listed_archive(crate_id, args.format)
    url = store.presign(blob_key(a["blob"]), args.expires)
    obj = {"id": crate_id, "url": url, "blob": a["blob"], "size": a["size"], "format": a["format"]}
    obj["expires"] = args.expires
    return emit(args, obj, f"{url}\n{a['blob']}")


EXAMPLES = {
    "push": [
        "envcrate push md-tools-1f26a1c6b65f.tar.zst --store s3://lab-envs/crates --tag md-tools"
    ],
    "ship": [
        "envcrate ship ~/envs/md-tools --tag md-tools:2026-11",
        "envcrate ship --name md-tools --store /project/envcrate/store --format tar.gz",
    ],
    "ls": [
        "envcrate ls --store s3://lab-envs/crates",
        "envcrate ls --cache /scratch/$USER/envcrate",
    ],
    "tag": ["envcrate tag 1f26a1c6b65f md-tools:stable --store /project/envcrate/store"],
    "rm": ["envcrate rm md-tools:old --store s3://lab-envs/crates --force"],
    "fsck": ["envcrate fsck --store /project/envcrate/store --repair"],
    "url": ["envcrate url md-tools --store s3://lab-envs/crates --expires 86400"],
}
PARSERS = {
    "push": add_push,
    "ship": add_ship,
    "ls": add_ls,
    "tag": add_tag,
    "rm": add_rm,
    "fsck": add_fsck,
    "url": add_url,
}
COMMANDS = {
    "push": cmd_push,
    "ship": cmd_ship,
    "ls": cmd_ls,
    "tag": cmd_tag,
    "rm": cmd_rm,
    "fsck": cmd_fsck,
    "url": cmd_url,
}
