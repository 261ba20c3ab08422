"""Where things live under a store root.

::

    <root>/
      sets/<name>/CURRENT                      {"version": "v000002", ...}  (moved atomically)
      sets/<name>/_lease.json                  one writer per set (reindex, rollback, gc, index pins)
      sets/<name>/v000002/_claim.json          who is writing this version (run key)
      sets/<name>/v000002/_shards/00017.json   a finished shard (resume skips it)
      sets/<name>/v000002/{docs,dense,tokens,skipped}/part-00017.parquet
      sets/<name>/v000002/{dense_aug,tokens_aug}/part-00017.parquet   xQG-augmented vectors (same schemas)
      sets/<name>/v000002/codec.npz            residual codec (numpy, no pickle)
      sets/<name>/v000002/tombstones.parquet   re-indexed versions: replaced and deleted rows
      sets/<name>/v000002/_release.json        the index versions released with this set version
      sets/<name>/v000002/manifest.json        written last: the version exists (storage.manifest.SetManifest)
      indexes/<name>/v000001/...               same protocol (IndexManifest)
      encoders/<name>/v000001/...              query encoders, Hugging Face folders (EncoderManifest)
      runs/<run id>.json                       one report per reindex/rollback run (RunReportRecord)
"""
from __future__ import annotations

import os
import re

from storage.fs import Location, location

KINDS = ("sets", "indexes", "encoders")
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
RELEASE = "_release.json"  # a set version's index pins (reindex publishes, rollback restores)
LEASE = "_lease.json"  # one writer per set: reindex, rollback, gc, index pin moves
CLAIM = "_claim.json"
SHARD_MARKERS = "_shards"
DEFAULT_ROOT = "./tessera-data"

#: Which stored vectors an index is built from: the plain ones, or the xQG-augmented ones.
VECTORS = ("plain", "augmented")
_AUGMENTED = "_aug"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^v(\d{6,})$")


def resolve_root(root: "str | None") -> Location:
    """``--root`` if given, else ``$TESSERA_ROOT``, else ``./tessera-data``."""
    return location(root or os.environ.get("TESSERA_ROOT") or DEFAULT_ROOT)


def check_name(name: str, what: str = "name") -> str:
    """Validate a set/index/encoder name: letters, digits, ``. _ -``; raise ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def version_name(number: int) -> str:
    return f"v{number:06d}"


def version_number(version: str) -> int:
    """``"v000012"`` → 12; also accepts ``"12"``; ValueError otherwise."""
    m = _VERSION_RE.match(version)
    if m:
        return int(m.group(1))
    if version.isdigit():
        return int(version)
    raise ValueError(f"invalid version {version!r}: expected e.g. v000003 or 3")


def normalize_version(version: "str | int") -> str:
    return version_name(version if isinstance(version, int) else version_number(str(version)))


def vector_kind(kind: str, vectors: str = "plain") -> str:
    """The manifest file kind of ``kind`` (``dense``/``tokens``) vectors: ``dense_aug`` for
    augmented dense vectors, ``dense`` for plain ones; ValueError for an unknown ``vectors``."""
    if vectors not in VECTORS:
        raise ValueError(f"vectors must be one of {', '.join(VECTORS)}, got {vectors!r}")
    return kind + _AUGMENTED if vectors == "augmented" else kind


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def artifact_dir(root: Location, kind: str, name: str) -> Location:
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    return root.join(kind, check_name(name))


def runs_dir(root: Location) -> Location:
    return root.join("runs")
