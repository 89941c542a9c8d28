"""What differs between two crates: pins added, removed and changed, and
files whose archived entry (type, mode, content digest or link target)
differs, for the "why did my results change" question (``envcrate diff``)."""

from .manifest import FileRow, Manifest, decode_table


def _pins(manifest: "Manifest") -> "dict[tuple[str, str], str]":
    out = {}
    for p in manifest.pins:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            continue
        kind = p.get("kind") or "pypi"
        name = p["name"].lower().replace("_", "-")
        version = str(p.get("version", ""))
        if kind == "conda" and p.get("build"):
            version += f" {p['build']}"
        out[(kind, name)] = version
    return out


def _entry(row: "FileRow") -> tuple:
    return (row.type, row.mode, row.digest)


def compare(a: "Manifest", a_table: bytes, b: "Manifest", b_table: bytes) -> dict:
    """``{"a", "b", "same", "pins": {"added", "removed", "changed"},
    "files": {"added", "removed", "changed"}}``: pins as ``{"kind", "name",
    "version"}`` (changed: ``"from"``, ``"to"``), files as paths."""
    pa, pb = _pins(a), _pins(b)
    pins = {
        "added": [{"kind": k, "name": n, "version": pb[k, n]} for k, n in sorted(pb.keys() - pa)],
        "removed": [{"kind": k, "name": n, "version": pa[k, n]} for k, n in sorted(pa.keys() - pb)],
        "changed": [
            {"kind": k, "name": n, "from": pa[k, n], "to": pb[k, n]}
            for k, n in sorted(pa.keys() & pb.keys())
            if pa[k, n] != pb[k, n]
        ],
    }
    fa = {r.path: _entry(r) for r in decode_table(a_table)}
    fb = {r.path: _entry(r) for r in decode_table(b_table)}
    files = {
        "added": sorted(fb.keys() - fa.keys()),
        "removed": sorted(fa.keys() - fb.keys()),
        "changed": sorted(p for p in fa.keys() & fb.keys() if fa[p] != fb[p]),
    }
    return {"a": a.id, "b": b.id, "same": a.id == b.id, "pins": pins, "files": files}
