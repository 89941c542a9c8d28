"""Source environments: venvs, conda envs and their installed distributions,
read into entries (what to archive) and pins (what is installed).

Owns finding an env (the active one, a path, a conda env by name), walking it
(:mod:`.base`), the venv and conda readers (:mod:`.venv`, :mod:`.conda`),
installed distributions (:mod:`.dists`) and the rendering of pins
(:mod:`.pins`). It may import the crate format's entry and manifest
(:mod:`envcrate.crate`: what it produces) and the ground floor; conda-pack
is imported inside the conda reader."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import SourceEnvError

if TYPE_CHECKING:  # the walker is imported only to load an env, not for ALLOWANCES
    from .base import SourceEnv


def resolve_env_path(env: str | None) -> str:
    """The prefix to pack: ``env`` or the active environment."""
    if env is None:
        env = os.environ.get("VIRTUAL_ENV") or os.environ.get("CONDA_PREFIX")
        if not env:
            raise SourceEnvError(
                "no environment given and none is active ($VIRTUAL_ENV and $CONDA_PREFIX are unset); "
                "pass the env's path"
            )
    path = os.path.abspath(os.path.expanduser(env))
    if not os.path.isdir(path):
        raise SourceEnvError(f"{path} is not a directory; pass the path of a venv or conda env")
    return path


# What packing refuses unless allowed (``--allow-<name>``), and what that packs.
ALLOWANCES = {
    "editable": "pack editable/out-of-env installs anyway",
    "system-site-packages": "pack a venv that sees system site-packages",
    "missing-files": "pack a conda env whose managed files were deleted or overwritten",
    "missing-cache": "pack a conda env whose package cache is gone (its files as they are)",
}


def load_env(
    env: str | os.PathLike | None,
    exclude=(),
    allow=(),
    name: str | None = None,
) -> SourceEnv:
    """The source env at ``env`` (default: the active one), or the conda env
    called ``name``; ``exclude`` is any iterable of globs, ``allow`` any of
    :data:`ALLOWANCES`."""
    allow = set(allow)
    unknown = allow.difference(ALLOWANCES)
    if unknown:
        raise ValueError(f"unknown allowances {sorted(unknown)}; choose from {list(ALLOWANCES)}")
    if name is not None:
        if env is not None:
            raise SourceEnvError("give the env's path or --name, not both")
        from .conda import find_named

        env = find_named(name)
    prefix = resolve_env_path(None if env is None else os.fspath(env))
    exclude = tuple(exclude)
    if os.path.isfile(os.path.join(prefix, "pyvenv.cfg")):
        from . import venv

        return venv.load(prefix, exclude, "editable" in allow, "system-site-packages" in allow)
    if os.path.isdir(os.path.join(prefix, "conda-meta")):
        from . import conda

        return conda.load(
            prefix,
            exclude,
            allow_editable="editable" in allow,
            allow_missing_files="missing-files" in allow,
            allow_missing_cache="missing-cache" in allow,
        )
    raise SourceEnvError(
        f"{prefix} is neither a venv (no pyvenv.cfg) nor a conda env (no conda-meta/)"
    )


__all__ = ["ALLOWANCES", "load_env", "resolve_env_path"]
