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

This module is the driver: the config, the run's decisions, the indexes, rollback.
The hashing and the delta's encoding are ``jobs.reindex_worker``'s, the incremental
version and its manifest ``jobs.reindex_delta``'s, the diff ``storage.snapshot``'s,
publishing and release records ``storage.release``'s, the report ``jobs.run_report``'s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

from embedding.model import check_precision
from jobs import embed as embed_job
from jobs import preflight
from jobs.errors import EXIT_OK, NothingToDo, Refused, exit_code
from jobs.failpoints import failpoint
from jobs.reindex_delta import embed_delta
from jobs.reindex_worker import hash_snapshot
from jobs.run_report import RunReport, release_lease
from jobs.runtime import init_ray
from jobs.timing import Timings
from storage import layout
from storage.fs import Location
from storage.layout import LEASE
from storage.lease import Lease
from storage.manifest import Artifact, NotFoundError, list_names
from storage.release import built_on, committed_with_key, indexes_on, publish, release_of
from storage.snapshot import Diff, diff_snapshot

logger = logging.getLogger(__name__)


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
    precision: str = "auto"
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
        check_precision(self.precision)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["corpus"] = list(self.corpus)
        return d


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
            known = ", ".join(list_names(root, "sets")) or "none"
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
        release_lease(lease)


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
    init_ray()
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
        version = committed_with_key(art, embed_job.resume_key(full_cfg, model, files, ids_digest))
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
    base = {k: v for k, v in pm["config"].items() if k in fields}  # adapter_fallback (X-MOD) carries over
    if base.get("augment"):  # its augmented files would not follow the delta's tombstones and reuse
        raise Refused(f"set {cfg.set_name!r} {pm['version']} was embedded with passage augmentation (xQG), "
                      "which re-indexing does not carry over yet: embed the snapshot with `tessera embed` and "
                      "the same --augment-* options instead")
    model = cfg.model or pm["model"]["path"]
    if not cfg.model and not Location(model).exists():
        raise NotFoundError(f"the model set {cfg.set_name!r} was embedded with ({model}) is not on this "
                            "machine; pass --model with the same model files")
    base.update(corpus=tuple(cfg.corpus), model=model, set_name=cfg.set_name, root=cfg.root,
                actors=cfg.actors, threads=cfg.threads, device=cfg.device, precision=cfg.precision,
                max_batch=cfg.max_batch,
                max_tokens=cfg.max_tokens, publish=False,
                rows_per_shard=cfg.rows_per_shard or base.get("rows_per_shard", 1024))
    return embed_job.EmbedConfig(**base)


def _bytes(vm: dict) -> dict:
    if "bytes" in vm:
        return dict(vm["bytes"])
    return {"written": int(sum(e["bytes"] for e in vm["files"])), "reused": 0}


# ---- indexes and rollback ----------------------------------------------------------------
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
        done = built_on(ia, set_name, version)
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
        release_lease(lease)
