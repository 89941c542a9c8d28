"""The ``envcrate`` command line: argument parsing and printing only."""

from __future__ import annotations

import os
import sys

from .errors import EnvcrateError

TYPE_CHECKING = False
if TYPE_CHECKING:  # argparse is imported only when a parser is built
    import argparse


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show progress on stderr even when it is not a terminal",
    )


def _add_pack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=["tar.zst", "tar.gz"],
        help="archive format (default: from -o's name, else tar.zst)",
    )
    p.add_argument(
        "--level",
        type=int,
        help="compression level: zstd 1-22 (default: a tuned fast setting close to level 3's ratio), gzip 1-9 (default 6)",
    )
    p.add_argument("--threads", type=int, help="compression threads (default: all cores)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out matching paths (repeatable)",
    )
    p.add_argument(
        "--name", metavar="NAME", help="the conda env of this name (found without running conda)"
    )
    from .envs import ALLOWANCES

    for what, text in ALLOWANCES.items():
        p.add_argument(
            f"--allow-{what}", dest="allow", action="append_const", const=what, help=text
        )


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="URL",
        help="directory, file://, s3:// or https:// store "
        "(default: $ENVCRATE_STORE, then the local store in the user data directory)",
    )


def _add_cache(p: argparse.ArgumentParser, many: bool = True) -> None:
    p.add_argument(
        "--cache",
        action="append",
        default=[],
        metavar="DIR",
        help="cache directory, searched in order"
        + (" (repeatable)" if many else "")
        + " (default: $ENVCRATE_CACHE, then the user cache directory)",
    )


def _add_ensure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ref", metavar="REF", help="crate id, 12+ hex prefix, tag, archive path or archive URL"
    )
    _add_store(p)
    _add_cache(p)
    p.add_argument("--python", help="base interpreter for a venv crate")
    p.add_argument("--sha256", metavar="DIGEST", help="blob digest of an archive URL or file")
    p.add_argument("--events", metavar="FILE", help="append bootstrap events (JSON lines) to FILE")


class _Skip:
    """Stands in for the parsers of the commands not being run: building all
    of them costs the warm ``ensure`` path about 10 ms."""

    def add_argument(self, *args, **kwargs) -> None:
        return None


def parser(only: str | None = None) -> argparse.ArgumentParser:
    import argparse

    ap = argparse.ArgumentParser(
        prog="envcrate",
        description="Pack Python environments into content-addressed crates and unpack them anywhere.",
    )
    from . import __version__

    ap.add_argument("--version", action="version", version=f"envcrate {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, **kwargs):
        if only is not None and name != only:
            return _Skip()
        return sub.add_parser(name, **kwargs)

    p = add("pack", help="pack a venv or conda env into a crate archive")
    p.add_argument(
        "env", nargs="?", help="the env's prefix (default: $VIRTUAL_ENV, then $CONDA_PREFIX)"
    )
    p.add_argument(
        "-o", "--output", help="archive path or directory (default: ./<name>-<id12>.<format>)"
    )
    _add_pack_options(p)
    _add_json(p)
    _add_progress(p)

    p = add("unpack", help="extract and relocate a crate archive into a new directory")
    p.add_argument("archive")
    p.add_argument("dest")
    p.add_argument(
        "--python", help="base interpreter for a venv crate (default: a matching one on this host)"
    )
    p.add_argument("--sha256", help="expected blob digest of the archive")
    _add_json(p)
    _add_progress(p)

    p = add("push", help="publish a packed archive to a store")
    p.add_argument("archive")
    _add_store(p)
    p.add_argument("--tag", metavar="NAME", help="also point this tag at the crate")
    _add_json(p)
    _add_progress(p)

    p = add("ship", help="pack an env and publish it, unless the store has it")
    p.add_argument(
        "env", nargs="?", help="the env's prefix (default: $VIRTUAL_ENV, then $CONDA_PREFIX)"
    )
    _add_store(p)
    p.add_argument("--tag", metavar="NAME", help="also point this tag at the crate")
    _add_pack_options(p)
    _add_json(p)
    _add_progress(p)

    p = add("ls", help="list the crates in a store, or in caches with --cache")
    _add_store(p)
    _add_cache(p)
    _add_json(p)

    p = add("info", help="show a crate's manifest (an archive, or a ref in a store)")
    p.add_argument("ref", metavar="REF", help="archive path, crate id, 12+ hex prefix or tag")
    _add_store(p)
    _add_cache(p)
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
    _add_json(p)

    p = add("tag", help="point a tag at a crate in a store")
    p.add_argument("ref", metavar="REF")
    p.add_argument("name", metavar="NAME")
    _add_store(p)
    _add_json(p)

    p = add("rm", help="remove a crate from a store, or from caches with --cache")
    p.add_argument("ref", metavar="REF")
    _add_store(p)
    _add_cache(p)
    p.add_argument("--force", action="store_true", help="remove it even when tagged (and the tags)")
    _add_json(p)

    p = add("fsck", help="check a store for unusable objects; --repair removes them")
    _add_store(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove orphan blobs older than an hour, damaged archives (and records left "
        "with none) and broken tags",
    )
    _add_json(p)

    p = add("url", help="print a presigned HTTPS URL and the digest of a crate's archive")
    p.add_argument("ref", metavar="REF")
    _add_store(p)
    p.add_argument(
        "--expires", type=int, default=3600, metavar="SECONDS", help="validity (default 3600)"
    )
    p.add_argument("--format", choices=["tar.zst", "tar.gz"], help="which archive (default: first)")
    _add_json(p)

    p = add(
        "verify",
        help="recompute an archive's digests, or check an unpacked crate in a cache (--cache)",
    )
    p.add_argument("ref", metavar="ARCHIVE|REF")
    _add_cache(p)
    p.add_argument("--sha256", help="expected blob digest (default: the one in <archive>.json)")
    _add_json(p)

    p = add("ensure", help="materialise a crate into the cache once; print its prefix")
    _add_ensure_options(p)
    p.add_argument("--lease", type=int, metavar="PID", help="keep it from gc while PID runs")
    _add_json(p)
    _add_progress(p)

    p = add("activate", help="print shell code that activates a crate (for eval)")
    _add_ensure_options(p)
    p.add_argument("--shell", choices=["sh", "bash", "zsh", "fish"], help="default: from $SHELL")

    p = add("run", help="run a command in a crate")
    _add_ensure_options(p)
    p.add_argument("--", dest="dashdash", metavar="COMMAND [ARG]...", help="the command to run")

    p = add("gc", help="remove least-recently-used, unleased crates from caches")
    _add_cache(p)
    p.add_argument("--max-size", metavar="SIZE", help="shrink each cache below SIZE (e.g. 20G)")
    p.add_argument(
        "--unused-for", metavar="DURATION", help="remove crates unused this long (e.g. 30d)"
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    _add_json(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:  # everything after -- is the command, untouched
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = _fast_ensure_args(argv)
    if args is None:
        args = parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    args.argv = command
    try:
        return COMMANDS[args.command](args)
    except EnvcrateError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("envcrate: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        _fail(os_error_message(e))
    return 1


def os_error_message(e: OSError) -> str:
    """One line: what failed (the error, the path) and what to do about it."""
    import errno

    path = e.filename if e.filename is not None else ""
    where = f" ({path})" if path else ""
    what = f"{e.strerror or e}{where}"
    hint = {
        errno.ENOSPC: "free space on that filesystem and try again",
        errno.EACCES: "you lack permission on that path: ask its owner for access, "
        "or choose another path (e.g. --cache DIR of your own)",
        errno.EROFS: "that path is on a read-only filesystem: choose a writable one "
        "(e.g. --cache DIR)",
        errno.EDQUOT: "your disk quota is used up: free space within it, "
        "or choose another filesystem (e.g. --cache DIR)",
        errno.ENOENT: "that path does not exist: create it or fix the path",
    }
    hint[errno.EPERM] = hint[errno.EACCES]
    return f"{what}; {hint.get(e.errno, 'fix the path and try again')}"


class _Args:
    def __init__(self, **values) -> None:
        self.__dict__.update(values)


_ENSURE_VALUES = {"--store", "--cache", "--python", "--sha256", "--events", "--lease"}


def _fast_ensure_args(argv: list[str]):
    """``ensure`` arguments parsed without argparse (whose imports cost the
    warm path about 10 ms), for the plain forms only; anything else (help,
    mistakes, unusual spellings) returns None and goes through argparse."""
    if argv[:1] != ["ensure"]:
        return None
    values: dict = {"store": None, "cache": [], "python": None, "sha256": None, "events": None}
    values.update(lease=None, json=False, progress=None, command="ensure", ref=None)
    rest = argv[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in _ENSURE_VALUES and i + 1 < len(rest):
            key, value = arg[2:], rest[i + 1]
            if key == "cache":
                values["cache"].append(value)
            elif key == "lease":
                if not value.isdigit():
                    return None
                values["lease"] = int(value)
            else:
                values[key] = value
            i += 2
        elif arg == "--json":
            values["json"] = True
            i += 1
        elif arg == "--progress":
            values["progress"] = True
            i += 1
        elif not arg.startswith("-") and values["ref"] is None:
            values["ref"] = arg
            i += 1
        else:
            return None
    return _Args(**values) if values["ref"] is not None else None


def _fail(message: str) -> None:
    print(f"envcrate: error: {message}", file=sys.stderr)
    sys.exit(1)


def _emit(args, obj: dict, text: str) -> int:
    if args.json:
        import json

        print(json.dumps(obj))
    else:
        print(text)
    return 0


def _pack_options(args) -> dict:
    from .progress import wanted

    return dict(
        format=args.format,
        level=args.level,
        threads=args.threads,
        exclude=tuple(args.exclude),
        allow=tuple(args.allow or ()),
        name=args.name,
        progress=wanted(args.progress),
    )


def cmd_pack(args) -> int:
    from .packer import pack
    from .progress import wanted

    crate = pack(args.env, args.output, **_pack_options(args))
    obj = {
        "id": crate.id,
        "blob": crate.blob,
        "size": crate.size,
        "format": crate.format,
        "archive": str(crate.archive),
        "seconds": round(crate.seconds, 3),
    }
    if not args.json and wanted(args.progress):
        print(f"packed {crate.archive} ({_size(crate.size)})", file=sys.stderr)
    return _emit(args, obj, crate.id)


def cmd_unpack(args) -> int:
    from .procs import BackgroundHash

    hashed = None
    if args.sha256 or os.path.isfile(args.archive + ".json"):  # a digest to check
        # Started first: it hashes while this process imports the unpacker.
        hashed = BackgroundHash(args.archive)
    try:
        from .progress import wanted
        from .unpacker import read_manifest, unpack

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
    return _emit(args, {"id": manifest.id, "prefix": str(dest)}, str(dest))


def cmd_info(args) -> int:
    if os.path.isfile(args.ref) and not args.store and not args.cache:
        from .unpacker import read_head

        manifest = read_head(args.ref)  # the id checked against the table
        size, where = os.path.getsize(args.ref), args.ref
    elif args.cache:
        from . import cache_admin
        from .cache import cache_list
        from .manifest import Manifest

        entry = cache_admin.find(cache_list(args.cache), args.ref)[0]
        with open(os.path.join(entry["prefix"], ".envcrate", "manifest.json"), "rb") as f:
            manifest = Manifest.from_bytes(f.read())
        size, where = entry["size"], entry["prefix"]
    else:
        from .record import manifest_of
        from .stores import open_store

        store = open_store(args.store)
        record = store.record(store.resolve(args.ref))
        manifest = manifest_of(record)
        archives = record.get("archives", [])
        size = min((a.get("size", 0) for a in archives), default=0)
        where = f"{store.url} ({', '.join(a.get('format', '?') for a in archives)})"
    m = manifest.data
    if args.pins or args.pins_only:
        from .pins import pins_text

        return _emit(
            args,
            {"id": manifest.id, "pins": manifest.pins},
            pins_text(manifest.pins, args.pins_only or "all"),
        )
    if args.json:
        return _emit(args, dict(m, archive_size=size), "")
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
        ("files", f"{m['files']['count']} ({_size(m['files']['bytes'])})"),
        ("archive", f"{where}, {_size(size)}"),
        ("relocated", f"{len(m.get('prefix_files', []))} files embed the prefix"),
        ("pins", f"{len(manifest.pins)}"),
    ]
    flags = [k for k, v in (m.get("flags") or {}).items() if v]
    if flags:
        rows.append(("packed with", ", ".join(f"--allow-{k.replace('_', '-')}" for k in flags)))
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    from .pins import requirement

    text += "\n" + "\n".join(f"  {requirement(p)}" for p in manifest.pins)
    print(text)
    return 0


def cmd_verify(args) -> int:
    if args.cache or not os.path.isfile(args.ref):
        return _verify_cache(
            args
        )  # REF in the caches (default ones without --cache), or an entry's path
    from .verify import verify_archive

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
    return _emit(args, obj, v.id)


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
        print(f"{shipped.store}: {what} ({_size(shipped.size)})", file=sys.stderr)
    return _emit(args, obj, shipped.id)


def cmd_push(args) -> int:
    from .progress import wanted
    from .shipping import push

    return _shipped(
        args, push(args.archive, args.store, tag=args.tag, progress=wanted(args.progress))
    )


def cmd_ship(args) -> int:
    from .shipping import ship

    return _shipped(args, ship(args.env, args.store, tag=args.tag, **_pack_options(args)))


def cmd_ls(args) -> int:
    if args.cache:
        return _ls_cache(args)
    from .ids import short_id
    from .stores import open_store

    store = open_store(args.store)
    problems: list[str] = []
    crates = store.listing(problems)
    for p in problems:  # the rest is listed: one bad object does not hide them
        print(f"envcrate: warning: {p}", file=sys.stderr)
    if args.json:
        return _emit(args, {"store": store.url, "crates": crates, "problems": problems}, "")
    rows = [("ID", "TAGS", "NAME", "KIND", "PYTHON", "SIZE", "CREATED")]
    for c in crates:
        rows.append(
            (
                short_id(c["id"]),
                ",".join(c["tags"]) or "-",
                c["name"] or "-",
                c["kind"] or "-",
                c["python"] or "-",
                _size(c["size"]),
                c["created"],
            )
        )
    _print_table(rows)
    return 0


def cmd_tag(args) -> int:
    from .stores import open_store

    store = open_store(args.store)
    crate_id = store.set_tag(args.ref, args.name)
    return _emit(args, {"id": crate_id, "tag": args.name, "store": store.url}, crate_id)


def cmd_rm(args) -> int:
    if args.cache:
        return _rm_cache(args)
    from .stores import open_store

    store = open_store(args.store)
    removed = store.remove(args.ref, force=args.force)
    if not args.json:
        tags = f" and tags {', '.join(removed['tags'])}" if removed["tags"] else ""
        print(f"removed {removed['id']}{tags} from {store.url}", file=sys.stderr)
    return _emit(args, dict(removed, store=store.url), removed["id"])


def cmd_fsck(args) -> int:
    from .stores import open_store
    from .stores.fsck import fsck

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
    from .stores import blob_key, open_store

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
    return _emit(args, obj, f"{url}\n{a['blob']}")


def _ensure(args, lease: int | str | None = None):
    from .cache import ensure_crate

    return ensure_crate(
        args.ref,
        args.store,
        args.cache,
        python=args.python,
        sha256=args.sha256,
        events=args.events,
        lease=lease,
        progress=wanted_progress(args),
    )


def wanted_progress(args) -> bool:
    from .progress import wanted

    return wanted(getattr(args, "progress", False))


def cmd_ensure(args) -> int:
    done = _ensure(args, args.lease)
    obj = {"id": done.id, "prefix": done.path, "state": done.state}
    obj["seconds"] = round(done.seconds, 6)
    return _emit(args, obj, done.path)


def _manifest_kind(prefix) -> str:
    from .cache import read_marker

    return (read_marker(prefix) or {}).get("kind") or "venv"


def cmd_activate(args) -> int:
    from . import activation, leases

    # A short-lived lease of our own covers the entry until the evaluating
    # shell has made its lease (with its $$) and removed this one.
    done = _ensure(args, lease=f"{leases.TTL_MARK}{os.getpid()}")
    act = activation.environment(done.prefix, _manifest_kind(done.prefix), dict(os.environ))
    shell = activation.detect_shell(args.shell)
    lease = (leases.lease_dir(done.cache, done.key), leases.lease_name(""), done.lease)
    sys.stdout.write(activation.shell_code(shell, act, lease))
    return 0


def cmd_run(args) -> int:
    from . import activation

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
    from . import cache_admin
    from .cache import cache_list

    report = cache_admin.gc(
        cache_list(args.cache),
        max_size=cache_admin.parse_size(args.max_size) if args.max_size else None,
        unused_for=cache_admin.parse_duration(args.unused_for) if args.unused_for else None,
        dry_run=args.dry_run,
    )
    if args.json:
        return _emit(args, report, "")
    verb = "would free" if args.dry_run else "freed"
    for r in report["removed"]:
        print(f"{'would remove' if args.dry_run else 'removed'} {r['prefix']} ({_size(r['size'])})")
    for k in report["kept"]:
        why = f"in use by {', '.join(k['leases'])}" if k.get("leases") else k.get("error", "")
        print(f"kept {k['prefix']}: {why}")
    for c in report["cleaned"]:
        print(f"{'would clean' if args.dry_run else 'cleaned'} {c}")
    print(f"{verb} {_size(report['freed'])} in {len(report['removed'])} crates")
    return 0


def _ls_cache(args) -> int:
    import time

    from . import cache_admin
    from .cache import cache_list
    from .ids import short_id

    found = cache_admin.entries(cache_list(args.cache))
    if args.json:
        return _emit(args, {"crates": found}, "")
    rows = [("ID", "TAGS", "NAME", "SIZE", "LAST USE", "IN USE", "PREFIX")]
    for e in found:
        rows.append(
            (
                short_id(e["id"]),
                ",".join(e["tags"]) or "-",
                e["name"] or "-",
                _size(e["size"]),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_use"])),
                str(len(e["in_use"])) if e["in_use"] else "-",
                e["prefix"],
            )
        )
    _print_table(rows)
    return 0


def _rm_cache(args) -> int:
    from pathlib import Path

    from . import cache_admin
    from .cache import cache_list

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
    return _emit(args, {"id": e["id"], "removed": removed}, e["id"])


def _verify_cache(args) -> int:
    from pathlib import Path

    from . import cache_admin
    from .cache import cache_list

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


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


COMMANDS = {
    "pack": cmd_pack,
    "unpack": cmd_unpack,
    "push": cmd_push,
    "ship": cmd_ship,
    "ls": cmd_ls,
    "info": cmd_info,
    "tag": cmd_tag,
    "rm": cmd_rm,
    "fsck": cmd_fsck,
    "url": cmd_url,
    "verify": cmd_verify,
    "ensure": cmd_ensure,
    "activate": cmd_activate,
    "run": cmd_run,
    "gc": cmd_gc,
}


if __name__ == "__main__":
    sys.exit(main())
