"""Manifests, version claims and the atomic ``CURRENT`` pointer.

A version directory is invisible until its ``manifest.json`` exists, and the
manifest is written only after every file it lists. Publishing rewrites the
small ``CURRENT`` object (one atomic PUT or rename), so a reader sees the old
version or the new one, never a mix.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass

from storage import layout
from storage.fs import Location

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class NotFoundError(LookupError):
    """An unknown set, index, encoder or version."""


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_entry(loc: Location, base: Location, *, kind: str, rows: int, nbytes: int,
               sha256: str, shard: "int | None" = None) -> dict:
    """One ``files`` entry of a manifest; ``path`` is relative to ``base`` when under it."""
    try:
        path = loc.relative_to(base)
    except ValueError:
        path = loc.url  # reused by reference from another version
    entry = {"path": path, "kind": kind, "rows": int(rows), "bytes": int(nbytes), "sha256": sha256}
    if shard is not None:
        entry["shard"] = int(shard)
    return entry


@dataclass(frozen=True)
class Artifact:
    """One named artifact (an embedding set, an index, a query encoder) and its versions."""

    root: Location
    kind: str
    name: str

    @property
    def loc(self) -> Location:
        return layout.artifact_dir(self.root, self.kind, self.name)

    def version_dir(self, version: str) -> Location:
        return self.loc.join(layout.normalize_version(version))

    # ---- reading ------------------------------------------------------------------
    def _version_dirs(self) -> list[str]:
        names = []
        for child in self.loc.list():
            try:
                names.append(layout.normalize_version(child.name))
            except ValueError:
                continue
        return sorted(set(names), key=layout.version_number)

    def versions(self) -> list[str]:
        """Committed versions (those with a manifest), oldest first."""
        return [v for v in self._version_dirs()
                if self.version_dir(v).join(layout.MANIFEST).exists()]

    def exists(self) -> bool:
        return self.loc.join(layout.CURRENT).exists() or bool(self.versions())

    def pointer(self) -> "dict | None":
        """The body of ``CURRENT``, or None if nothing was published yet."""
        ptr = self.loc.join(layout.CURRENT)
        try:
            return json.loads(ptr.read_text())
        except FileNotFoundError:
            return None

    def current(self) -> "str | None":
        """The published version, or None if nothing was published yet.

        An index published together with its set (``tessera reindex``, ``tessera
        rollback``) is pinned by the set's ``CURRENT`` (its ``indexes`` map): one
        atomic write moves a set and all its indexes, so a reader never pairs a new
        set with an old index or the reverse.
        """
        body = self.pointer()
        if body is None:
            return None
        if self.kind == "indexes" and body.get("set"):
            pinned = pinned_index(Artifact(self.root, "sets", body["set"]).pointer(), self.name)
            if pinned:
                return pinned
        return body["version"]

    def resolve(self, version: "str | None" = None) -> str:
        """``version`` checked to be committed, or the current one; NotFoundError otherwise."""
        what = f"{self.kind[:-1] if self.kind != 'indexes' else 'index'} {self.name!r}"
        if version is None:
            cur = self.current()
            if cur is None:
                known = ", ".join(list_names(self.root, self.kind)) or "none"
                raise NotFoundError(f"no published {what} under {self.root} (known: {known})")
            return cur
        v = layout.normalize_version(version)
        if not self.version_dir(v).join(layout.MANIFEST).exists():
            have = ", ".join(self.versions()) or "none"
            raise NotFoundError(f"{what} has no committed version {v} (committed: {have}); "
                                "it may have been garbage-collected")
        return v

    def manifest(self, version: "str | None" = None) -> dict:
        v = self.resolve(version)
        return json.loads(self.version_dir(v).join(layout.MANIFEST).read_text())

    # ---- writing ------------------------------------------------------------------
    def claim(self, run_key: str, owner: dict) -> tuple[str, bool]:
        """Claim a version to write into.

        An uncommitted version claimed earlier with the same ``run_key`` is resumed
        (its finished shards are kept); otherwise a new number is claimed with a
        create-if-absent write, so two writers never share a version.

        Returns
        -------
        (version, resumed)
        """
        dirs = self._version_dirs()
        for v in reversed(dirs):
            vdir = self.version_dir(v)
            if vdir.join(layout.MANIFEST).exists():
                break  # only versions after the last committed one can be resumed
            claim = vdir.join(layout.CLAIM)
            if claim.exists() and json.loads(claim.read_text()).get("run_key") == run_key:
                logger.info("resuming uncommitted %s/%s %s", self.kind, self.name, v)
                return v, True
        number = (layout.version_number(dirs[-1]) if dirs else 0) + 1
        body = dumps({"run_key": run_key, "owner": owner, "claimed_at": utcnow()}).encode()
        while not self.version_dir(layout.version_name(number)).join(layout.CLAIM).write_if_absent(body):
            number += 1
        return layout.version_name(number), False

    def commit(self, version: str, manifest: dict) -> dict:
        """Write the manifest (last), making the version exist. Returns the manifest."""
        v = layout.normalize_version(version)
        target = self.version_dir(v).join(layout.MANIFEST)
        if target.exists():
            raise FileExistsError(f"{self.kind}/{self.name} {v} is already committed")
        manifest = {**manifest, "schema_version": SCHEMA_VERSION, "kind": self.kind,
                    "name": self.name, "version": v, "committed_at": utcnow()}
        target.write_text(dumps(manifest))
        logger.info("committed %s/%s %s", self.kind, self.name, v)
        return manifest

    def publish(self, version: str, *, set_name: "str | None" = None,
                indexes: "dict[str, str] | None" = None) -> None:
        """Point ``CURRENT`` at a committed version (one atomic write).

        ``set_name`` (indexes): the set the index belongs to, whose ``CURRENT`` may pin it.
        ``indexes`` (sets): index name → version, published atomically with the set.
        """
        v = self.resolve(version)
        body = {"version": v, "published_at": utcnow()}
        if set_name is not None:
            body["set"] = set_name
        if indexes is not None:
            body["indexes"] = dict(sorted(indexes.items()))
        self.loc.join(layout.CURRENT).write_text(dumps(body))
        logger.info("published %s/%s %s%s", self.kind, self.name, v,
                    f" with indexes {body['indexes']}" if indexes else "")


def pinned_index(set_pointer: "dict | None", index: str) -> "str | None":
    """The version of ``index`` a set's ``CURRENT`` body pins, if any."""
    return ((set_pointer or {}).get("indexes") or {}).get(index)


def list_names(root: Location, kind: str) -> list[str]:
    """Names of artifacts of ``kind`` under ``root`` (those with a folder)."""
    return sorted(c.name for c in root.join(kind).list() if not c.name.startswith("."))


def committed_manifests(root: Location, kind: str) -> list[dict]:
    """Every committed manifest of ``kind``, with ``is_current`` added, by name and version."""
    out = []
    for name in list_names(root, kind):
        art = Artifact(root, kind, name)
        cur = art.current()
        for v in art.versions():
            m = art.manifest(v)
            m["is_current"] = v == cur
            m["_dir"] = art.version_dir(v).url
            out.append(m)
    return out
