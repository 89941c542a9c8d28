"""A crate's pins as lists other tools install from: pip requirements, and
conda's ``@EXPLICIT`` spec list (which conda, mamba, micromamba and rattler
read; ``#<md5>`` hashes, since ``#sha256:`` needs conda 24.9+)."""

from __future__ import annotations


def requirement(pin: dict) -> str:
    """A pin as a line of a pip requirements file (or ``name==version`` for a
    conda package)."""
    source = pin.get("source") or {}
    if source.get("type") in ("url", "local"):
        return f"{pin['name']} @ {source['url']}"
    if source.get("type") == "vcs":
        return (
            f"{pin['name']} @ {source.get('vcs', 'git')}+{source['url']}@{source.get('commit', '')}"
        )
    return f"{pin['name']}=={pin['version']}"


def explicit_line(pin: dict) -> str:
    url = pin.get("url") or "/".join(
        x.strip("/") for x in (pin.get("channel", ""), pin.get("subdir", ""), pin.get("fn", ""))
    )
    return url + (f"#{pin['md5']}" if pin.get("md5") else "")


def pins_text(pins: list[dict], which: str = "all") -> str:
    """``which``: "pip" (a requirements file), "conda" (an ``@EXPLICIT``
    list) or "all": for a crate with conda packages, the ``@EXPLICIT`` list
    followed by the pip requirements as comments, so the whole text is still
    a valid explicit file; otherwise the requirements."""
    conda = [p for p in pins if p.get("kind") == "conda"]
    pip = [requirement(p) for p in pins if p.get("kind") != "conda"]
    if which == "pip" or (which == "all" and not conda):
        return "\n".join(pip)
    lines = ["# conda packages: conda create --prefix PREFIX --file FILE", "@EXPLICIT"]
    lines += [explicit_line(p) for p in conda]
    if which == "all" and pip:
        lines.append("# pip packages on top (envcrate info REF --pins-only pip):")
        lines += [f"#   {r}" for r in pip]
    return "\n".join(lines)
