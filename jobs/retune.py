"""The retune job: a better query encoder for a stored embedding set, without re-embedding a document.

Only the query side is tuned (Vasilyev et al., "adiabatic" learning rates); the
document side is the set's stored vectors, read and never written.

Flow:

1. everything that can be wrong is checked before training: the index and its set,
   stored vectors of the needed kind (dense, or ColBERT tokens + codec for a plaid
   index), the base encoder's fingerprint, training positives present in the set,
   dev queries with judgements, freeze patterns that match parameters;
2. sha256 of every file of the set version and of every committed index of it;
3. one Ray task (``num_gpus=1`` when the cluster has a GPU, else the CPU): mine hard
   negatives on the index with the base encoder (top ``mine_k`` minus positives,
   skipping the top ``skip_top`` ranks, which are too often unjudged positives), read
   the stored vectors shard by shard, evaluate the base on the dev queries, then for
   each run of the sweep: train from the base (:mod:`embedding.tuning`), evaluate,
   gate; the best run that passes is written as a Hugging Face folder into the
   claimed encoder version;
4. the checksums again: any change fails the job (nothing is committed);
5. the manifest (base and own fingerprints, the set it is compatible with, training
   config, negatives statistics, before/after evaluation, sweep table, checksums),
   then ``CURRENT``.

The gate compares nDCG@10 in points (100 × nDCG): the tuned encoder passes when the
overall score does not drop by more than ``tolerance`` and no language drops by more
than ``max_regression``. Evaluation is exact (inner product over the dense vectors at
the training dimension, or MaxSim over every decompressed token matrix), the same
for base and tuned: it measures the encoder, not the index's approximations. A
refused version is not written; the CLI exits with 3 and prints the table.

Modules: this one is the driver (config, checks, checksums, commit);
:mod:`jobs.retune_data` reads the training and dev queries, :mod:`jobs.retune_worker`
is the Ray task, :mod:`jobs.retune_gate` the gate and its tables.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedding.tuning_config import TrainConfig
from jobs.errors import Refused
from jobs.retune_data import TrainQuery, load_dev, load_training
from jobs.retune_gate import best_refused, languages_table, refusal_message, runs_table
from jobs.retune_worker import EVAL_K, Plan, tune
from jobs.runtime import DEVICES, init_ray
from jobs.timing import Timings
from storage import layout, sets
from storage.catalog import check_filter
from storage.fs import Location, location
from storage.manifest import Artifact, NotFoundError, committed_manifests, utcnow

if TYPE_CHECKING:
    from indexing.searcher import EncoderChoice

#: The CLI imports these from here (it prints the gate's tables).
__all__ = ["GateRefused", "Prepared", "RetuneConfig", "checksums", "languages_table", "prepare", "remote_tune",
           "run", "runs_table", "set_file_urls"]

logger = logging.getLogger(__name__)

_LISTED = 5


class GateRefused(Refused):
    """No run of the sweep passed the gate; ``report`` holds the evaluation and the runs."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


# ---- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class RetuneConfig:
    """One re-tuning job. Checked before anything is read or written.

    Attributes
    ----------
    set_name : the embedding set whose stored vectors are the document side.
    index : an index of that set, used to mine hard negatives with the base encoder.
    train : training pairs (Parquet/JSONL: ``text``/``query`` + ``doc_id``/``positives``
        (one id or a list), optional ``id``, ``lang``), or queries (``id``, ``text``)
        when ``train_qrels`` is given.
    dev_queries, dev_qrels : the gate's evaluation set (both or neither; neither needs ``force``).
    name : the encoder to write a version of (default ``<set>-query``).
    base : the encoder to start from: a folder or a registered ``NAME[@vN]`` (default the set's model).
    dim : training/evaluation dimension (default the index's; a Matryoshka prefix for dense).
    lr, freeze : one run; ``sweep_lr`` × ``sweep_freeze`` replace them with several runs.
    negatives, mine_k, skip_top : hard negatives per query, mined from the top ``mine_k``
        after skipping ranks 1..``skip_top``; ``negatives_lang`` / ``negatives_where``
        restrict the mined documents (Searcher filters).
    max_regression, tolerance : gate, in nDCG@10 points (see the module docstring).
    force : publish even when the gate refuses (recorded as ``forced`` in the manifest).

    The training knobs (``lr``, ``freeze``, ``epochs``, ``steps``, ``batch_size``,
    ``warmup_ratio``, ``weight_decay``, ``clip``, ``seed``, ``temperature``, ``in_batch``)
    default to :class:`embedding.tuning_config.TrainConfig`'s, their one definition.
    """

    set_name: str
    index: str
    train: str
    root: "str | None" = None
    train_qrels: "str | None" = None
    dev_queries: "str | None" = None
    dev_qrels: "str | None" = None
    name: "str | None" = None
    base: "str | None" = None
    index_version: "str | None" = None
    dim: "int | None" = None
    lr: float = TrainConfig.lr
    sweep_lr: tuple[float, ...] = ()
    freeze: tuple[str, ...] = TrainConfig.freeze
    sweep_freeze: tuple[tuple[str, ...], ...] = ()
    epochs: int = TrainConfig.epochs
    steps: "int | None" = TrainConfig.steps
    batch_size: int = TrainConfig.batch_size
    warmup_ratio: float = TrainConfig.warmup_ratio
    weight_decay: float = TrainConfig.weight_decay
    clip: float = TrainConfig.clip
    seed: int = TrainConfig.seed
    temperature: float = TrainConfig.temperature
    in_batch: bool = TrainConfig.in_batch
    negatives: int = 7
    mine_k: int = 50
    skip_top: int = 3
    negatives_lang: "str | None" = None
    negatives_where: "str | None" = None
    max_regression: float = 0.5
    tolerance: float = 0.0
    force: bool = False
    publish: bool = True
    device: str = "auto"
    threads: "int | None" = None
    query_batch: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "sweep_lr", tuple(float(x) for x in self.sweep_lr))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        object.__setattr__(self, "sweep_freeze", tuple(tuple(f) for f in self.sweep_freeze))
        layout.check_name(self.set_name, "set name")
        layout.check_name(self.index, "index name")
        layout.check_name(self.encoder_name, "encoder name")
        for name in ("train",):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name} must be a file path or URL, got {getattr(self, name)!r}")
        if (self.dev_queries is None) != (self.dev_qrels is None):
            raise ValueError("dev queries and dev qrels go together: the gate needs judgements for the "
                             "dev queries (give both --dev-queries and --dev-qrels)")
        if self.dev_queries is None and not self.force:
            raise ValueError("no dev set: the gate can't check the tuned encoder; give --dev-queries and "
                             "--dev-qrels, or --force to publish without a gate")
        for name in ("mine_k", "query_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("negatives", "skip_top"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.negatives == 0 and not self.in_batch:
            raise ValueError("no negatives at all (negatives 0 and no in-batch negatives): the loss would be 0")
        if self.skip_top >= self.mine_k:
            raise ValueError(f"skip_top {self.skip_top} leaves nothing of the top {self.mine_k} to mine")
        for name in ("max_regression", "tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be >= 0 (nDCG@10 points), got {value!r}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.negatives_where is not None:
            check_filter(self.negatives_where)  # its syntax now; its columns when the searcher mines
        self.runs()  # every learning rate > 0, every other training knob valid

    @property
    def encoder_name(self) -> str:
        return self.name or f"{self.set_name}-query"

    def runs(self) -> list[TrainConfig]:
        """The training runs, learning rate outer, freeze setting inner."""
        common = dict(weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio, epochs=self.epochs,
                      steps=self.steps, batch_size=self.batch_size, clip=self.clip, seed=self.seed,
                      temperature=self.temperature, in_batch=self.in_batch)
        return [TrainConfig(lr=lr, freeze=freeze, **common)
                for lr in (self.sweep_lr or (self.lr,)) for freeze in (self.sweep_freeze or (self.freeze,))]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sweep_lr"], d["freeze"] = list(self.sweep_lr), list(self.freeze)
        d["sweep_freeze"] = [list(f) for f in self.sweep_freeze]
        return d


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` checked: the run key, the worker's :class:`~jobs.retune_worker.Plan`
    and the manifest are made of it.

    Attributes
    ----------
    index_manifest, set_manifest : the index version's manifest and its set version's.
    set_version, set_dir : that set version (``vNNNNNN``) and its folder's URL.
    kind : ``dense``, or ``colbert`` for a plaid index: the stored vectors trained against.
    dim : the training and evaluation dimension.
    choice : the base encoder, checked against the set's fingerprint.
    train : training queries with positives (:class:`~jobs.retune_data.TrainQuery`).
    dev, dev_qrels : the judged dev queries and their qrels (empty without a dev set).
    """

    index_manifest: dict
    set_manifest: dict
    set_version: str
    kind: str
    dim: int
    choice: "EncoderChoice"
    train: list
    dev: list
    dev_qrels: dict
    set_dir: str


# ---- the driver ------------------------------------------------------------------------------
def run(cfg: RetuneConfig) -> dict:
    """Check, tune on one worker, gate, verify the set is untouched, commit; return the manifest.

    Raises
    ------
    ValueError (and subclasses: QueryFileError, ModelError, IncompatibleEncoderError)
        Bad input, before any training.
    GateRefused
        No run passed the gate (and no ``force``); nothing was committed.
    RuntimeError
        A file of the set or of its indexes changed while the job ran.
    """
    timings = Timings()
    root = layout.resolve_root(cfg.root)
    with timings("check"):
        prep = prepare(cfg, root)
    with timings("checksums"):
        urls = set_file_urls(root, cfg.set_name, prep.set_version)
        before_sums = checksums(urls)
    art = Artifact(root, "encoders", cfg.encoder_name)
    version, _ = art.claim(_run_key(cfg, prep), {"host": socket.gethostname(), "pid": os.getpid()})
    init_ray()
    plan = _plan(cfg, root, prep, art.version_dir(version).url)
    with timings("worker"):
        result = remote_tune(plan)
    with timings("checksums"):
        after_sums = checksums(urls)
    changed = sorted(u for u in urls if before_sums[u] != after_sums.get(u))
    if changed:
        raise RuntimeError(f"{len(changed)} file(s) of set {cfg.set_name} or its indexes changed while re-tuning "
                           f"(first: {changed[:3]}); nothing was committed")
    report = _report(cfg, prep, result)
    if result["chosen"] is None:
        art.version_dir(version).delete(recursive=True)
        raise GateRefused(refusal_message(report), report)
    manifest = _manifest(cfg, prep, result, report, before_sums, after_sums, timings)
    manifest = art.commit(version, manifest)
    if cfg.publish:
        art.publish(version)
    return manifest


def prepare(cfg: RetuneConfig, root: Location) -> Prepared:
    """Every check that can fail on input, before training; returns what the plan needs."""
    from embedding.tuning import match_freeze, parameter_names
    from indexing.searcher import choose_query_encoder

    index_art = Artifact(root, "indexes", cfg.index)
    im = index_art.manifest(cfg.index_version)
    src = im.get("source", {})
    if src.get("set") != cfg.set_name:
        raise ValueError(f"index {cfg.index!r} was built from set {src.get('set')!r}, not {cfg.set_name!r}")
    set_art = Artifact(root, "sets", cfg.set_name)
    set_version = set_art.resolve(src["version"])
    sm = set_art.manifest(set_version)
    kind = "colbert" if im["index_kind"] == "plaid" else "dense"
    dim = _check_vectors(cfg, sm, im, kind)
    choice = choose_query_encoder(root, cfg.index, src, sm["model"], cfg.base)
    names = parameter_names(choice.path)
    for tc in cfg.runs():
        match_freeze(names, tc.freeze)
    train = load_training(cfg.train, cfg.train_qrels)
    dev, dev_qrels = load_dev(cfg.dev_queries, cfg.dev_qrels)
    _check_ids(set_art.version_dir(set_version), sm, kind, train, dev_qrels)
    logger.info("re-tuning %s's query encoder on %d training queries against set %s %s (%s, dim %d); "
                "%d run(s); %d dev queries", choice.path, len(train), cfg.set_name, set_version, kind, dim,
                len(cfg.runs()), len(dev))
    return Prepared(index_manifest=im, set_manifest=sm, set_version=set_version, kind=kind, dim=dim, choice=choice,
                    train=train, dev=dev, dev_qrels=dev_qrels, set_dir=set_art.version_dir(set_version).url)


def _check_vectors(cfg: RetuneConfig, sm: dict, im: dict, kind: str) -> int:
    want = "dense" if kind == "dense" else "tokens"
    stored = sm["dims"].get(kind)
    if stored is None or not any(e["kind"] == want for e in sm["files"]) or (kind == "colbert" and not sm.get("codec")):
        raise NotFoundError(f"set {cfg.set_name} {sm['version']} has no stored {want} vectors (embedded with "
                            f"--mode {sm['config']['mode']}), which index {cfg.index!r} ({im['index_kind']}) needs")
    dim = cfg.dim or int(im["dim"])
    if dim > stored:
        raise ValueError(f"dim {dim} is above the stored {kind} dimension {stored} of set {cfg.set_name}")
    if dim != int(im["dim"]):
        logger.warning("training at dim %d, but index %s searches at dim %d: mining uses the index", dim,
                       cfg.index, im["dim"])
    return dim


def _check_ids(set_dir: Location, sm: dict, kind: str, train: list[TrainQuery], dev_qrels: dict) -> None:
    """Training positives must have stored vectors; dev judgements outside the set are only counted."""
    want = "dense" if kind == "dense" else "tokens"
    pos = pa.array(sorted({d for q in train for d in q.positives}), pa.string())
    judged = pa.array(sorted({d for docs in dev_qrels.values() for d, g in docs.items() if g > 0}), pa.string())
    found_pos = np.zeros(len(pos), bool)
    found_dev = np.zeros(len(judged), bool)
    for f in sets.set_files(set_dir, sm, want):
        ids = sets.read_live(f, ["id"]).column("id").combine_chunks()
        found_pos |= np.asarray(pc.is_in(pos, value_set=ids).to_numpy(zero_copy_only=False), bool)
        found_dev |= np.asarray(pc.is_in(judged, value_set=ids).to_numpy(zero_copy_only=False), bool)
    if not found_pos.all():
        missing = pos.filter(pa.array(~found_pos)).to_pylist()
        raise ValueError(f"{len(missing)} training positive id(s) are not documents of set {sm['name']} "
                         f"{sm['version']} with stored {want} vectors, e.g. {missing[:_LISTED]}")
    if len(judged) and not found_dev.all():
        logger.warning("%d dev judgement(s) name documents absent from the set: they can never be retrieved",
                       int((~found_dev).sum()))


def _run_key(cfg: RetuneConfig, prep: Prepared) -> str:
    key = {"cfg": {k: v for k, v in cfg.to_dict().items() if k not in ("root", "threads", "device", "publish")},
           "set": prep.set_manifest["model"]["fingerprint"], "base": prep.choice.fingerprint,
           "train": [dataclasses.astuple(q) for q in prep.train]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _plan(cfg: RetuneConfig, root: Location, prep: Prepared, version_dir: str) -> Plan:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda" and gpus < 1:
        raise ValueError("device 'cuda' was asked for but the Ray cluster has no GPU")
    device = "cuda" if gpus >= 1 and cfg.device != "cpu" else "cpu"
    choice = prep.choice
    return Plan(cfg, root.url, prep.index_manifest["version"], prep.kind, prep.dim, prep.set_dir,
                prep.set_manifest, str(choice.path), choice.settings.to_dict(), choice.fingerprint,
                prep.train, prep.dev, prep.dev_qrels, version_dir, device)


def remote_tune(plan: Plan) -> dict:
    """:func:`jobs.retune_worker.tune` in one Ray task: a GPU worker when ``plan.device`` is cuda,
    else one CPU slot (threads: the node's)."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if plan.device == "cuda" else 0, max_retries=0)(tune)
    return ray.get(task.remote(plan))


# ---- reporting --------------------------------------------------------------------------------
def _report(cfg: RetuneConfig, prep: Prepared, result: dict) -> dict:
    chosen = result["chosen"]
    return {"runs": result["runs"], "chosen": chosen, "before": result["before"], "after": result.get("after"),
            "negatives": result["negatives"], "set": cfg.set_name, "set_version": prep.set_version,
            "best_refused": best_refused(result) if chosen is None else None}


def _manifest(cfg: RetuneConfig, prep: Prepared, result: dict, report: dict, before_sums: dict,
              after_sums: dict, timings: Timings) -> dict:
    sm, im, choice = prep.set_manifest, prep.index_manifest, prep.choice
    compat = {"set": cfg.set_name, "version": prep.set_version, "fingerprint": sm["model"]["fingerprint"]}
    verdict = result.get("gate")
    evaluation = None
    if result["before"] is not None:
        evaluation = {"method": "exact", "k": EVAL_K, "dim": prep.dim, "before": result["before"],
                      "after": result["after"], "delta_points": {
                          "overall": verdict["overall_delta"], "per_language": verdict["per_language_delta"]},
                      "gate": verdict, "dev": {"queries": location(cfg.dev_queries).url,
                                               "qrels": location(cfg.dev_qrels).url,
                                               "judged_queries": len(prep.dev)}}
    return {
        "fingerprint": result["fingerprint"], "base_fingerprint": choice.fingerprint,
        "base": {"path": str(choice.path), "registered": choice.registered, "ref": cfg.base},
        "settings": choice.settings.to_dict(), "compatible_with": compat, "source": dict(compat),
        "index": {"name": cfg.index, "version": im["version"], "kind": im["index_kind"], "dim": im["dim"]},
        "vectors": {"kind": prep.kind, "dim": prep.dim, "documents": result["documents"]},
        "training": {**result["train_config"], "stats": result["train_stats"],
                     "parameter_changes": {k: v for k, v in result["changes"].items() if k != "changed"},
                     "train": location(cfg.train).url,
                     "train_qrels": location(cfg.train_qrels).url if cfg.train_qrels else None,
                     "queries": len(prep.train),
                     "device": result["device"], "threads": result["threads"]},
        "negatives": result["negatives"], "evaluation": evaluation,
        "forced": not (verdict or {}).get("passed", False), "runs": result["runs"], "chosen_run": result["chosen"] + 1,
        "immutability": {"files": len(before_sums), "unchanged": before_sums == after_sums,
                         "before": before_sums, "after": after_sums},
        "files": result["files"], "config": cfg.to_dict(),
        "timings": {**timings.to_dict(), **{f"worker_{k}": v for k, v in result["timings"].items()}},
        "created_at": utcnow(),
    }


# ---- immutability ----------------------------------------------------------------------------
def set_file_urls(root: Location, set_name: str, set_version: str) -> list[str]:
    """Every file of the set version and of every committed index built on it (manifests included)."""
    art = Artifact(root, "sets", set_name)
    vdir = art.version_dir(set_version)
    m = art.manifest(set_version)
    urls = [vdir.join(layout.MANIFEST).url] + [_entry_url(vdir, e) for e in m["files"]]
    for im in committed_manifests(root, "indexes"):
        src = im.get("source", {})
        if src.get("set") == set_name and src.get("version") == set_version:
            idir = location(im["_dir"])
            urls += [idir.join(layout.MANIFEST).url] + [_entry_url(idir, e) for e in im.get("files", [])]
    return sorted(set(urls))


def checksums(urls: list[str]) -> dict[str, str]:
    """``{url: sha256}``, a few files at a time (object stores reward parallel reads)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(urls, pool.map(lambda u: location(u).sha256(), urls)))


def _entry_url(base: Location, entry: dict) -> str:
    return sets.entry_location(base, entry).url

