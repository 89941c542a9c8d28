"""Locks: a recipe resolved to exact pins with hashes, without installing.

Venvs: ``uv pip compile --generate-hashes`` (a requirements file that
``uv pip sync`` and ``pip install --require-hashes -r`` accept). Conda:
py-rattler's solver, written as an ``@EXPLICIT`` list of package URLs with
their sha256 (what ``conda create --file`` accepts), and the pip layer, if
any, as ``# pip:`` lines compiled by uv for the solved Python. Header lines
(``# envcrate-...:``) name the recipe's digest, so a lock that no longer
matches its recipe is found.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .recipe import Recipe, RecipeError

HEADER = "# envcrate-"


class LockError(RecipeError):
    """A recipe that does not resolve, or a lock that cannot be used."""


@dataclass(frozen=True)
class Lock:
    path: Path
    recipe: str  # the digest of the recipe it was made from
    kind: str
    python: str  # the Python the pins are for (X.Y, or the conda record's version)
    pip: str  # requirements with hashes (uv's output), or ""
    conda: tuple = ()  # (url, sha256) of each conda package

    @property
    def body(self) -> str:
        """What the build installs: the pins, without the header."""
        lines = [f"{url}#{sha}" for url, sha in self.conda]
        return "\n".join(lines) + "\n--\n" + self.pip


def uv_bin() -> str:
    try:
        import uv

        found = uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        import shutil

        found = shutil.which("uv")
    if found is None:
        raise LockError("uv is not installed: pip install uv (envcrate needs it for venvs)")
    return found


def uv_index_args(recipe: Recipe) -> list[str]:
    args: list[str] = []
    if recipe.index_urls:
        args += ["--index-url", recipe.index_urls[0]]
        for url in recipe.index_urls[1:]:
            args += ["--extra-index-url", url]
    for link in recipe.find_links:
        args += ["--find-links", link]
    if recipe.no_index:
        args.append("--no-index")
    return args


def build_env(recipe: Recipe) -> dict:
    return dict(os.environ, **recipe.env)


def compile_pip(recipe: Recipe, python_version: str, requirements: tuple) -> str:
    """uv's pins with hashes for ``requirements`` under Python ``python_version``."""
    if not requirements:
        return ""
    cmd = [
        uv_bin(), "pip", "compile", "-", "--generate-hashes", "--no-header", "--no-annotate",
        "--quiet", "--python-version", python_version, *uv_index_args(recipe),
    ]  # fmt: skip
    done = subprocess.run(
        cmd,
        input="\n".join(requirements) + "\n",
        capture_output=True,
        text=True,
        env=build_env(recipe),
    )
    if done.returncode != 0:
        raise LockError(f"{recipe.name} does not resolve: {resolver_reason(done.stderr)}")
    return done.stdout


def resolver_reason(stderr: str) -> str:
    """The one line of a resolver's error that says why."""
    lines = [line.strip(" ╰─▶×│").strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("cause:", "Because")):
            return line.removeprefix("cause:").strip()
    return lines[-1] if lines else "the resolver failed without saying why"


def solve_conda(recipe: Recipe, platform: str) -> list:
    """py-rattler's solution for the recipe's specs (and its Python)."""
    try:
        import rattler
    except ImportError:
        raise LockError("py-rattler is not installed: pip install py-rattler") from None
    import asyncio

    specs = list(recipe.specs)
    if not any(s.split()[0].split("=")[0] == "python" for s in specs):
        specs.append(f"python {recipe.python}")

    async def go():
        return await rattler.solve(
            list(recipe.channels), specs, platforms=[platform, "noarch"], virtual_packages=[]
        )

    try:
        return asyncio.run(go())
    except Exception as e:  # rattler's errors are of many classes
        text = str(e).strip().splitlines()
        raise LockError(
            f"{recipe.name} does not resolve: {text[-1] if text else type(e).__name__}"
        ) from None


def conda_platform() -> str:
    import platform as pl

    machine = pl.machine()
    return {"x86_64": "linux-64", "aarch64": "linux-aarch64", "ppc64le": "linux-ppc64le"}.get(
        machine, f"linux-{machine}"
    )


def make(recipe: Recipe) -> str:
    """The lock file's text for ``recipe`` (resolved now)."""
    head = [
        f"# envcrate lock of the recipe {recipe.path.name} ({recipe.name}, {recipe.kind}), made by "
        f"envcrate {__version__}; re-lock with `envcrate lock {recipe.path.name}`",
        f"{HEADER}recipe: {recipe.digest()}",
        f"{HEADER}kind: {recipe.kind}",
    ]
    if recipe.kind == "venv":
        python = ".".join(recipe.python.split(".")[:2])
        pins = compile_pip(recipe, python, recipe.requirements)
        return "\n".join([*head, f"{HEADER}python: {python}", ""]) + pins
    platform = conda_platform()
    records = sorted(solve_conda(recipe, platform), key=lambda r: r.name.normalized)
    pythons = [r for r in records if r.name.normalized == "python"]
    if recipe.pip and not pythons:
        raise LockError(f"{recipe.name} installs pip requirements but its specs bring no python")
    python = str(pythons[0].version) if pythons else ""
    lines = [*head, f"{HEADER}python: {python}", f"{HEADER}platform: {platform}", "@EXPLICIT"]
    for r in records:
        if not r.sha256:
            raise LockError(f"{r.url} has no sha256 in its channel's index; cannot lock it")
        lines.append(f"{r.url}#{r.sha256.hex()}")
    text = "\n".join(lines) + "\n"
    if recipe.pip:
        pins = compile_pip(recipe, ".".join(python.split(".")[:2]), recipe.pip)
        text += "".join(f"# pip: {line}\n" for line in pins.splitlines())
    return text


def write(recipe: Recipe, output: str | os.PathLike | None = None) -> Path:
    """Resolve ``recipe`` and write its lock (default: beside it)."""
    text = make(recipe)
    out = Path(output) if output is not None else recipe.lock_path
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def read(recipe: Recipe, path: str | os.PathLike | None = None) -> Lock:
    """The lock of ``recipe``, checked to be made from this recipe."""
    p = Path(path) if path is not None else recipe.lock_path
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(
            f"{recipe.path.name} has no lock ({p.name}): run `envcrate lock {recipe.path}`"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LockError(f"cannot read the lock {p}: {getattr(e, 'strerror', None) or e}") from None
    lines = text.splitlines()
    fields = {}
    for line in lines:
        if line.startswith(HEADER):
            key, _, value = line[len(HEADER) :].partition(":")
            fields[key.strip()] = value.strip()
    pip, conda, pins = [], [], []
    for line in lines:
        if line.startswith("# pip: "):
            pip.append(line[len("# pip: ") :])
        elif line.startswith("#") or not line.strip() or line.strip() == "@EXPLICIT":
            continue
        elif fields.get("kind") == "conda":  # a package URL#sha256 (venv pins may hold '#' too)
            url, _, sha = line.strip().rpartition("#")
            stem = url.rsplit("/", 1)[-1]
            named = stem.endswith((".conda", ".tar.bz2")) and stem.count("-") >= 2
            if "://" not in url or not named or len(sha) != 64 or sha.strip("0123456789abcdef"):
                raise LockError(
                    f"{p}: {line[:80]!r} is not a conda package URL with its sha256; re-lock the recipe"
                )
            conda.append((url, sha))
        else:
            pins.append(line)
    if fields.get("recipe") != recipe.digest() or fields.get("kind") != recipe.kind:
        raise LockError(
            f"the lock {p.name} no longer matches its recipe {recipe.path.name} (or was not made "
            f"from it): run `envcrate lock {recipe.path}` again"
        )
    body = "\n".join(pins if recipe.kind == "venv" else pip)
    return Lock(
        p,
        fields["recipe"],
        recipe.kind,
        fields.get("python", ""),
        body + "\n" if body else "",
        tuple(conda),
    )
