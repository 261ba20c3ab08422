"""Garbage collection: drop old versions, delete files no kept version references.

A set version written by a re-index reuses its ancestors' shards in place, so a
version folder can hold files a later version still needs. GC therefore works on
references, never on folders: it resolves every file entry of every *kept*
committed version (sets and their indexes), and deletes only what is under the
set's or index's folder and referenced by none of them.

Kept: the ``keep`` newest committed versions of a set (all when ``keep`` is None),
plus its current version; of each index built on the set, every version built on a
kept set version, the current and pinned ones. A dropped version loses its
manifest first (it disappears from readers atomically), then its files.
Uncommitted version folders are deleted when they can no longer be resumed (older
than the newest committed version) or when their claim is older than ``stale_hours``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging

from storage import layout
from storage.fs import Location
from storage.manifest import Artifact, list_names
from storage.sets import entry_location

logger = logging.getLogger(__name__)

_KEEP_ALWAYS = (layout.CURRENT, "_lease.json")


def _referenced(art: Artifact, versions: list[str]) -> set[str]:
    """URLs of every file the given committed versions use (manifests and release records included)."""
    refs: set[str] = set()
    for v in versions:
        vdir = art.version_dir(v)
        m = art.manifest(v)
        refs.update({vdir.join(layout.MANIFEST).url, vdir.join("_release.json").url, vdir.join(layout.CLAIM).url})
        refs.update(entry_location(vdir, e).url for e in m.get("files", []))
        if (m.get("codec") or {}).get("file"):
            refs.add(vdir.join(m["codec"]["file"]).url)
    return refs


def _age_hours(claim: Location) -> float:
    try:
        when = _dt.datetime.fromisoformat(json.loads(claim.read_text())["claimed_at"])
    except (FileNotFoundError, KeyError, ValueError):
        return float("inf")
    return (_dt.datetime.now(_dt.timezone.utc) - when).total_seconds() / 3600


def _sweep(art: Artifact, committed: list[str], kept: list[str], stale_hours: float, dry_run: bool) -> dict:
    """Delete the dropped versions' manifests, then every unreferenced file under the artifact."""
    dropped = [v for v in committed if v not in kept]
    if not dry_run:
        for v in dropped:
            art.version_dir(v).join(layout.MANIFEST).delete()
            logger.info("dropped %s/%s %s", art.kind, art.name, v)
    refs = _referenced(art, kept)
    newest = max((layout.version_number(v) for v in committed), default=0)
    deleted, freed = [], 0
    for child in art.loc.list():
        try:
            v = layout.normalize_version(child.name)
        except ValueError:
            continue
        if v not in committed and layout.version_number(v) > newest and \
                _age_hours(child.join(layout.CLAIM)) < stale_hours:
            continue  # an uncommitted version a run may still be writing or resume
        for f in child.find():
            if f.url in refs:
                continue
            try:
                freed += f.size()
            except FileNotFoundError:
                continue
            deleted.append(f.url)
            if not dry_run:
                f.delete()
    return {"dropped_versions": dropped, "deleted_files": len(deleted), "freed_bytes": freed}


def collect(root: Location, set_name: "str | None" = None, *, keep: "int | None" = None,
            stale_hours: float = 24.0, dry_run: bool = False, lease=None, lease_ttl: float = 120.0) -> dict:
    """Collect garbage of one set (or every set) and the indexes built on it.

    Returns
    -------
    {"sets": {name: {"dropped_versions", "deleted_files", "freed_bytes"}}, "indexes": {...}}
    """
    from storage.lease import Lease

    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    names = [layout.check_name(set_name, "set name")] if set_name else list_names(root, "sets")
    out: dict = {"sets": {}, "indexes": {}}
    for name in names:
        art = Artifact(root, "sets", name)
        held = lease or Lease.acquire(art.loc.join(layout.LEASE), {"job": "gc"}, lease_ttl)
        try:
            out["sets"][name], kept = _collect_set(art, keep, stale_hours, dry_run)
            out["sets"][name]["deleted_markers"] = _sweep_takeover_markers(art, stale_hours, dry_run)
            for index in list_names(root, "indexes"):
                ia = Artifact(root, "indexes", index)
                result = _collect_index(ia, name, kept, stale_hours, dry_run)
                if result is not None:
                    out["indexes"][index] = result
        finally:
            if lease is None:
                held.release()
    return out


def _sweep_takeover_markers(art: Artifact, stale_hours: float, dry_run: bool) -> int:
    """Delete ``_lease.json.takeover-*`` markers older than ``stale_hours``.

    A takeover of an expired lease leaves its marker behind (it is what made the takeover
    exclusive); once old, no taker can still be racing for it. gc holds the set's lease.
    """
    from storage.lease import age_s

    n = 0
    for loc in art.loc.list():
        if not loc.name.startswith(f"{layout.LEASE}.takeover-"):
            continue
        age = age_s(loc)
        if age is not None and age > stale_hours * 3600:
            n += 1
            if not dry_run:
                loc.delete()
    return n


def _collect_set(art: Artifact, keep: "int | None", stale_hours: float, dry_run: bool) -> tuple[dict, list[str]]:
    committed = art.versions()
    current = art.current()
    kept = committed if keep is None else committed[-keep:]
    if current and current not in kept:
        kept = sorted(set(kept) | {current}, key=layout.version_number)
    return _sweep(art, committed, kept, stale_hours, dry_run), kept


def _collect_index(ia: Artifact, set_name: str, kept_sets: list[str], stale_hours: float,
                   dry_run: bool) -> "dict | None":
    committed = ia.versions()
    sources = {v: ia.manifest(v).get("source", {}) for v in committed}
    if not any(s.get("set") == set_name for s in sources.values()):
        return None
    protected = {ia.current(), (ia.pointer() or {}).get("version")}
    kept = [v for v in committed if v in protected or sources[v].get("set") != set_name
            or sources[v].get("version") in kept_sets]
    return _sweep(ia, committed, kept, stale_hours, dry_run)
