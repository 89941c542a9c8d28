"""The ``envcrate`` command line: argument parsing and printing only, thin
over the API.

One module per group of commands, each with its parsers and its ``cmd_*``
functions: :mod:`.crates` (pack, unpack, info, verify, diff), :mod:`.stores`
(push, ship, ls, tag, rm, fsck, url), :mod:`.caches` (ensure, activate, run,
gc), :mod:`.boot` (bootstrap), :mod:`.report` (report), :mod:`.build` (lock, build); :mod:`.common` holds their shared options and printing. This module
builds only the parser of the command being run, and parses the plain forms
of ``ensure`` without argparse: a warm ``envcrate ensure`` imports this
module, :mod:`.caches` and the warm path of :mod:`envcrate.node` only.
"""

from __future__ import annotations

import sys

from ..errors import EnvcrateError

TYPE_CHECKING = False
if TYPE_CHECKING:  # argparse is imported only when a parser is built
    import argparse

# command -> the module of its group, in the order ``--help`` lists them
ROUTES = {
    "pack": "crates",
    "unpack": "crates",
    "push": "stores",
    "ship": "stores",
    "ls": "stores",
    "info": "crates",
    "tag": "stores",
    "rm": "stores",
    "fsck": "stores",
    "url": "stores",
    "verify": "crates",
    "diff": "crates",
    "ensure": "caches",
    "activate": "caches",
    "run": "caches",
    "gc": "caches",
    "bootstrap": "boot",
    "report": "report",
    "lock": "build",
    "build": "build",
}


def _group(command: str):
    """The module of ``command``'s group, imported plainly (so that ``python
    -X importtime`` shows it)."""
    group = ROUTES[command]
    if group == "caches":
        from . import caches

        return caches
    if group == "crates":
        from . import crates

        return crates
    if group == "boot":
        from . import boot

        return boot
    if group == "report":
        from . import report

        return report
    if group == "build":
        from . import build

        return build
    from . import stores

    return stores


def emit(args, obj: dict, text: str) -> int:
    """Print ``obj`` as JSON with ``--json``, else ``text``."""
    if args.json:
        import json

        print(json.dumps(obj))
    else:
        print(text)
    return 0


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
    from .. import __version__

    ap.add_argument("--version", action="version", version=f"envcrate {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, **kwargs):
        if only is not None and name != only:
            return _Skip()
        examples = _group(name).EXAMPLES.get(name, [])
        kwargs.setdefault("description", kwargs.get("help"))
        kwargs["epilog"] = "examples:\n" + "\n".join(f"  {line}" for line in examples)
        kwargs["formatter_class"] = argparse.RawDescriptionHelpFormatter
        return sub.add_parser(name, **kwargs)

    for command in ROUTES:
        if only is None or command == only:
            _group(command).PARSERS[command](add)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:  # everything after -- is the command, untouched
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = _fast_ensure_args(argv)
    if args is None and argv[:1] == ["run"] and not command:
        ap = parser("run")
        args, extra = ap.parse_known_args(argv)
        if extra:
            shown = " ".join(extra)
            ap.error(
                f"unrecognized arguments: {shown}; the command goes after `--` "
                f"(options before it): envcrate run REF -- {shown}"
            )
    if args is None:
        args = parser(argv[0] if argv and argv[0] in ROUTES else None).parse_args(argv)
    args.argv = command
    try:
        return _group(args.command).COMMANDS[args.command](args)
    except EnvcrateError as e:
        message = str(e)
    except KeyboardInterrupt:
        print("envcrate: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        from .common import os_error_message

        message = os_error_message(e)
    print(f"envcrate: error: {message}", file=sys.stderr)
    return 1


class _Args:
    def __init__(self, **values) -> None:
        self.__dict__.update(values)


_ENSURE_VALUES = {"--store", "--cache", "--python", "--sha256", "--events", "--lease", "--report"}


def _fast_ensure_args(argv: list[str]):
    """``ensure`` arguments parsed without argparse (whose imports cost the
    warm path about 10 ms), for the plain forms only; anything else (help,
    mistakes, unusual spellings) returns None and goes through argparse."""
    if argv[:1] != ["ensure"]:
        return None
    values: dict = {"store": None, "cache": [], "python": None, "sha256": None, "events": None}
    values.update(report=None, recipe=None)
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
