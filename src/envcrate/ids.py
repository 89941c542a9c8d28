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


ARCHIVE_SUFFIXES = (".tar.zst", ".tar.gz")


def looks_like_path(ref: str) -> bool:
    """Whether ``ref`` can only be a path (a crate id, prefix or tag has no
    ``/``)."""
    return "/" in ref


def missing_hint(ref: str) -> str:
    """Why a ref found nothing, when its form tells: a hex prefix too short
    to be one (else "")."""
    text = ref.strip().lower()
    text = text[7:] if text.startswith("sha256:") else text
    if text and len(text) < 12 and _HEXDIGITS.issuperset(text):
        return f" (a crate id prefix needs 12 or more hex digits; {ref} has {len(text)})"
    return ""
