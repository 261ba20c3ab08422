"""The incremental set version of a re-index: the delta encoded, the rest reused.

:func:`embed_delta` claims a version (a rerun gets it back, or finds it committed),
cuts the new and changed rows into new shards numbered after the parent's
(``jobs.plan.plan_delta``), encodes them with the parent's model and codec
(``jobs.reindex_worker.encode_delta``), measures the codec's drift over every token
encoded on it since its fit, and commits a manifest that reuses the parent's shard
files by reference (``../vOLD/...``, no copy), drops files whose every row is dead,
and records replaced and deleted rows as tombstones (``storage.sets``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from typing import TYPE_CHECKING

import pyarrow as pa

from jobs import plan as planner
from jobs.embed_pool import actor_plan, done_shards, run_precision
from jobs.reindex_worker import encode_delta
from jobs.timing import Timings
from storage import sets
from storage.corpus import CorpusFile
from storage.fs import Location
from storage.manifest import Artifact, utcnow
from storage.release import committed_with_key
from storage.snapshot import Diff

if TYPE_CHECKING:
    from jobs import embed as embed_job
    from jobs.reindex import ReindexConfig

logger = logging.getLogger(__name__)


def _run_key(parent: str, model: "embed_job.ModelInfo", ecfg, diff: Diff, what: str,
             cfg: "ReindexConfig | None" = None) -> str:
    digest = hashlib.sha256()
    for col in ("file", "row", "id", "status"):
        digest.update(json.dumps(diff.todo.column(col).to_pylist()).encode())
    digest.update(json.dumps(diff.dead.column("id").to_pylist()).encode())
    key = {"what": what, "parent": parent, "model": model.fingerprint, "todo": digest.hexdigest(),
           "corpus": list(ecfg.corpus), "rows_per_shard": ecfg.rows_per_shard,
           "thresholds": None if cfg is None else [cfg.max_added_share, cfg.max_residual_ratio,
                                                   cfg.min_refit_share, cfg.min_drift_values]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def embed_delta(cfg: ReindexConfig, ecfg, model, art: Artifact, parent: str, pm: dict,
                files: list[CorpusFile], diff: Diff, lineage: dict, added: int, rebuild: bool,
                timings: Timings) -> tuple[str, dict]:
    """Encode the delta into a new version that reuses the parent's shards; commit it.

    Returns
    -------
    (version, drift figures). With ``drift["refit_codec"]`` the version is left
    uncommitted: the caller re-embeds everything instead.
    """
    run_key = _run_key(parent, model, ecfg, diff, "delta", cfg)
    done = committed_with_key(art, run_key)
    if done:
        logger.info("%s %s was committed by an interrupted run of this re-index: resuming after it",
                    cfg.set_name, done)
        return done, art.manifest(done).get("drift", {"refit_codec": False})
    version, resumed = art.claim(run_key, {"host": socket.gethostname(), "pid": os.getpid(), "job": "reindex"})
    vdir = art.version_dir(version)
    pdir = art.version_dir(parent)
    first_shard = 1 + max((int(e.get("shard", -1)) for e in pm["files"] if "shard" in e), default=-1)
    by_file: dict[int, list[int]] = {}
    for f, r in zip(diff.todo.column("file").to_pylist(), diff.todo.column("row").to_pylist()):
        by_file.setdefault(int(f), []).append(int(r))
    stride = ecfg.rows_per_shard
    pieces = planner.plan_delta(by_file, ecfg.rows_per_shard, stride, first_shard)
    for p in pieces:
        if files[p.file].format == "jsonl" and files[p.file].stride != stride:
            raise AssertionError("scan stride differs from rows_per_shard")
    logger.info("%s %s/%s: %d changed or new rows in %d shard(s) from %d; %d rows tombstoned",
                "resuming" if resumed else "writing", cfg.set_name, version, diff.todo.num_rows, len(pieces),
                first_shard, diff.dead.num_rows)
    codec_info = pm.get("codec")
    codec_url = sets.entry_location(pdir, {"path": codec_info["file"]}).url if codec_info else None
    pool = actor_plan(ecfg)
    with timings("encode"):
        where = encode_delta(ecfg, model, files, pieces, vdir, pool, codec_url, cfg.local_rows)
    stats = done_shards(vdir)
    missing = [p.shard for p in pieces if p.shard not in stats]
    if missing:
        raise RuntimeError(f"{len(missing)} delta shard(s) have no finished marker (first: {missing[:5]}); "
                           "run the same command again to finish them")
    drift = {**_drift(cfg, codec_url, [stats[p.shard] for p in pieces], lineage["codec"]), "encoded_in": where}
    if drift["refit_codec"]:
        return version, drift
    with timings("commit"):
        manifest = _delta_manifest(cfg, ecfg, model, art, parent, pm, pdir, vdir, version, files, pieces, stats,
                                   diff, lineage, added, rebuild, drift, run_key, pool)
        art.commit(version, manifest)
    return version, drift


def _drift(cfg: ReindexConfig, codec_url: "str | None", stats: list[dict], since_fit: dict) -> dict:
    """Residual drift against the codec's own fit, over every token encoded on it since.

    ``residual_ratio``: this run's new tokens; ``cumulative_ratio``: all tokens added
    since the codec was fitted (gradual drift adds up); ``codec_added_share``: their
    documents over the documents the codec was fitted on. The codec is re-fitted when
    the cumulative ratio and the share both pass their thresholds.
    """
    total = sum(s.get("residual_abs_sum", 0.0) for s in stats)
    values = sum(s.get("residual_values", 0) for s in stats)
    docs = sum(s.get("documents", 0) for s in stats)
    acc = {"residual_abs_sum": since_fit["residual_abs_sum"] + total,
           "residual_values": since_fit["residual_values"] + values,
           "added_since": since_fit["added_since"] + docs}
    if codec_url is None:
        return {"residual_ratio": None, "refit_codec": False, "residual_values": 0, "codec_lineage": acc}
    from embedding.codec import ResidualCodec

    codec = ResidualCodec.from_bytes(Location(codec_url).read_bytes())
    ref = codec.avg_residual if codec.avg_residual > 0 else None
    ratio = total / values / ref if values and ref else None
    cumulative = acc["residual_abs_sum"] / acc["residual_values"] / ref if acc["residual_values"] and ref else None
    share = acc["added_since"] / max(1, since_fit["documents_then"])
    judged = cumulative is not None and acc["residual_values"] >= cfg.min_drift_values
    refit = bool(judged and cumulative > cfg.max_residual_ratio and share >= cfg.min_refit_share)
    logger.info("codec drift: mean |residual| of this run's tokens %s× the codec's %.5f, of all %d documents "
                "added since its fit %s× (%.2f%% of the %d it was fitted on)%s",
                f"{ratio:.3f}" if ratio is not None else "n/a", codec.avg_residual, acc["added_since"],
                f"{cumulative:.3f}" if cumulative is not None else "n/a", 100 * share, since_fit["documents_then"],
                "" if judged else "; too few values to judge")
    return {"codec_avg_residual": codec.avg_residual, "residual_ratio": ratio, "cumulative_ratio": cumulative,
            "residual_values": values, "codec_added_share": round(share, 6),
            "max_residual_ratio": cfg.max_residual_ratio, "min_refit_share": cfg.min_refit_share,
            "refit_codec": refit, "codec_lineage": acc}


def _reused_entry(e: dict, pdir: Location, set_dir: Location) -> dict:
    loc = sets.entry_location(pdir, e)
    return {**e, "path": "../" + loc.relative_to(set_dir), "reused": True}


def _delta_manifest(cfg, ecfg, model, art: Artifact, parent: str, pm: dict, pdir: Location, vdir: Location,
                    version: str, files, pieces, stats: dict, diff: Diff, lineage: dict, added: int,
                    rebuild: bool, drift: dict, run_key: str, pool) -> dict:
    old_graves = sets.read_tombstones(pdir, pm)
    new_graves = sets.tombstone_table(diff.dead.column("id").to_pylist(), diff.dead.column("shard").to_pylist(),
                                      diff.dead.column("rows").to_pylist(), diff.dead.column("reason").to_pylist(),
                                      version)
    graves = pa.concat_tables([old_graves, new_graves])
    # Files whose every row is dead are dropped (with their tombstones), the rest reused.
    dead_docs = sets.dead_by_shard(graves, "docs")
    dead_skipped = sets.dead_by_shard(graves, "skipped")
    entries, dropped = [], set()
    for e in pm["files"]:
        kind = e["kind"]
        if kind in ("tombstones",):
            continue
        if kind in ("docs", "dense", "tokens", "skipped"):
            dead = (dead_skipped if kind == "skipped" else dead_docs).get(int(e["shard"]), ())
            if kind != "skipped":
                docs_rows = next(x["rows"] for x in pm["files"] if x["kind"] == "docs" and x["shard"] == e["shard"])
                if len(dead) >= docs_rows:
                    dropped.add((int(e["shard"]), "docs"))
                    continue
            elif len(dead) >= e["rows"]:
                dropped.add((int(e["shard"]), "skipped"))
                continue
        entries.append(_reused_entry(e, pdir, art.loc))
    if dropped:
        keep = [(int(s), r) not in dropped for s, r in zip(graves.column("shard").to_pylist(),
                                                            graves.column("rows").to_pylist())]
        graves = graves.filter(pa.array(keep))
    reused_bytes = sum(e["bytes"] for e in entries)
    shard_stats = [stats[p.shard] for p in pieces]
    entries += [e for s in shard_stats for e in s["files"]]
    if graves.num_rows:
        from storage import schemas
        from storage.manifest import file_entry

        info = schemas.write_table(vdir.join(sets.TOMBSTONES), graves)
        entries.append(file_entry(vdir.join(sets.TOMBSTONES), vdir, kind="tombstones", rows=info["rows"],
                                  nbytes=info["bytes"], sha256=info["sha256"]))
    codec = dict(pm["codec"]) if pm.get("codec") else None
    if codec:
        codec["file"] = next(e["path"] for e in entries if e["kind"] == "codec")
    dead_new = diff.dead.filter(pa.array([r == "docs" for r in diff.dead.column("rows").to_pylist()]))
    dead_skip = diff.dead.num_rows - dead_new.num_rows
    new_docs = int(sum(s["documents"] for s in shard_stats))
    new_skipped = int(sum(s["skipped_empty"] for s in shard_stats))
    pc_ = pm["counts"]
    counts = {"input_rows": diff.todo.num_rows + diff.unchanged,
              "documents": pc_["documents"] - dead_new.num_rows + new_docs,
              "skipped_empty": pc_["skipped_empty"] - dead_skip + new_skipped,
              "tokens": pc_["tokens"] - _dead_tokens(pdir, pm, dead_new) + int(sum(s["tokens"] for s in shard_stats)),
              "input_tokens": None, "truncated": None,
              "shards": len({e["shard"] for e in entries if "shard" in e}),
              "new": diff.counts()["new"], "changed": diff.counts()["changed"],
              "deleted": diff.counts()["deleted"], "unchanged": diff.unchanged, "tombstones": graves.num_rows}
    kept = pc_["documents"] - dead_new.num_rows  # the parent's documents this version keeps
    inherited = ((pm.get("workers") or {}).get("precision") or "unknown") if kept else None
    new_lineage = ({"indexes_trained_on": version, "documents_then": counts["documents"], "added_since": 0}
                   if rebuild else {**lineage, "added_since": added})
    new_lineage["codec"] = {**lineage["codec"], **drift["codec_lineage"]}
    return {
        "config": {**ecfg.to_dict(), "reindex": cfg.to_dict()}, "model": model.to_dict(),
        "modes": pm["modes"], "dims": pm["dims"], "dense_dtype": pm.get("dense_dtype", "float16"),
        "codec": codec, "counts": counts,
        "corpus": [{"url": f.url, "format": f.format, "rows": f.n_rows} for f in files],
        "files": entries, "parent": parent, "run_key": run_key,
        "workers": {**pool.to_dict(), "precision": run_precision(shard_stats, inherited)},
        "lineage": new_lineage, "drift": drift,
        "bytes": {"reused": reused_bytes, "written": int(sum(e["bytes"] for e in entries)) - reused_bytes},
        "timings": {"encode_worker_seconds": round(sum(s["encode_seconds"] for s in shard_stats), 3)},
        "created_at": utcnow(),
    }


def _dead_tokens(pdir: Location, pm: dict, dead_docs: pa.Table) -> int:
    """Stored token vectors of the tombstoned documents (read from their shards' tokens files)."""
    if not dead_docs.num_rows or not pm.get("codec"):
        return 0
    by_shard = sets.dead_by_shard(dead_docs, "docs")
    total = 0
    for f in sets.set_files(pdir, pm, "tokens"):
        ids = by_shard.get(f.shard)
        if ids:
            t = sets.read_live(f, ["id", "n_vectors"])
            mask = pa.compute.is_in(t.column("id"), value_set=pa.array(sorted(ids), pa.string()))
            total += int(pa.compute.sum(t.column("n_vectors").filter(mask)).as_py() or 0)
    return total

