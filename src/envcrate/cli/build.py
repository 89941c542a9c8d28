"""``envcrate lock`` and ``envcrate build``: recipes resolved to pins, and
built into crates once (:mod:`envcrate.build`)."""

import sys

from . import emit


def add_lock(add) -> None:
    p = add(
        "lock",
        help="resolve a recipe to exact pins with hashes, without installing",
        description="Resolve a recipe (TOML) to exact pins with hashes: uv for a venv's "
        "requirements, py-rattler for conda specs (an @EXPLICIT list with sha256). The lock is "
        "written beside the recipe (X.toml -> X.lock) and is what `envcrate build` installs.",
    )
    p.add_argument("recipe", metavar="RECIPE", nargs="?", help="default: ./envcrate.toml")
    p.add_argument("-o", "--output", metavar="LOCK", help="default: beside the recipe")


def add_build(add) -> None:
    from .common import add_json, add_progress, add_store

    p = add(
        "build",
        help="build a recipe's lock into a crate and ship it, unless the store has it",
        description="Compute the recipe's build key (its kind, name, Python, build variables, "
        "the lock's pins, the platform and the crate format). When the store maps the key to a "
        "crate, print its id and build nothing. Otherwise install the lock into a temporary "
        "prefix (uv for venvs, py-rattler for conda), pack and ship it, and record the key "
        "in the store (builds/). Locks the recipe first when it has no lock.",
    )
    p.add_argument("recipe", metavar="RECIPE", nargs="?", help="default: ./envcrate.toml")
    add_store(p)
    p.add_argument("--tag", metavar="NAME", help="also tag the crate")
    add_json(p)
    add_progress(p)


def cmd_lock(args) -> int:
    from ..build import lock, recipe

    r = recipe.load(args.recipe)
    out = lock.write(r, args.output)
    print(out)
    return 0


def cmd_build(args) -> int:
    from ..build.builder import build, main_say
    from ..progress import wanted

    done = build(
        args.recipe,
        args.store,
        tag=args.tag,
        progress=wanted(args.progress),
        say=None if args.json else main_say,
    )
    if not args.json:
        what = "built and shipped" if done.built else "already built (nothing to do)"
        print(f"{what}: {done.id} ({done.seconds:.1f} s)", file=sys.stderr)
    obj = {"id": done.id, "key": done.key, "built": done.built, "seconds": round(done.seconds, 3)}
    obj["tag"] = done.tag
    return emit(args, obj, done.id)


PARSERS = {"lock": add_lock, "build": add_build}
COMMANDS = {"lock": cmd_lock, "build": cmd_build}
EXAMPLES = {
    "lock": ["envcrate lock recipes/scientific.toml", "envcrate lock  # ./envcrate.toml"],
    "build": [
        "envcrate build recipes/scientific.toml --store /project/envcrate/store --tag sci:2026-12",
        "then, anywhere: envcrate ensure --recipe recipes/scientific.toml --store ...",
    ],
}
