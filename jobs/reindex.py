"""The nightly re-index: a new corpus snapshot → a new set version and updated indexes.

Flow (a rerun of the same command after any failure resumes where it stopped):

1. take the set's lease (one run per set at a time; a dead run's lease expires);
2. scan the snapshot (duplicate ids stop the run) and content-hash every row in
   parallel Ray tasks: sha256 of the text and of the metadata (lang, title, extras);
3. diff the hashes against the set's current version in DuckDB: new, changed,
   unchanged, deleted (nothing changed: exit "nothing to do", no version written);
4. encode only new and changed rows, with the set's own model (same fingerprint)
   and codec, into new shards of a new version; unchanged shards are reused by
   reference (``../vOLD/...`` in the manifest, no copy); replaced and deleted rows
   become tombstones;
5. measure drift: the new tokens' mean ``|residual|`` against the codec's fit (too
   high: the codec is re-fitted and everything re-encoded), and the share of
   documents added since the indexes were last trained (too high: the indexes are
   rebuilt from the stored vectors instead of updated in place);
6. update every index built on the parent version: FAISS indexes get the
   tombstoned labels removed and the new vectors added to their trained
   quantiser, the centroid index appends the new documents on the existing
   centroids (HNSW, which cannot remove, is rebuilt from stored vectors);
7. publish the set and its indexes with one atomic write of the set's ``CURRENT``;
   optionally drop versions beyond ``keep`` (``storage.gc``);
8. write the run report (``runs/<run id>.json``, the catalog's ``runs`` view).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs import embed as embed_job
from jobs import plan as planner
from jobs import preflight
from jobs.embed_worker import ShardEncoder, failpoint
from jobs.errors import EXIT_OK, RUN_STATUS, NothingToDo, Refused, exit_code
from jobs.timing import Progress, Timings
from storage import layout, sets
from storage.corpus import ColumnMap, CorpusFile, meta_hashes, read_rows, text_hashes
from storage.fs import Location
from storage.lease import Lease
from storage.manifest import Artifact, NotFoundError, dumps, utcnow

logger = logging.getLogger(__name__)

LEASE = layout.LEASE
RELEASE = layout.RELEASE
#: Snapshots of at most this many rows are hashed in the driver (Ray tasks above it).
LOCAL_HASH_ROWS = 20_000


@dataclass(frozen=True)
class ReindexConfig:
    """One re-index run. Embedding settings (mode, nbits, columns, prefixes, ...) come from
    the set's current version; only the corpus, the model (with ``full``) and the knobs below change.

    Attributes
    ----------
    set_name : the existing set to re-index.
    corpus : the new snapshot: files, globs or directories, local or s3://.
    model : a model folder; default the one the set was embedded with. Another
        model (fingerprint) is refused unless ``full``.
    full : re-embed everything (new codec) and rebuild every index.
    keep : after publishing, keep this many newest set versions (None: keep all).
    max_added_share : rebuild indexes (retrain IVF) when documents added since they
        were trained exceed this share of the documents they were trained on.
    max_residual_ratio : re-fit the codec (re-embed everything) when the mean |residual|
        of every token encoded on the codec since it was fitted exceeds this multiple of
        the codec's own (its held-out fit residual) ...
    min_refit_share : ... and those documents are at least this share of the documents
        the codec was fitted on: a handful of off-topic documents does not justify
        re-encoding the corpus.
    min_drift_values : fewer residual values than this are too few to judge drift.
    lease_ttl : seconds the set's lease lives without a heartbeat.
    local_rows : a delta of at most this many documents is encoded in this process
        (the model loaded once, no actor pool to start: for a few hundred documents
        that start-up costs more than the encoding); larger deltas are sharded over
        Ray actors like ``tessera embed``. 0: always Ray.
    """

    set_name: str
    corpus: tuple[str, ...]
    root: "str | None" = None
    model: "str | None" = None
    full: bool = False
    keep: "int | None" = None
    max_added_share: float = 0.25
    max_residual_ratio: float = 1.25
    min_refit_share: float = 0.05
    min_drift_values: int = 1 << 16
    lease_ttl: float = 120.0
    local_rows: int = 256
    rows_per_shard: "int | None" = None
    actors: "int | None" = None
    threads: "int | None" = None
    device: str = "auto"
    max_batch: int = 64
    max_tokens: int = 16384
    publish: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            object.__setattr__(self, "corpus", (self.corpus,))
        if not self.corpus:
            raise ValueError("no corpus given")
        layout.check_name(self.set_name, "set name")
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if not self.max_added_share > 0:
            raise ValueError(f"max_added_share must be > 0, got {self.max_added_share}")
        if not 0 <= self.min_refit_share <= 1:
            raise ValueError(f"min_refit_share must be in [0, 1], got {self.min_refit_share}")
        if not self.max_residual_ratio > 0:
            raise ValueError(f"max_residual_ratio must be > 0, got {self.max_residual_ratio}")
        if self.local_rows < 0:
            raise ValueError(f"local_rows must be >= 0, got {self.local_rows}")
        if not self.lease_ttl > 0:
            raise ValueError(f"lease_ttl must be > 0, got {self.lease_ttl}")
        for name in ("rows_per_shard", "actors", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["corpus"] = list(self.corpus)
        return d


# ---- the run report ---------------------------------------------------------------------
class RunReport:
    """``runs/<run id>.json``: written when the run ends, whatever the outcome."""

    def __init__(self, root: Location, job: str, set_name: str, config: dict) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.root = root
        self.body: dict = {"run_id": f"{stamp}-{job}-{set_name}-{uuid.uuid4().hex[:6]}", "job": job,
                           "set": set_name, "started_at": utcnow(), "host": socket.gethostname(),
                           "pid": os.getpid(), "config": config, "counts": {}, "bytes": {}}
        self._t0 = time.perf_counter()

    @property
    def run_id(self) -> str:
        return self.body["run_id"]

    def finish(self, exit_code: int, error: "BaseException | None" = None) -> dict:
        self.body.update(status=RUN_STATUS.get(exit_code, "failed"), exit_code=exit_code, finished_at=utcnow(),
                         seconds=round(time.perf_counter() - self._t0, 3))
        if error is not None:
            self.body["error"] = f"{type(error).__name__}: {error}"
        try:
            layout.runs_dir(self.root).join(f"{self.run_id}.json").write_text(dumps(self.body))
        except Exception as err:  # noqa: BLE001 - the report must not hide the run's own outcome
            logger.error("could not write the run report %s: %s", self.run_id, err)
        return self.body


def run(cfg: ReindexConfig) -> dict:
    """Run the re-index; return the run report (``status``, ``exit_code``, counts, ...).

    Raises the run's error after writing its report (``jobs.errors.exit_code`` maps it).
    """
    root = layout.resolve_root(cfg.root)
    report = RunReport(root, "reindex", cfg.set_name, cfg.to_dict())
    timings = Timings()
    art = Artifact(root, "sets", cfg.set_name)
    lease = None
    try:
        if not art.exists():
            known = ", ".join(layout_names(root)) or "none"
            raise NotFoundError(f"no embedding set {cfg.set_name!r} under {root.url} (known: {known}); "
                                "create it with `tessera embed` first")
        with timings("lease"):
            lease = Lease.acquire(art.loc.join(LEASE), {"run_id": report.run_id, "job": "reindex"}, cfg.lease_ttl)
            lease.start_heartbeat()
        _run(cfg, root, art, lease, report, timings)
        report.body["timings"] = timings.to_dict()
        return report.finish(EXIT_OK)
    except BaseException as err:
        report.body["timings"] = timings.to_dict()
        report.finish(exit_code(err), err)  # 143 for SIGTERM
        raise
    finally:
        _release(lease)


def _release(lease: "Lease | None") -> None:
    """Give the lease back; a failure here must not mask the run's own outcome (it expires anyway)."""
    if lease is None:
        return
    try:
        lease.release()
    except Exception as err:  # noqa: BLE001 - the run's result stands; the lease expires after its ttl
        logger.warning("could not release the lease %s (%s: %s); it expires on its own after %s s",
                       getattr(lease, "loc", "?"), type(err).__name__, err, getattr(lease, "ttl", "?"))


def layout_names(root: Location) -> list[str]:
    from storage.manifest import list_names

    return list_names(root, "sets")


# ---- the run ------------------------------------------------------------------------------
def _run(cfg: ReindexConfig, root: Location, art: Artifact, lease: Lease, report: RunReport,
         timings: Timings) -> None:
    parent = art.resolve()
    pm = art.manifest(parent)
    ecfg = embed_config(cfg, pm)
    with timings("check"):
        urls = preflight.embed(ecfg.corpus, ecfg.model, ecfg.columns)  # before the model's hash and Ray
    with timings("model"):
        model = embed_job.describe_model(ecfg)
    report.body.update(parent=parent, model=model.fingerprint)
    if model.fingerprint != pm["model"]["fingerprint"] and not cfg.full:
        raise Refused(f"model {ecfg.model} has fingerprint {model.fingerprint[:12]}, set {cfg.set_name!r} "
                      f"{parent} was embedded with {pm['model']['fingerprint'][:12]} ({pm['model']['path']}): "
                      "vectors from two models cannot share an index. Re-embed everything with --full")
    embed_job.init_ray()
    with timings("scan"):
        files, ids_digest, _ = embed_job.scan_corpus(ecfg, urls)
    with timings("hash"):
        snapshot = hash_snapshot(ecfg, files)
    with timings("diff"):
        diff = diff_snapshot(snapshot, art.version_dir(parent), pm)
    counts = diff.counts()
    report.body["counts"] = counts
    logger.info("snapshot vs %s %s: %d new, %d changed, %d deleted, %d unchanged", cfg.set_name, parent,
                counts["new"], counts["changed"], counts["deleted"], counts["unchanged"])
    if cfg.full:
        decision = {"mode": "full", "reason": "--full"}
    elif not (counts["new"] or counts["changed"] or counts["deleted"]):
        raise NothingToDo(f"the snapshot equals set {cfg.set_name!r} {parent}: nothing to re-index")
    else:
        decision = {"mode": "incremental", "reason": "delta"}
    lineage = pm.get("lineage") or {"indexes_trained_on": parent, "documents_then": pm["counts"]["documents"],
                                    "added_since": 0}
    lineage.setdefault("codec", {"fit_on": parent, "documents_then": pm["counts"]["documents"], "added_since": 0,
                                 "residual_abs_sum": 0.0, "residual_values": 0})
    added = lineage["added_since"] + counts["new"] + counts["changed"]
    decision["added_share"] = round(added / max(1, lineage["documents_then"]), 6)
    decision["max_added_share"] = cfg.max_added_share
    decision["rebuild_indexes"] = decision["mode"] == "full" or decision["added_share"] > cfg.max_added_share
    report.body["decision"] = decision
    version = None
    if decision["mode"] == "incremental":
        version, drift = embed_delta(cfg, ecfg, model, art, parent, pm, files, diff, lineage, added,
                                     decision["rebuild_indexes"], timings)
        decision.update(drift)
        if drift["refit_codec"]:
            decision.update(mode="full", reason=f"codec drift: residual ratio {drift['cumulative_ratio']:.3f} > "
                                                f"{cfg.max_residual_ratio} over {drift['codec_added_share']:.1%} "
                                                "of the corpus", rebuild_indexes=True)
            version = None
    if decision["mode"] == "full":
        full_cfg = dataclasses.replace(ecfg, publish=False, model=model.path, force=True)  # --full: even if unchanged
        version = committed_with_key(art, embed_job._run_key(full_cfg, model, files, ids_digest))
        if version:
            logger.info("%s %s was fully re-embedded by an interrupted run of this re-index: resuming after it",
                        cfg.set_name, version)
        else:
            with timings("embed_full"):
                version = embed_job.run(full_cfg)["version"]
    report.body["version"] = version
    vm = art.manifest(version)
    report.body["bytes"] = _bytes(vm)
    failpoint("reindex.stage", 1)  # the set version is committed, nothing published yet
    with timings("indexes"):
        released = update_indexes(root, cfg.set_name, parent, version, vm, diff, decision, report.run_id)
    report.body["indexes"] = released
    report.body["bytes"]["written"] += sum(r.get("bytes", 0) for r in released.values())
    failpoint("reindex.stage", 2)  # indexes committed, nothing published yet
    if cfg.publish:
        with timings("publish"):
            lease.check()
            publish(root, cfg.set_name, version, {n: r["version"] for n, r in released.items()})
    if cfg.keep:
        from storage import gc

        with timings("gc"):
            report.body["gc"] = gc.collect(root, cfg.set_name, keep=cfg.keep, lease=lease)


def embed_config(cfg: ReindexConfig, pm: dict) -> "embed_job.EmbedConfig":
    """The parent's embed settings with this run's corpus, model and worker knobs."""
    fields = {f.name for f in dataclasses.fields(embed_job.EmbedConfig)}
    base = {k: v for k, v in pm["config"].items() if k in fields}
    model = cfg.model or pm["model"]["path"]
    if not cfg.model and not Location(model).exists():
        raise NotFoundError(f"the model set {cfg.set_name!r} was embedded with ({model}) is not on this "
                            "machine; pass --model with the same model files")
    base.update(corpus=tuple(cfg.corpus), model=model, set_name=cfg.set_name, root=cfg.root,
                actors=cfg.actors, threads=cfg.threads, device=cfg.device, max_batch=cfg.max_batch,
                max_tokens=cfg.max_tokens, publish=False,
                rows_per_shard=cfg.rows_per_shard or base.get("rows_per_shard", 1024))
    return embed_job.EmbedConfig(**base)


# ---- hashing and diffing --------------------------------------------------------------------
def _hash_piece(file: dict, index: int, start: int, end: int, cols: dict) -> pa.Table:
    table = read_rows(CorpusFile.from_dict(file), start, end, ColumnMap(**cols))
    texts = table.column("text").to_pylist()
    return pa.table({"id": table.column("id"), "sha256": pa.array(text_hashes(texts), pa.string()),
                     "meta_sha256": pa.array(meta_hashes(table), pa.string()),
                     "lang": table.column("lang"), "title": table.column("title"),
                     "empty": pa.array([not (t or "").strip() for t in texts], pa.bool_()),
                     "file": pa.array(np.full(table.num_rows, index, np.int32)),
                     "row": pa.array(np.arange(start, end, dtype=np.int64))})


def hash_snapshot(ecfg: "embed_job.EmbedConfig", files: list[CorpusFile]) -> pa.Table:
    """Content hashes of every snapshot row: one Ray task per piece, or in this process
    for a snapshot of at most ``LOCAL_HASH_ROWS`` rows.

    Returns
    -------
    table: id, sha256 (text), meta_sha256, lang, title, empty, file (index into ``files``), row.
    """
    import ray

    pieces = planner.build_pieces([f.n_rows for f in files], ecfg.rows_per_shard)
    cols = dataclasses.asdict(ecfg.columns)
    total = sum(p.rows for p in pieces)
    progress = Progress("hash", total)
    if total <= LOCAL_HASH_ROWS:
        # Hashing a few thousand rows takes milliseconds; a Ray task's start-up about a second.
        results = (_hash_piece(files[p.file].to_dict(), p.file, p.start, p.end, cols) for p in pieces)
    else:
        task = ray.remote(num_cpus=0.5, max_retries=3)(_hash_piece)
        refs = [task.remote(files[p.file].to_dict(), p.file, p.start, p.end, cols) for p in pieces]
        results = (ray.get(ref) for ref in refs)
    parts = []
    for p, part in zip(pieces, results):
        parts.append(part)
        progress.update(p.rows)
    return pa.concat_tables(parts) if parts else _hash_piece_schema().empty_table()


def _hash_piece_schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("sha256", pa.string()), ("meta_sha256", pa.string()),
                      ("lang", pa.string()), ("title", pa.string()), ("empty", pa.bool_()),
                      ("file", pa.int32()), ("row", pa.int64())])


@dataclass
class Diff:
    """What a snapshot changes in a set version.

    ``todo``: snapshot rows to encode (file, row, id, status new|changed).
    ``dead``: stored rows to tombstone (id, shard, rows docs|skipped, reason changed|deleted).
    """

    todo: pa.Table
    dead: pa.Table
    unchanged: int

    def counts(self) -> dict:
        status = self.todo.column("status").to_pylist()
        reasons = self.dead.column("reason").to_pylist()
        return {"new": status.count("new"), "changed": status.count("changed"),
                "deleted": reasons.count("deleted"), "unchanged": self.unchanged,
                "snapshot": len(status) + self.unchanged}


def stored_rows(vdir: Location, manifest: dict) -> pa.Table:
    """Live rows of a set version: id, sha256, meta_sha256, lang, title, shard, rows (docs|skipped)."""
    from concurrent.futures import ThreadPoolExecutor

    def docs(f: sets.SetFile) -> pa.Table:
        t = sets.read_live(f)
        n = t.num_rows
        meta = t.column("meta_sha256") if "meta_sha256" in t.column_names else pa.nulls(n, pa.string())
        return pa.table({"id": t.column("id"), "sha256": t.column("sha256"), "meta_sha256": meta,
                         "lang": t.column("lang"), "title": t.column("title"), "shard": t.column("shard"),
                         "rows": pa.array(["docs"] * n, pa.string())})

    def skipped(f: sets.SetFile) -> pa.Table:
        t = sets.read_live(f, ["id", "shard"])
        n = t.num_rows
        return pa.table({"id": t.column("id"), "sha256": pa.nulls(n, pa.string()),
                         "meta_sha256": pa.nulls(n, pa.string()), "lang": pa.nulls(n, pa.string()),
                         "title": pa.nulls(n, pa.string()), "shard": t.column("shard"),
                         "rows": pa.array(["skipped"] * n, pa.string())})

    with ThreadPoolExecutor(max_workers=8) as pool:
        parts = list(pool.map(docs, sets.set_files(vdir, manifest, "docs")))
        parts += list(pool.map(skipped, sets.set_files(vdir, manifest, "skipped")))
    return pa.concat_tables([p.cast(parts[0].schema) for p in parts]) if parts else None


_DIFF_SQL = """
SELECT s."file", s."row", s.id, CASE WHEN o.id IS NULL THEN 'new' ELSE 'changed' END AS status,
       o.shard AS old_shard, o."rows" AS old_rows
FROM snap s LEFT JOIN old o ON s.id = o.id
WHERE o.id IS NULL OR NOT (
      (s.empty AND o."rows" = 'skipped')
   OR (NOT s.empty AND o."rows" = 'docs' AND s.sha256 = o.sha256
       AND CASE WHEN o.meta_sha256 IS NOT NULL THEN o.meta_sha256 = s.meta_sha256
                ELSE s.lang IS NOT DISTINCT FROM o.lang AND s.title IS NOT DISTINCT FROM o.title END))
ORDER BY s."file", s."row"
"""


def diff_snapshot(snapshot: pa.Table, parent_dir: Location, parent: dict) -> Diff:
    """new / changed / unchanged / deleted, computed in DuckDB over the snapshot's hashes
    and the parent version's stored rows (``docs`` and ``skipped``, tombstones applied)."""
    import duckdb

    old = stored_rows(parent_dir, parent)
    if old is None:
        old = pa.table({"id": pa.array([], pa.string()), "sha256": pa.array([], pa.string()),
                        "meta_sha256": pa.array([], pa.string()), "lang": pa.array([], pa.string()),
                        "title": pa.array([], pa.string()), "shard": pa.array([], pa.int32()),
                        "rows": pa.array([], pa.string())})
    con = duckdb.connect()
    con.register("snap", snapshot)
    con.register("old", old)
    todo = con.sql(_DIFF_SQL).to_arrow_table()
    deleted = con.sql("""SELECT o.id, o.shard, o."rows", 'deleted' AS reason FROM old o
                             ANTI JOIN snap s ON o.id = s.id ORDER BY o.shard, o.id""").to_arrow_table()
    changed = con.sql("""SELECT id, old_shard AS shard, old_rows AS "rows", 'changed' AS reason
                             FROM todo WHERE status = 'changed' ORDER BY shard, id""").to_arrow_table()
    dead = pa.concat_tables([deleted, changed.cast(deleted.schema)])
    return Diff(todo, dead, snapshot.num_rows - todo.num_rows)


# ---- the incremental set version ------------------------------------------------------------
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


def committed_with_key(art: Artifact, run_key: str) -> "str | None":
    """A version committed by an earlier attempt of this same run but never published."""
    cur = art.current()
    for v in reversed(art.versions()):
        if cur is not None and layout.version_number(v) <= layout.version_number(cur):
            break
        if art.manifest(v).get("run_key") == run_key:
            return v
    return None


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
    actor_plan = embed_job._actor_plan(ecfg)
    with timings("encode"):
        where = _encode(ecfg, model, files, pieces, vdir, actor_plan, codec_url, cfg.local_rows)
    stats = embed_job.done_shards(vdir)
    missing = [p.shard for p in pieces if p.shard not in stats]
    if missing:
        raise RuntimeError(f"{len(missing)} delta shard(s) have no finished marker (first: {missing[:5]}); "
                           "run the same command again to finish them")
    drift = {**_drift(cfg, codec_url, [stats[p.shard] for p in pieces], lineage["codec"]), "encoded_in": where}
    if drift["refit_codec"]:
        return version, drift
    with timings("commit"):
        manifest = _delta_manifest(cfg, ecfg, model, art, parent, pm, pdir, vdir, version, files, pieces, stats,
                                   diff, lineage, added, rebuild, drift, run_key, actor_plan)
        art.commit(version, manifest)
    return version, drift


def _encode(ecfg, model, files, pieces, vdir: Location, p, codec_url: "str | None", local_rows: int) -> str:
    """Encode the unfinished delta shards; return where: ``driver``, ``ray`` or ``none`` (all done)."""
    done = embed_job.done_shards(vdir)
    todo = [pc.to_dict() for pc in pieces if pc.shard not in done]
    if done:
        logger.info("%d of %d delta shards already finished; encoding the other %d", len(pieces) - len(todo),
                    len(pieces), len(todo))
    if not todo:
        return "none"
    spec = embed_job._spec(ecfg, model, files, vdir, p, dense=ecfg.dense, colbert=ecfg.colbert)
    n_rows = sum(len(json.loads(t["rows"])) for t in todo)
    progress = Progress("re-embed", n_rows)
    if n_rows <= local_rows:
        # Same encoder class, same shard files and markers as the actors: only the process differs.
        threads = ecfg.threads or max(1, os.cpu_count() or 1)
        logger.info("encoding %d rows in this process (--local-rows %d): an actor pool would cost more to start",
                    n_rows, local_rows)
        encoder = ShardEncoder(dataclasses.replace(spec, threads=threads), codec_url)
        for i, t in enumerate(todo):
            out = encoder({k: [v] for k, v in t.items()})
            progress.update(json.loads(out["stats"][0])["rows_in"])
            failpoint("reindex.after_shards", i + 1)
        return "driver"
    for i, row in enumerate(embed_job._map_pieces(todo, ShardEncoder, spec, p, codec_url).iter_rows()):
        progress.update(json.loads(row["stats"])["rows_in"])
        failpoint("reindex.after_shards", i + 1)  # tests: the driver dies with shards half done
    return "ray"


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
                    rebuild: bool, drift: dict, run_key: str, actor_plan) -> dict:
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
    new_lineage = ({"indexes_trained_on": version, "documents_then": counts["documents"], "added_since": 0}
                   if rebuild else {**lineage, "added_since": added})
    new_lineage["codec"] = {**lineage["codec"], **drift["codec_lineage"]}
    return {
        "config": {**ecfg.to_dict(), "reindex": cfg.to_dict()}, "model": model.to_dict(),
        "modes": pm["modes"], "dims": pm["dims"], "dense_dtype": pm.get("dense_dtype", "float16"),
        "codec": codec, "counts": counts,
        "corpus": [{"url": f.url, "format": f.format, "rows": f.n_rows} for f in files],
        "files": entries, "parent": parent, "run_key": run_key, "workers": actor_plan.to_dict(),
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


def _bytes(vm: dict) -> dict:
    if "bytes" in vm:
        return dict(vm["bytes"])
    return {"written": int(sum(e["bytes"] for e in vm["files"])), "reused": 0}


# ---- indexes --------------------------------------------------------------------------------
def indexes_on(root: Location, set_name: str, version: str) -> dict[str, dict]:
    """``{index name: manifest}`` of the current version of every index built on ``set_name`` ``version``."""
    from storage.manifest import list_names

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


def update_indexes(root: Location, set_name: str, parent: str, version: str, vm: dict, diff: Diff,
                   decision: dict, run_id: str) -> dict[str, dict]:
    """A new version of every index on the parent set version, built on ``version``; not published.

    Returns
    -------
    {index name: {"version", "how" (updated|rebuilt), "bytes", "removed", "added"}}
    """
    from jobs import index_update

    out = {}
    for name, im in sorted(indexes_on(root, set_name, parent).items()):
        ia = Artifact(root, "indexes", name)
        how = "rebuilt" if decision["rebuild_indexes"] or not index_update.supports_update(im) else "updated"
        key = hashlib.sha256(f"reindex/{set_name}/{version}/{name}/{how}".encode()).hexdigest()
        done = _built_on(ia, set_name, version)
        if done:
            logger.info("index %s %s on %s %s was committed by an interrupted run: reusing it", name, done,
                        set_name, version)
            m = ia.manifest(done)
        elif how == "rebuilt":
            m = index_update.rebuild(root, name, im, set_name, version, key)
        else:
            m = index_update.update(root, name, im, set_name, version, vm, diff, key)
        out[name] = {"version": m["version"], "how": how, "bytes": int(m.get("index_bytes", 0)),
                     **m.get("update", {})}
        logger.info("index %s: %s as %s", name, how, m["version"])
    return out


def _built_on(ia: Artifact, set_name: str, version: str) -> "str | None":
    """An unpublished index version already built on the set version (an interrupted run's)."""
    cur = ia.current()
    for v in reversed(ia.versions()):
        if cur is not None and layout.version_number(v) <= layout.version_number(cur):
            break
        src = ia.manifest(v).get("source", {})
        if src.get("set") == set_name and src.get("version") == version:
            return v
    return None


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
    art.version_dir(version).join(RELEASE).write_text(dumps({"indexes": pins, "released_at": utcnow()}))
    art.publish(version, indexes=pins)


def release_of(root: Location, set_name: str, version: str) -> dict[str, str]:
    """The index versions that go with a set version: its release record, else the newest
    committed version of each index built on it."""
    art = Artifact(root, "sets", set_name)
    loc = art.version_dir(version).join(RELEASE)
    if loc.exists():
        return dict(json.loads(loc.read_text())["indexes"])
    from storage.manifest import committed_manifests

    out: dict[str, str] = {}
    for m in committed_manifests(root, "indexes"):
        src = m.get("source", {})
        if src.get("set") == set_name and src.get("version") == version:
            out[m["name"]] = m["version"]  # sorted by version: the newest wins
    return out


def rollback(root: "str | None", set_name: str, to: str, lease_ttl: float = 120.0) -> dict:
    """Point the set (and the indexes released with it) back at an earlier committed version."""
    root_loc = layout.resolve_root(root)
    art = Artifact(root_loc, "sets", layout.check_name(set_name, "set name"))
    report = RunReport(root_loc, "rollback", set_name, {"to": to})
    lease = None
    try:
        if not art.exists():
            raise NotFoundError(f"no embedding set {set_name!r} under {root_loc.url}")
        version = art.resolve(to)  # NotFoundError names gc'd versions
        lease = Lease.acquire(art.loc.join(LEASE), {"run_id": report.run_id, "job": "rollback"}, lease_ttl)
        previous = art.current()
        pins = release_of(root_loc, set_name, version)
        for name in pins:
            Artifact(root_loc, "indexes", name).resolve(pins[name])
        publish(root_loc, set_name, version, pins)
        report.body.update(version=version, parent=previous, indexes=pins)
        logger.info("rolled %s back from %s to %s (indexes %s)", set_name, previous, version, pins or "none")
        return report.finish(EXIT_OK)
    except BaseException as err:
        report.finish(exit_code(err), err)  # 143 for SIGTERM
        raise
    finally:
        _release(lease)
