"""envcrate: pack venvs into content-addressed crates, ship them to stores, unpack them anywhere.

The public API; the command line (:mod:`envcrate.cli`) is a thin layer over it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import EnvcrateError  # noqa: E402


def __getattr__(name: str):
    # Lazy: importing envcrate stays cheap (the warm ensure path imports
    # almost nothing: no zstandard, boto3, tqdm, not even dataclasses).
    if name == "Manifest":
        from .manifest import Manifest

        return Manifest
    if name in ("ensure", "Ensured"):
        from . import cache

        return getattr(cache, name)
    if name in ("pack", "Crate"):
        from . import packer

        return getattr(packer, name)
    if name == "unpack":
        from .unpacker import unpack

        return unpack
    if name in ("ship", "push", "Shipped"):
        from . import shipping

        return getattr(shipping, name)
    if name in ("open_store", "Store"):
        from . import stores

        return getattr(stores, name)
    if name == "verify_archive":
        from .verify import verify_archive

        return verify_archive
    raise AttributeError(name)


__all__ = [
    "Crate",
    "EnvcrateError",
    "Ensured",
    "Manifest",
    "Shipped",
    "Store",
    "ensure",
    "open_store",
    "pack",
    "push",
    "ship",
    "unpack",
    "verify_archive",
    "__version__",
]
