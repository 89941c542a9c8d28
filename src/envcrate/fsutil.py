"""Small filesystem helpers shared by the packer and the unpacker."""

from __future__ import annotations

import os


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
