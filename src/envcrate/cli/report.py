"""The ``report`` command: what the processes on compute nodes did, read
from the report location their ``--report URL`` sends events to (a
directory or an ``s3://`` prefix; :mod:`envcrate.node.report` owns the
format), once or, with ``--follow``, until Ctrl-C."""

from __future__ import annotations

import sys

from ..errors import EnvcrateError


def add_report(add) -> None:
    from .common import add_json

    p = add("report", help="show what the processes sending events to a report did")
    p.add_argument(
        "url", metavar="URL", help="the report: a directory, file:// URL or s3:// prefix"
    )
    p.add_argument(
        "--follow", action="store_true", help="show it again as it changes, until Ctrl-C"
    )
    p.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="SECONDS",
        help="with --follow: how often to read it (default 1)",
    )
    add_json(p)


def _interval(value: str) -> float:
    import argparse

    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 1e6:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds above 0")
    return seconds


def _reader(url: str):
    from ..node.report import Reader, report_directory

    try:
        directory = report_directory(url)
    except ValueError as e:
        raise EnvcrateError(f"{url}: {e}") from None
    if directory is not None:
        return Reader(url)
    from ..stores import open_store

    return Reader(url, open_store(url))


def _read(reader) -> list[dict]:
    try:
        return reader.read()
    except FileNotFoundError:
        raise EnvcrateError(
            f"no report at {reader.url}: no such directory; check the URL, or wait until a node "
            "has sent an event (envcrate report URL --follow waits)"
        ) from None
    except NotADirectoryError:
        raise EnvcrateError(f"no report at {reader.url}: not a directory") from None


def cmd_report(args) -> int:
    reader = _reader(args.url)
    if args.follow:
        return _follow(args, reader)
    rows = _read(reader)
    sums = reader.totals(rows)
    if args.json:
        import json

        print(json.dumps({"processes": rows, "totals": sums}))
    else:
        print(render(reader.url, rows, sums))
    failed = [r for r in rows if r["outcome"] == "FAILED"]
    if failed:
        first = failed[0]
        print(
            f"envcrate: error: {len(failed)} of {len(rows)} processes FAILED (first: "
            f"{_clean(first['host'])} pid {first['pid']}: {_clean(first['error'] or '?')})",
            file=sys.stderr,
        )
        return 1
    return 0


def _follow(args, reader) -> int:
    """Show the report every ``--interval`` seconds: redrawn in place on a
    terminal, else printed again only when it changed."""
    import time

    tty = sys.stdout.isatty() and not args.json
    shown = warned = None
    try:
        while True:
            try:
                text = _snapshot(args, reader)
                warned = None
            except (EnvcrateError, OSError) as e:  # a blip: the next read may work
                message = str(e) if isinstance(e, EnvcrateError) else e.strerror or str(e)
                if message != warned:
                    print(f"envcrate: warning: {message}; trying again", file=sys.stderr)
                    warned = message
                text = shown
            if tty and text is not None:
                now = time.strftime("%H:%M:%S")
                sys.stdout.write(
                    f"\x1b[H\x1b[2J{text}\n\n{now}, every {args.interval:g} s; Ctrl-C to stop\n"
                )
                sys.stdout.flush()
            elif text != shown and text is not None:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
            shown = text
            time.sleep(args.interval)
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
        return 0


def _snapshot(args, reader) -> str:
    try:
        rows = reader.read()
    except FileNotFoundError:
        rows = None
    if args.json:
        import json

        return json.dumps({"processes": rows or [], "totals": reader.totals(rows or [])})
    if rows is None:
        return f"no events at {reader.url} yet (no such directory)"
    return render(reader.url, rows, reader.totals(rows))


def render(url: str, rows: list[dict], sums: dict) -> str:
    """The table of ``rows`` and the totals line."""
    if not rows:
        text = f"no events at {url} yet"
    else:
        failed = any(r["outcome"] == "FAILED" for r in rows)
        head = ("HOST", "PID", "CRATE", "STATE", "DOWNLOAD", "EXTRACT", "RELOCATE", "TOTAL")
        table = [head + (("ERROR",) if failed else ())]
        for r in rows:
            cells = (
                _clean(r["host"]),
                str(r["pid"]),
                _short(r["crate"]),
                r["outcome"] if r["outcome"] != "running" else r["state"],
                _seconds(r["downloading"]),
                _seconds(r["extracting"]),
                _seconds(r["relocating"]),
                _seconds(r["seconds"]),
            )
            if failed:
                cells += (_clean(r["error"] or "") if r["outcome"] == "FAILED" else "",)
            table.append(cells)
        text = _table(table) + "\n" + _totals_line(sums)
    skipped = []
    if sums.get("unreadable"):
        skipped.append(_plural(sums["unreadable"], "unreadable line"))
    if sums.get("skipped"):
        skipped.append(
            _plural(
                sums["skipped"],
                "object that is not an event file",
                "objects that are not event files",
            )
        )
    if skipped:
        text += f"\n(skipped {' and '.join(skipped)})"
    return text


def _totals_line(s: dict) -> str:
    hosts = _plural(s["hosts"], "host")
    counts = ", ".join(f"{s[k]} {k}" for k in ("HIT", "READY", "WAITED", "FAILED", "running"))
    return f"{_plural(s['processes'], 'process', 'processes')} on {hosts}: {counts}"


def _plural(n: int, one: str, many: str | None = None) -> str:
    if n == 1:
        return f"1 {one}"
    return f"{n} {many if many is not None else one + 's'}"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _short(crate: str | None) -> str:
    if not crate:
        return "-"
    return _clean(crate.split(":", 1)[-1][:12])


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _clean(text: str) -> str:
    """``text`` safe to print on a terminal: what a node wrote may hold
    escape sequences; no control characters (nor lone surrogates, which no
    encoding takes), one line."""
    return "".join(
        "?" if ord(c) < 32 or 127 <= ord(c) < 160 or 0xD800 <= ord(c) < 0xE000 else c for c in text
    )


EXAMPLES = {
    "report": [
        "envcrate run md-tools:2026-11 --report /shared/$USER/report/run-7 -- python sim.py   # on each node",
        "envcrate report /shared/$USER/report/run-7 --follow",
        "envcrate report s3://bucket/reports/run-7 --json | jq .totals",
    ],
}
PARSERS = {"report": add_report}
COMMANDS = {"report": cmd_report}
