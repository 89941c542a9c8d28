"""Checking a store for what no reader can use, and repairing it.

A store is written by many clients that may be killed at any moment and read
by nodes that trust nothing in it, so objects go wrong in a few known ways:
a blob whose record was never written (its publisher died), a record whose
blob is missing or damaged, a record or tag that is not what its name says,
a tag pointing at nothing, and a build record (``envcrate build``) that is
malformed or names a crate that is not there. :func:`fsck` finds them on any backend that can
list (not HTTP) and, with ``repair``, removes what is of no use.

A blob without a record is also what a push in progress looks like (the blob
is written before the record), so such a blob counts as a problem, and is
removed, only when it is older than ``orphan_age`` (an hour).
"""

from __future__ import annotations

import json
import re
import time

from ..crate.record import digests_named, encode_record, is_digest
from ..errors import StoreError
from .base import Store, Stored, blob_key, record_key, tag_key

ORPHAN_AGE = 3600.0

_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})\Z")
_BUILD = re.compile(r"^builds/[0-9a-f]{64}\.json\Z")


def fsck(
    store: Store,
    *,
    repair: bool = False,
    now: float | None = None,
    orphan_age: float = ORPHAN_AGE,
) -> dict:
    """The store's problems (and, with ``repair``, what was done about them):
    ``{"store", "ok", "problems": [{"problem", "key", "detail", "repaired"}],
    "recent": [blob keys too young to judge], "repaired": [lines],
    "checked": {"records", "blobs", "tags"}}``; ``ok`` is true when no
    problem is left."""
    store.check_present()
    if not store.can_list:
        raise StoreError(
            f"{store.url} cannot be listed (HTTP), so it cannot be checked; run "
            "`envcrate fsck` on the directory or s3:// store it serves"
        )
    if repair:
        store.require_writable()
    now = time.time() if now is None else now
    problems: list[dict] = []
    done: list[str] = []

    def problem(kind: str, key: str, detail: str) -> dict:
        p = {"problem": kind, "key": key, "detail": detail, "repaired": False}
        problems.append(p)
        return p

    def fixed(p: dict, what: str) -> None:
        p["repaired"] = True
        done.append(what)

    blobs = {o.key: o for o in store.walk("blobs/")}
    referenced: set[str] = set()  # blob digests some record lists and keeps
    published: set[str] = set()  # crate ids with a record (readable or not)
    damaged: list[tuple[str, dict, list, list]] = []  # (crate id, record, kept, dropped)
    crate_ids = store.crate_ids()
    for crate_id in crate_ids:
        key = record_key(crate_id)
        try:
            rec = store.record(crate_id)
        except StoreError as e:
            published.add(crate_id)
            problem("corrupt-record", key, str(e))
            # Not repaired (it may be a newer envcrate's): its blobs stay.
            referenced |= digests_named(store.read(key))
            continue
        if rec is None:
            continue  # removed meanwhile
        keep, dropped = [], []
        for a in rec["archives"]:
            state = _state(store, blobs.get(blob_key(a["blob"])), a)
            if state is None:
                keep.append(a)
                continue
            kind, detail = state
            p = problem(kind, blob_key(a["blob"]), f"{crate_id} ({a['format']}): {detail}")
            dropped.append((p, a))
        referenced.update(a["blob"] for a in keep)
        if dropped and repair:
            damaged.append((crate_id, rec, keep, dropped))
        else:
            referenced.update(a["blob"] for _, a in dropped)
        if keep or not (dropped and repair):
            published.add(crate_id)

    # Repairs once every record has been read: a blob is removed only when no
    # record that stays lists it.
    for crate_id, rec, keep, dropped in damaged:
        key = record_key(crate_id)
        if keep:
            store.write(key, encode_record(dict(rec, archives=keep)))
        else:
            store.delete(key)
        for p, a in dropped:
            what = f"dropped the {a['format']} archive of {crate_id} from its record"
            if p["problem"] == "damaged-blob" and a["blob"] not in referenced:
                store.delete(blob_key(a["blob"]))
                what += " and removed its damaged blob"
            if not keep:
                what += "; no archive was left, so the record was removed"
            fixed(p, what)

    recent = []
    for key, o in sorted(blobs.items()):
        m = _BLOB.match(key)
        if m and m.group(2).startswith(m.group(1)) and "sha256:" + m.group(2) in referenced:
            continue
        age = now - o.mtime
        if age < orphan_age:
            recent.append(key)  # maybe a push in progress: its record comes next
            continue
        detail = "no record lists it" if m else "not a blob name"
        p = problem("orphan-blob", key, f"{detail} ({o.size} bytes, {age / 3600:.1f} h old)")
        if repair:
            store.delete(key)
            fixed(p, f"removed {key}, which no record lists")

    tag_names = store.tag_names()
    for name in tag_names:
        key = tag_key(name)
        try:
            target = store.tag_target(name)
        except StoreError as e:
            p = problem("corrupt-tag", key, str(e))
        else:
            if target is None or target in published:
                continue
            p = problem("dangling-tag", key, f"points at {target}, which is not in the store")
        if repair:
            store.delete(key)
            fixed(p, f"removed the tag {name}")

    # Build records (envcrate build): only a cache of key -> crate, so a bad
    # one is removed (the next build writes it again).
    build_keys = [k for k in store.keys("builds/") if _BUILD.match(k)]
    for key in build_keys:
        try:
            obj = json.loads(store.read(key, 1 << 20) or b"null")
            target = obj.get("crate") if isinstance(obj, dict) else None
            if not is_digest(target):
                raise ValueError
        except (ValueError, StoreError):  # not JSON, not a record, or over 1 MiB
            p = problem("corrupt-build", key, 'not a build record ({"crate": "sha256:..."})')
        else:
            if target in published or store.record(target) is not None:  # published since
                continue
            p = problem("dangling-build", key, f"names {target}, which is not in the store")
        if repair:
            store.delete(key)
            fixed(p, f"removed the build record {key}")

    return {
        "store": store.url,
        "ok": all(p["repaired"] for p in problems),
        "problems": problems,
        "recent": recent,
        "repaired": done,
        "checked": {
            "records": len(crate_ids),
            "blobs": len(blobs),
            "tags": len(tag_names),
            "builds": len(build_keys),
        },
    }


def _state(store: Store, found: Stored | None, a: dict) -> tuple[str, str] | None:
    """None when the archive's blob is intact, else (problem, detail)."""
    if found is None:
        return "missing-blob", "its blob is missing"
    if found.size != a["size"]:
        return "damaged-blob", f"its blob has {found.size} bytes, the record says {a['size']}"
    digest = store.local_digest(blob_key(a["blob"]))
    if digest is not None and digest != a["blob"]:
        return "damaged-blob", f"its blob's digest is {digest}"
    return None
