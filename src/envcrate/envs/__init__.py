"""Finding and reading source environments."""

from __future__ import annotations

import os

from ..errors import SourceEnvError
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


def load_env(
    env: str | os.PathLike | None,
    exclude=(),
    allow_editable: bool = False,
    allow_system_site_packages: bool = False,
) -> SourceEnv:
    """The source env at ``env`` (default: the active one); ``exclude`` is
    any iterable of globs."""
    prefix = resolve_env_path(None if env is None else os.fspath(env))
    exclude = tuple(exclude)
    if os.path.isfile(os.path.join(prefix, "pyvenv.cfg")):
        from . import venv

        return venv.load(prefix, exclude, allow_editable, allow_system_site_packages)
    if os.path.isdir(os.path.join(prefix, "conda-meta")):
        raise SourceEnvError(
            f"{prefix} is a conda environment; packing conda environments is not supported yet"
        )
    raise SourceEnvError(
        f"{prefix} is neither a venv (no pyvenv.cfg) nor a conda env (no conda-meta/)"
    )


__all__ = ["SourceEnv", "load_env", "resolve_env_path"]
