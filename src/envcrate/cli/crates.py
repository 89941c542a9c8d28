"""Commands on crate archives: ``pack``, ``unpack``, ``verify``, ``info``."""

from __future__ import annotations

import os
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
)


def add_pack(add) -> None:
    p = add("pack", help="pack a venv or conda env into a crate archive")
    p.add_argument(
        "env", nargs="?", help="the env's prefix (default: $VIRTUAL_ENV, then $CONDA_PREFIX)"
    )
    p.add_argument(
        "-o", "--output", help="archive path or directory (default: ./<name>-<id12>.<format>)"
    )
    add_pack_options(p)
    add_json(p)
    add_progress(p)


def add_unpack(add) -> None:
    p = add("unpack", help="extract and relocate a crate archive into a new directory")
    p.add_argument("archive", help="a crate archive (.tar.zst or .tar.gz)")
    p.add_argument("dest", help="the new directory to unpack into (must not exist)")
    p.add_argument(
        "--python", help="base interpreter for a venv crate (default: a matching one on this host)"
    )
    p.add_argument("--sha256", help="expected blob digest of the archive")
    add_json(p)
    add_progress(p)


def add_info(add) -> None:
    p = add("info", help="show a crate's manifest (an archive, or a ref in a store)")
    p.add_argument("ref", metavar="REF", help="archive path, crate id, 12+ hex prefix or tag")
    add_store(p)
    add_cache(p)
    p.add_argument(
        "--pins",
        action="store_true",
        help="print the pins: pip requirements; for conda crates an @EXPLICIT list "
        "with the pip requirements as comments after it",
    )
    p.add_argument(
        "--pins-only",
        choices=["pip", "conda"],
        help="print only the pip requirements or only the @EXPLICIT list (implies --pins)",
    )
    add_json(p)


def add_verify(add) -> None:
    p = add(
        "verify",
        help="recompute an archive's digests, or check an unpacked crate in a cache (--cache)",
    )
    p.add_argument(
        "ref",
        metavar="ARCHIVE|REF",
        help="an archive file; or a crate id, prefix, tag or prefix path in the caches",
    )
    add_cache(p)
    p.add_argument("--sha256", help="expected blob digest (default: the one in <archive>.json)")
    add_json(p)


def cmd_pack(args) -> int:
    from ..packing import pack
    from ..progress import wanted

    crate = pack(args.env, args.output, **pack_options(args))
    obj = {
        "id": crate.id,
        "blob": crate.blob,
        "size": crate.size,
        "format": crate.format,
        "archive": str(crate.archive),
        "seconds": round(crate.seconds, 3),
    }
    if not args.json and wanted(args.progress):
        print(f"packed {crate.archive} ({human_size(crate.size)})", file=sys.stderr)
    return emit(args, obj, crate.id)


def cmd_unpack(args) -> int:
    from ..procs import BackgroundHash

    hashed = None
    if args.sha256 or os.path.isfile(args.archive + ".json"):  # a digest to check
        # Started first: it hashes while this process imports the unpacker.
        hashed = BackgroundHash(args.archive)
    try:
        from ..node.unpack import read_manifest, unpack
        from ..progress import wanted

        dest = unpack(
            args.archive,
            args.dest,
            python=args.python,
            blob=args.sha256,
            progress=wanted(args.progress),
            hashed=hashed,
        )
    finally:
        if hashed is not None:
            hashed.cancel()
    manifest = read_manifest(args.archive)
    return emit(args, {"id": manifest.id, "prefix": str(dest)}, str(dest))


def cmd_info(args) -> int:
    if os.path.isfile(args.ref) and not args.store and not args.cache:
        from ..node.unpack import read_head

        manifest = read_head(args.ref)  # the id checked against the table
        size, where = os.path.getsize(args.ref), args.ref
    elif args.cache:
        from ..crate.manifest import Manifest
        from ..node import admin as cache_admin
        from ..node.cache import cache_list

        entry = cache_admin.find(cache_list(args.cache), args.ref)[0]
        with open(os.path.join(entry["prefix"], ".envcrate", "manifest.json"), "rb") as f:
            manifest = Manifest.from_bytes(f.read())
        size, where = entry["size"], entry["prefix"]
    else:
        from ..crate.record import manifest_of
        from ..stores import open_store

        store = open_store(args.store)
        record = store.record(store.resolve(args.ref))
        manifest = manifest_of(record)
        archives = record.get("archives", [])
        size = min((a.get("size", 0) for a in archives), default=0)
        where = f"{store.url} ({', '.join(a.get('format', '?') for a in archives)})"
    m = manifest.data
    if args.pins_only == "conda" and m["kind"] != "conda":
        raise EnvcrateError(
            f"{manifest.id} is a {m['kind']} crate: it has no conda packages; "
            "`--pins-only pip` prints its pip requirements"
        )
    if args.pins or args.pins_only:
        from ..envs.pins import pins_text

        return emit(
            args,
            {"id": manifest.id, "pins": manifest.pins},
            pins_text(manifest.pins, args.pins_only or "all"),
        )
    if args.json:
        return emit(args, dict(m, archive_size=size), "")
    py = m.get("python") or {}
    plat = m["platform"]
    libc = plat.get("libc") or {}
    rows = [
        ("id", m["id"]),
        ("kind", m["kind"]),
        ("name", m.get("name", "")),
        (
            "platform",
            f"{plat['os']}-{plat['machine']}"
            + (f", glibc >= {libc['version']}" if libc.get("version") else ""),
        ),
        (
            "python",
            f"{py.get('implementation', '?')} {py.get('version', '?')}{py.get('abiflags', '')}",
        ),
        ("prefix", m["prefix"]),
        ("files", f"{m['files']['count']} ({human_size(m['files']['bytes'])})"),
        ("archive", f"{where}, {human_size(size)}"),
        ("relocated", f"{len(m.get('prefix_files', []))} files embed the prefix"),
        ("pins", f"{len(manifest.pins)}"),
    ]
    flags = [k for k, v in (m.get("flags") or {}).items() if v]
    if flags:
        rows.append(("packed with", ", ".join(f"--allow-{k.replace('_', '-')}" for k in flags)))
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    from ..envs.pins import requirement

    text += "\n" + "\n".join(f"  {requirement(p)}" for p in manifest.pins)
    print(text)
    return 0


def cmd_verify(args) -> int:
    if args.cache or not os.path.isfile(args.ref):
        # REF in the caches (the default ones without --cache), or an entry's path
        from .caches import verify_cache

        return verify_cache(args)
    from ..crate.verify import verify_archive

    v = verify_archive(args.ref, args.sha256)
    obj = {
        "id": v.id,
        "blob": v.blob,
        "blob_recorded": v.blob_recorded,
        "entries": v.files,
        "ok": True,
    }
    if not args.json:
        note = "" if v.blob_recorded else " (no recorded blob digest to compare)"
        print(f"ok: {v.files} entries match {v.id}; blob {v.blob}{note}", file=sys.stderr)
    return emit(args, obj, v.id)


EXAMPLES = {
    "pack": [
        "envcrate pack ~/envs/md-tools -o /tmp/",
        "envcrate pack --name md-tools --format tar.gz -o md-tools.tar.gz",
    ],
    "unpack": ["envcrate unpack md-tools-1f26a1c6b65f.tar.zst /scratch/$USER/md-tools"],
    "info": ["envcrate info md-tools:2026-11 --pins", "envcrate info md-tools.tar.zst --json"],
    "verify": [
        "envcrate verify md-tools-1f26a1c6b65f.tar.zst",
        "envcrate verify md-tools --cache /scratch/$USER/envcrate",
    ],
    "diff": [
        "envcrate diff md-tools:2026-11 md-tools:2026-12 --store /project/envcrate/store",
        "envcrate diff old.tar.zst new.tar.zst --json",
    ],
}


def add_diff(add) -> None:
    from .common import add_json, add_store

    p = add(
        "diff",
        help="what differs between two crates: pins and files",
        description="List the pins added, removed and changed between crates A and B, and the "
        "files whose archived entry differs. A and B are archives, or refs in the store (whose "
        "archives are fetched and checked first).",
    )
    p.add_argument("a", metavar="A", help="an archive, or a crate id, 12+ hex prefix or tag")
    p.add_argument("b", metavar="B", help="the same, to compare A with")
    add_store(p)
    p.add_argument(
        "--files",
        type=int,
        default=20,
        metavar="N",
        help="list at most N files of each kind (default 20; -1: all)",
    )
    add_json(p)


def _head_of(ref: str, store_url, work: str):
    """(manifest, file table) of an archive, or of a store ref's archive
    (fetched, its digest checked): the table checked against the id."""
    from ..crate.head import read_head_and_table

    path = ref
    if not os.path.isfile(ref):
        from ..stores import open_store

        store = open_store(store_url)
        path = str(store.fetch(store.resolve(ref), work))
    return read_head_and_table(path)


def cmd_diff(args) -> int:
    import tempfile

    from ..crate.compare import compare

    with tempfile.TemporaryDirectory(prefix="envcrate-diff-") as work:
        a, ta = _head_of(args.a, args.store, work)
        b, tb = _head_of(args.b, args.store, work)
    d = compare(a, ta, b, tb)
    if args.json:
        return emit(args, d, "")
    if d["same"]:
        print(f"the same crate: {d['a']}")
        return 0
    print(f"A {d['a']}\nB {d['b']}")
    pins, files = d["pins"], d["files"]
    print(
        f"pins: {len(pins['added'])} added, {len(pins['removed'])} removed, "
        f"{len(pins['changed'])} changed"
    )
    for p in pins["added"]:
        print(
            f"  + {p['name']} {p['version']}" + (f" ({p['kind']})" if p["kind"] != "pypi" else "")
        )
    for p in pins["removed"]:
        print(
            f"  - {p['name']} {p['version']}" + (f" ({p['kind']})" if p["kind"] != "pypi" else "")
        )
    for p in pins["changed"]:
        print(
            f"  ~ {p['name']} {p['from']} -> {p['to']}"
            + (f" ({p['kind']})" if p["kind"] != "pypi" else "")
        )
    print(
        f"files: {len(files['added'])} added, {len(files['removed'])} removed, "
        f"{len(files['changed'])} changed"
    )
    for mark, kind in (("+", "added"), ("-", "removed"), ("~", "changed")):
        shown = files[kind] if args.files < 0 else files[kind][: args.files]
        for path in shown:
            print(f"  {mark} {path}")
        if len(shown) < len(files[kind]):
            print(f"  ... and {len(files[kind]) - len(shown)} more {kind} (--files -1: all)")
    return 0


PARSERS = {
    "pack": add_pack,
    "unpack": add_unpack,
    "info": add_info,
    "verify": add_verify,
    "diff": add_diff,
}
COMMANDS = {
    "pack": cmd_pack,
    "unpack": cmd_unpack,
    "info": cmd_info,
    "verify": cmd_verify,
    "diff": cmd_diff,
}
