"""Carrying an index over to a re-indexed set version: in place when it can, rebuilt when not.

*Update* (FAISS flat/IVF/IVF-PQ/int8/binary, the centroid index): the parent
index is loaded, the labels of tombstoned documents are removed, and the new
shards' vectors are added on the trained structures (IVF quantiser, PQ codebooks,
int8 ranges, PLAID centroids) with labels continuing after the parent's. Labels of
surviving documents never change, so ``ids.parquet`` keeps its meaning.

*Rebuild* (HNSW, which cannot remove; or when drift says the trained structures
no longer fit): a full ``tessera index`` build on the new set version, from the
stored vectors (nothing is re-encoded).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import sets
from storage.fs import Location
from storage.manifest import Artifact, utcnow

logger = logging.getLogger(__name__)


def supports_update(im: dict) -> bool:
    """Whether an index of this kind can be updated in place."""
    from indexing import dense

    return im["index_kind"] == "plaid" or im["index_kind"] in dense.SUPPORTS_REMOVE


def rebuild(root: Location, name: str, im: dict, set_name: str, version: str, run_key: str) -> dict:
    """A full build of index ``name`` (same parameters) on set ``version``; committed, not published."""
    from jobs import build_index

    known = {f.name for f in fields(build_index.IndexConfig)}
    params = {k: v for k, v in im["config"].items() if k in known}
    params.update(set_name=set_name, set_version=version, name=name, publish=False, root=root.url)
    if params.get("kind") in ("ivf", "ivfpq"):
        params["nlist"] = None if not im["config"].get("nlist") else params["nlist"]  # re-sized to the corpus
    return build_index.run(build_index.IndexConfig(**params))


def _new_files(set_dir: Location, vm: dict, kind: str) -> list[sets.SetFile]:
    """The files of ``kind`` this re-index wrote (not reused from the parent), by shard."""
    fresh = {int(e["shard"]) for e in vm["files"] if e["kind"] == kind and not e.get("reused")}
    return [f for f in sets.set_files(set_dir, vm, kind) if f.shard in fresh]


def update(root: Location, name: str, im: dict, set_name: str, version: str, vm: dict, diff,
           run_key: str) -> dict:
    """A new version of index ``name``: tombstoned labels out, the new shards in; committed, not published."""
    from indexing.index_files import (
        ID_ARRAYS,
        plaid_arrays,
        put_file,
        read_checked,
        read_ids,
        write_ids,
        write_plaid_parts,
    )
    from jobs.build_index import read_dense, read_tokens

    started = time.perf_counter()
    ia = Artifact(root, "indexes", name)
    pdir = ia.version_dir(im["version"])
    set_dir = Artifact(root, "sets", set_name).version_dir(version)
    labels = read_ids(pdir, im)
    dead = diff.dead.filter(pc.equal(diff.dead.column("rows"), "docs")).column("id").combine_chunks()
    removed = np.flatnonzero(np.asarray(pc.fill_null(pc.is_in(labels, value_set=dead), False)))
    kind, dim = im["index_kind"], int(im["dim"])
    version_out, _ = ia.claim(run_key, {"host": socket.gethostname(), "pid": os.getpid(), "job": "reindex"})
    vdir = ia.version_dir(version_out)
    new_files = _new_files(set_dir, vm, "tokens" if kind == "plaid" else "dense")
    start = len(labels)
    if kind == "plaid":
        from embedding.codec import ResidualCodec
        from indexing.plaid import CentroidIndex

        codec = ResidualCodec.from_bytes(set_dir.join(vm["codec"]["file"]).read_bytes())
        parent = CentroidIndex.from_arrays(codec, plaid_arrays(pdir, im), check=False)  # files sha256-checked
        if len(removed):
            parent = parent.remove(removed)  # one copy of the kept tokens; none when nothing is removed
        parts = [parent.to_arrays()]
        for f in new_files:
            parts.append(CentroidIndex.from_flat(codec, *read_tokens(f, codec)).to_arrays())
        # Streamed part by part: the merged index (parent + new shards) is never built in memory.
        entries = write_plaid_parts(parts, vdir)
        added = sum(len(p["doc_offsets"]) - 1 for p in parts[1:])
    else:
        from indexing import dense

        entries_in = [e for e in im["files"] if e["kind"] == "index"]
        index = dense.from_bytes(read_checked(pdir, entries_in[0]), kind)
        dense.remove(index, removed)
        added = 0
        for f in new_files:
            x = read_dense(f, dim)
            dense.add(index, x, start + added)
            added += len(x)
        data = dense.to_bytes(index)
        entries = [put_file(vdir, "index.faiss", data, "index", int(index.ntotal))]
    new_ids = sets.live_ids(new_files)
    if len(new_ids) != added:
        raise AssertionError(f"{len(new_ids)} new ids for {added} added documents")
    keep = np.ones(len(labels), bool)
    keep[removed] = False
    keep &= ~np.asarray(labels.is_null().to_numpy(zero_copy_only=False), bool)
    kept = np.flatnonzero(keep)
    ids = pa.concat_arrays([labels.filter(pa.array(keep)), new_ids])
    positions = np.concatenate([kept, np.arange(start, start + added)]).astype(np.int64)
    entries.extend(write_ids(ids, vdir, labels=positions, n_labels=start + added))
    n_bytes = sum(e["bytes"] for e in entries if e["kind"] not in ("ids", ID_ARRAYS))
    source = {**im["source"], "version": version, "dir": set_dir.url,
              "codec": vm.get("codec") if kind == "plaid" else None}
    manifest = {
        "index_kind": kind, "dim": dim, "params": im["params"], "n_docs": int(len(ids)),
        "n_labels": int(start + added), "source": source, "config": {**im["config"], "set_version": version},
        "files": entries, "index_bytes": n_bytes, "bytes_per_document": n_bytes / max(1, len(ids)),
        "update": {"parent": im["version"], "removed": int(len(removed)), "added": int(added),
                   "holes": int(start + added - len(ids))},
        "timings": {"update": round(time.perf_counter() - started, 3)}, "run_key": run_key,
        "created_at": utcnow(),
    }
    logger.info("index %s %s: removed %d, added %d (%d documents, %d labels)", name, version_out,
                len(removed), added, len(ids), start + added)
    return ia.commit(version_out, manifest)
