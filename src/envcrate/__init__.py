"""envcrate: pack venvs into content-addressed crates, ship them to stores, unpack them anywhere.

The public API; the command line (:mod:`envcrate.cli`) is a thin layer over it.
"""

__version__ = "0.1.0"

from .errors import EnvcrateError  # noqa: E402


def __getattr__(name: str):
    # Lazy: importing envcrate stays cheap (the warm ensure path imports
    # almost nothing: no zstandard, boto3, tqdm, not even dataclasses).
    if name == "Manifest":
        from .crate.manifest import Manifest

        return Manifest
    if name in ("ensure", "ensure_crate"):
        from . import fetching

        return getattr(fetching, name)
    if name == "Ensured":
        from .node.cache import Ensured

        return Ensured
    if name in ("pack", "Crate"):
        from . import packing as packer

        return getattr(packer, name)
    if name == "unpack":
        from .node.unpack import unpack

        return unpack
    if name in ("ship", "push", "Shipped"):
        from . import shipping

        return getattr(shipping, name)
    if name in ("open_store", "Store"):
        from . import stores

        return getattr(stores, name)
    if name == "verify_archive":
        from .crate.verify import verify_archive

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
    "ensure_crate",
    "open_store",
    "pack",
    "push",
    "ship",
    "unpack",
    "verify_archive",
    "__version__",
]
