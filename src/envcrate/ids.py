"""Crate ids and their short forms; cheap to import (the warm ``ensure``
path uses it)."""

_HEXDIGITS = frozenset("0123456789abcdef")


def normalize_id(text: str) -> "str | None":
    """The hex part of a full id or an id prefix (12 to 64 hex digits, with
    or without ``sha256:``), else None."""
    text = text.strip().lower()
    if text.startswith("sha256:"):
        text = text[7:]
    if 12 <= len(text) <= 64 and _HEXDIGITS.issuperset(text):
        return text
    return None


def short_id(crate_id: str) -> str:
    return crate_id.split(":", 1)[-1][:12]


def blob_digest(text: str) -> str:
    """``sha256:<hex>`` from a digest given with or without its prefix."""
    text = text.strip()
    return text if text.startswith("sha256:") else "sha256:" + text
