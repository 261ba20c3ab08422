"""Releasing a set version together with its indexes, and finding what an interrupted run left.

A *release* pairs a set version with the index versions built on it: the set's
``CURRENT`` pins them (``{"version": ..., "indexes": {name: version}}``) and the set
version's ``_release.json`` (``storage.layout.RELEASE``) records the pairing, so a
rollback can restore it. :func:`publish` moves the set and its indexes with one
atomic write of the set's ``CURRENT``; :func:`release_of` reads a pairing back. The
lookups below find index versions built on a set version, and versions committed
but not yet published by an earlier attempt of the same run (a rerun resumes after them).
"""
from __future__ import annotations

import json

from storage import layout
from storage.fs import Location
from storage.manifest import Artifact, committed_manifests, dumps, list_names, utcnow


def publish(root: Location, set_name: str, version: str, indexes: dict[str, str]) -> None:
    """Move the set and its indexes in one atomic write of the set's ``CURRENT``.

    Before the switch, the old pairing is pinned explicitly and each index's own
    pointer is moved (invisible while the set pins the old version); the last write
    flips everything at once.
    """
    art = Artifact(root, "sets", set_name)
    old = art.pointer() or {}
    old_pins = dict(old.get("indexes") or {})
    for name in indexes:
        ia = Artifact(root, "indexes", name)
        body = ia.pointer() or {}
        if name not in old_pins and body.get("version"):
            old_pins[name] = body["version"]
    if old.get("version") and old_pins != (old.get("indexes") or {}):
        art.publish(old["version"], indexes=old_pins)
    for name, v in indexes.items():
        Artifact(root, "indexes", name).publish(v, set_name=set_name)
    pins = {**old_pins, **indexes}
    art.version_dir(version).join(layout.RELEASE).write_text(dumps({"indexes": pins, "released_at": utcnow()}))
    art.publish(version, indexes=pins)


def release_of(root: Location, set_name: str, version: str) -> dict[str, str]:
    """The index versions that go with a set version: its release record, else the newest
    committed version of each index built on it."""
    art = Artifact(root, "sets", set_name)
    loc = art.version_dir(version).join(layout.RELEASE)
    if loc.exists():
        return dict(json.loads(loc.read_text())["indexes"])
    out: dict[str, str] = {}
    for m in committed_manifests(root, "indexes"):
        src = m.get("source", {})
        if src.get("set") == set_name and src.get("version") == version:
            out[m["name"]] = m["version"]  # sorted by version: the newest wins
    return out


def indexes_on(root: Location, set_name: str, version: str) -> dict[str, dict]:
    """``{index name: manifest}`` of the current version of every index built on ``set_name`` ``version``."""
    out = {}
    for name in list_names(root, "indexes"):
        ia = Artifact(root, "indexes", name)
        cur = ia.current()
        if cur is None:
            continue
        m = ia.manifest(cur)
        src = m.get("source", {})
        if src.get("set") == set_name and src.get("version") == version:
            out[name] = m
    return out


def built_on(ia: Artifact, set_name: str, version: str) -> "str | None":
    """An unpublished index version already built on the set version (an interrupted run's)."""
    cur = ia.current()
    for v in reversed(ia.versions()):
        if cur is not None and layout.version_number(v) <= layout.version_number(cur):
            break
        src = ia.manifest(v).get("source", {})
        if src.get("set") == set_name and src.get("version") == version:
            return v
    return None


def committed_with_key(art: Artifact, run_key: str) -> "str | None":
    """A version committed by an earlier attempt of this same run but never published."""
    cur = art.current()
    for v in reversed(art.versions()):
        if cur is not None and layout.version_number(v) <= layout.version_number(cur):
            break
        if art.manifest(v).get("run_key") == run_key:
            return v
    return None

