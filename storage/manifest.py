"""Manifests, version claims and the atomic ``CURRENT`` pointer.

A version directory is invisible until its ``manifest.json`` exists, and the
manifest is written only after every file it lists. Publishing rewrites the
small ``CURRENT`` object (one atomic PUT or rename), so a reader sees the old
version or the new one, never a mix.
"""
import datetime as _dt
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, TypedDict

from storage import layout
from storage.fs import Location

if sys.version_info >= (3, 11):
    from typing import NotRequired
else:  # pragma: no cover - Python 3.10
    from typing_extensions import NotRequired

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class NotFoundError(LookupError):
    """An unknown set, index, encoder or version."""


# ---- manifest records ---------------------------------------------------------------------------
# What the jobs write, key by key. The manifests stay plain JSON dicts: these TypedDicts
# only name and document their keys (tests/storage/test_manifest_types.py checks every
# written manifest against them, so they cannot drift from the code that writes them).
# ``NotRequired`` keys are written by some writers only (the docstring says which).


class FileEntry(TypedDict):
    """One entry of a manifest's ``files`` list (:func:`file_entry`)."""

    path: str  # relative to the version folder; "../v000011/..." for a file reused from a sibling version
    # sets: docs|dense|tokens|skipped|codec|tombstones, dense_aug|tokens_aug (augmented vectors);
    kind: str  # indexes: index|ids|plaid; encoders: model
    rows: int  # Parquet rows; first-axis length of a .npy; a codec's centroids; 0 for model files
    bytes: int
    sha256: str  # hex digest of the file's bytes: every reader checks it
    shard: NotRequired[int]  # the shard of a set's docs/dense/tokens/skipped file
    reused: NotRequired[bool]  # re-index: carried over by reference from the parent version


class ClaimRecord(TypedDict):
    """``<version>/_claim.json``: who claimed an uncommitted version (:meth:`Artifact.claim`)."""

    run_key: str  # same key ⇔ same run: a rerun resumes the version instead of claiming a new one
    owner: dict[str, Any]  # {"host", "pid", and "job" for re-index claims}
    claimed_at: str  # ISO 8601, UTC


class CurrentPointer(TypedDict):
    """The body of an artifact's ``CURRENT`` (:meth:`Artifact.publish`)."""

    version: str  # the published version
    published_at: str  # ISO 8601, UTC
    set: NotRequired[str]  # indexes: the set whose CURRENT may pin this index
    indexes: NotRequired[dict[str, str]]  # sets: index name → version, published atomically with the set


class EncoderSettingsRecord(TypedDict):
    """``embedding.model.EncoderSettings.to_dict()``: how texts become vectors (part of the fingerprint)."""

    pooling: str  # "mean" | "cls" (dense vectors)
    query_prefix: str
    passage_prefix: str
    max_length: int  # dense token limit
    doc_maxlen: int  # ColBERT document token limit
    query_maxlen: int  # ColBERT query token limit
    query_augmentation: bool  # ColBERT queries padded to query_maxlen with mask tokens
    attend_to_mask_tokens: bool
    skip_punctuation: bool  # punctuation tokens dropped from ColBERT documents
    query_marker: "str | None"  # token inserted after the first special token of queries
    doc_marker: "str | None"  # ... of documents
    adapter_fallback: NotRequired[str]  # X-MOD: adapter of texts whose language has none (absent: an error)


class ModelRecord(TypedDict):
    """A set manifest's ``model``: the encoder the documents were embedded with."""

    path: str  # the model folder (absolute)
    settings: EncoderSettingsRecord
    fingerprint: str  # sha256 over weights, tokenizer and settings
    hidden_size: int  # the dense dimension
    colbert_dim: int  # the token vectors' dimension (after the projection, if any)
    projection: bool  # whether token vectors go through the checkpoint's linear projection


class Modes(TypedDict):
    """Which vectors a set holds."""

    dense: bool
    colbert: bool


class Dims(TypedDict):
    """Stored dimensions; None for vectors the set does not hold."""

    dense: "int | None"
    colbert: "int | None"


class CodecRecord(TypedDict):
    """A set manifest's ``codec`` (None without ColBERT vectors): the residual codec and its fit.

    ``nbits`` ... ``bucket_weights`` are ``embedding.codec.ResidualCodec.params()``; the rest
    describes the fit (``jobs.embed_codec.ensure_codec``).
    """

    file: str  # the codec.npz, relative to the version folder ("../v000001/codec.npz" when reused)
    sha256: str
    bytes: int
    sample_documents: int  # documents sampled for the fit
    sample_tokens: int  # their token vectors
    train_tokens: int  # token vectors k-means ran on (the rest is the held-out split)
    sample_shards: int  # shards the sample was drawn from
    sample_shards_reused: int  # of those, encoded by an interrupted earlier attempt
    estimated_corpus_tokens: int  # corpus tokens extrapolated from the sample (sizes the centroids)
    kmeans_iters: int
    kmeans: str  # kind the fit ran (codec.KMEANS_KINDS: flat, two-level, ...); absent before it existed
    nbits: int  # residual bits per dimension: 1, 2 or 4
    n_centroids: int
    dim: int
    code_dtype: str  # numpy dtype name of a centroid code: uint8 | uint16 | uint32
    bytes_per_token: int  # code plus packed residual
    avg_residual: float  # mean |residual| on the held-out tokens (the drift reference)
    bucket_cutoffs: list[float]  # (2**nbits - 1,) residual quantisation cutoffs
    bucket_weights: list[float]  # (2**nbits,) reconstruction value of each bucket


class SetCounts(TypedDict):
    """A set version's ``counts``; a re-indexed (delta) version adds the diff's counts."""

    input_rows: int  # corpus rows read
    documents: int  # live documents (non-empty texts)
    skipped_empty: int  # empty texts (the skipped view)
    tokens: int  # stored ColBERT token vectors (0 without ColBERT)
    input_tokens: "int | None"  # tokens before truncation (None on delta versions)
    truncated: "int | None"  # documents cut at doc_maxlen (None on delta versions)
    shards: int
    new: NotRequired[int]  # delta: documents not in the parent
    changed: NotRequired[int]  # delta: text or metadata changed
    deleted: NotRequired[int]  # delta: in the parent, not in the snapshot
    unchanged: NotRequired[int]  # delta
    tombstones: NotRequired[int]  # delta: rows of tombstones.parquet
    per_adapter: NotRequired[dict[str, int]]  # X-MOD models: documents encoded by each language adapter
    adapter_fallback: NotRequired[int]  # X-MOD: documents whose language had no adapter (sent to the fallback)
    adapter_fallback_languages: NotRequired[dict[str, int]]  # ... by their language ("und": none given)


class CorpusFileRecord(TypedDict):
    """One corpus file a version was embedded from."""

    url: str
    format: str  # "jsonl" | "parquet"
    rows: int


class InputFile(TypedDict):
    """One corpus file of the input record, with its content tag."""

    url: str
    bytes: int
    sha256: NotRequired[str]  # a local file's sha256
    etag: NotRequired[str]  # an s3 object's ETag (S3 changes it with every write)


class GeneratorRecord(TypedDict):
    """The xQG query generator of an augmented set."""

    path: str  # the seq2seq folder (absolute)
    fingerprint: str  # sha256 over its weights, tokenizer and config
    settings: dict[str, Any]  # embedding.querygen.GenerationSettings fields


class AugmentSource(TypedDict):
    """Where an augmented set's queries came from (``jobs.embed_augment.describe``)."""

    source: str  # "queries" (a file) | "column" (a corpus column) | "generator"
    file: NotRequired[InputFile]  # the queries file and its content tag
    column: NotRequired[str]  # the corpus column
    generator: NotRequired[GeneratorRecord]


class AugmentCounts(TypedDict):
    """What augmentation added, summed over the shards."""

    queries: int  # queries encoded and mixed in
    passages: int  # passages with at least one query
    tokens: int  # query token vectors appended to passages (ColBERT; after the cap)
    generated_empty: int  # generated queries that decoded to nothing (dropped)


class AugmentRecord(AugmentSource):
    """A set's ``augment``: its ``dense_aug``/``tokens_aug`` files hold the augmented vectors."""

    settings: dict[str, Any]  # jobs.embed_augment.AugmentConfig fields
    counts: AugmentCounts


class InputRecord(TypedDict):
    """What a version was embedded from (``jobs.embed.input_record``): an unchanged rerun is refused."""

    key: str  # sha256 over the files' tags, the model fingerprint and the settings that shape vectors
    files: list[InputFile]
    augment: NotRequired[AugmentSource]  # augmented sets: the queries file's tag or the generator


class WorkersRecord(TypedDict):
    """The encoder actor pool (``jobs.runtime.ActorPlan.to_dict()``)."""

    actors: int
    num_cpus: float  # per actor
    num_gpus: float  # per actor
    threads: int  # torch threads per actor
    device: str  # "cpu" | "cuda"
    calls: NotRequired[int]  # shards an actor holds at once; absent in manifests written before it
    # the type the encoders ran in for the version's documents, resolved ("bfloat16"; several
    # joined by "," in order; None: nothing encoded; jobs.embed_pool.run_precision); absent before it
    precision: NotRequired["str | None"]


class CodecLineage(TypedDict):
    """Residual drift accumulated since the codec was fitted (re-index)."""

    fit_on: str  # the set version the codec was fitted on
    documents_then: int  # that version's documents
    added_since: int  # documents encoded on the codec since
    residual_abs_sum: float  # sum of |residual| over their token vectors
    residual_values: int  # number of residual values summed


class Lineage(TypedDict):
    """A delta version's ``lineage``: what its indexes and codec were trained on."""

    indexes_trained_on: str  # the set version the indexes were last built (trained) on
    documents_then: int  # its documents
    added_since: int  # documents added or changed since (the max_added_share test)
    codec: CodecLineage


class CodecLineageUpdate(TypedDict):
    """Drift's running totals (the changed part of :class:`CodecLineage`)."""

    added_since: int
    residual_abs_sum: float
    residual_values: int


class Drift(TypedDict):
    """A delta version's ``drift``: this run's residuals against the codec's own (``jobs.reindex``).

    Without a codec (dense-only set) only ``residual_ratio`` (None), ``refit_codec``,
    ``residual_values``, ``codec_lineage`` and ``encoded_in`` are written.
    """

    residual_ratio: "float | None"  # mean |residual| of this run's tokens over the codec's
    refit_codec: bool  # the cumulative drift passed both thresholds: everything is re-embedded
    residual_values: int  # this run's residual values
    codec_lineage: CodecLineageUpdate
    encoded_in: str  # "driver" | "ray" | "none" (every shard was already finished)
    codec_avg_residual: NotRequired[float]  # the codec's own mean |residual|
    cumulative_ratio: NotRequired["float | None"]  # over every token added since the fit
    codec_added_share: NotRequired[float]  # documents added since the fit / documents it was fitted on
    max_residual_ratio: NotRequired[float]  # the thresholds applied
    min_refit_share: NotRequired[float]


class BytesRecord(TypedDict):
    """Bytes a re-index wrote and reused by reference."""

    written: int
    reused: int


class Committed(TypedDict):
    """Keys :meth:`Artifact.commit` adds to every manifest."""

    schema_version: int  # SCHEMA_VERSION
    kind: str  # "sets" | "indexes" | "encoders"
    name: str
    version: str  # "v000001"
    committed_at: str  # ISO 8601, UTC


class SetManifest(Committed):
    """``sets/<name>/<version>/manifest.json`` (``jobs.embed``; delta versions: ``jobs.reindex``).

    ``input`` is written by embed (and full re-embeds) only; ``lineage``, ``drift`` and
    ``bytes`` by incremental re-index versions only.
    """

    config: dict[str, Any]  # EmbedConfig fields (corpus a list); delta versions add "reindex": ReindexConfig fields
    model: ModelRecord
    modes: Modes
    dims: Dims
    dense_dtype: str  # "float16"
    codec: "CodecRecord | None"
    counts: SetCounts
    corpus: list[CorpusFileRecord]
    files: list[FileEntry]
    parent: "str | None"  # the set's current version when this one was written
    run_key: str
    workers: WorkersRecord
    timings: dict[str, float]  # stage → seconds (worker_<stage>: summed in-actor seconds)
    created_at: str
    input: NotRequired[InputRecord]
    lineage: NotRequired[Lineage]
    drift: NotRequired[Drift]
    bytes: NotRequired[BytesRecord]
    augment: NotRequired[AugmentRecord]  # xQG-augmented sets (dense_aug / tokens_aug files)


class DenseParams(TypedDict):
    """A dense index's ``params``: ``indexing.dense.DenseIndexParams.to_dict()``."""

    kind: str  # flat | ivf | ivfpq | hnsw | int8 | binary
    dim: int  # the Matryoshka prefix the index is built at
    nlist: "int | None"  # IVF lists
    pq_m: "int | None"  # PQ sub-quantisers
    pq_nbits: int
    hnsw_m: int
    ef_construction: int
    ef_search: int
    nprobe: int
    rescore: int  # float rescoring fetches k * rescore candidates


class PlaidParams(TypedDict):
    """A PLAID index's ``params``: its set's codec."""

    n_centroids: int
    nbits: int


class IndexSource(TypedDict):
    """The set version an index was built from."""

    set: str
    version: str
    dir: str  # the set version's folder URL (read from there when the set is not under the root)
    fingerprint: str  # the set's model fingerprint: search refuses another query encoder
    stored_dim: int  # the set's stored dimension of the indexed vectors
    codec: "CodecRecord | None"  # plaid: the set's codec record; None for dense kinds


class IndexUpdate(TypedDict):
    """An index version updated in place by a re-index."""

    parent: str  # the index version it was updated from
    removed: int  # tombstoned labels taken out
    added: int  # new documents appended
    holes: int  # labels without a document (n_labels - n_docs)


class IndexManifest(Committed):
    """``indexes/<name>/<version>/manifest.json`` (``jobs.build_index``; updates: ``jobs.index_update``).

    ``n_labels``, ``update`` and ``run_key`` are written by in-place updates only.
    """

    index_kind: str  # flat | ivf | ivfpq | hnsw | int8 | binary | plaid
    dim: int
    params: "DenseParams | PlaidParams"
    n_docs: int  # documents (rows of ids.parquet)
    source: IndexSource
    config: dict[str, Any]  # IndexConfig fields
    files: list[FileEntry]
    index_bytes: int  # bytes of the index files (ids.parquet and the ids/*.npy arrays excluded)
    bytes_per_document: float
    timings: dict[str, float]
    created_at: str
    n_labels: NotRequired[int]  # labels 0..n_labels-1 (removed documents leave holes)
    update: NotRequired[IndexUpdate]
    run_key: NotRequired[str]
    vectors: NotRequired[str]  # "augmented": built from the set's dense_aug/tokens_aug files; absent: plain


class EncoderBase(TypedDict):
    """The encoder a query encoder was tuned from."""

    path: str
    registered: bool  # a registered query encoder (NAME[@vN]) rather than the set's model or a folder
    ref: "str | None"  # the --base given, if any


class SetRef(TypedDict):
    """A set version and its model fingerprint (what a query encoder is compatible with)."""

    set: str
    version: str
    fingerprint: str


class EncoderIndexRef(TypedDict):
    """The index negatives were mined with."""

    name: str
    version: str
    kind: str  # its index_kind
    dim: int


class VectorsRef(TypedDict):
    """The stored document vectors the encoder was tuned against."""

    kind: str  # "dense" | "colbert"
    dim: int
    documents: int


class ParameterChanges(TypedDict):
    """How far training moved the weights (``embedding.tuning.parameter_changes``, less ``changed``)."""

    tensors: int
    tensors_changed: int
    elements: int
    elements_changed: int
    max_abs_change: float


class TrainingRecord(TypedDict):
    """The chosen run's training: its ``TrainConfig`` fields, inputs and statistics."""

    lr: float
    freeze: list[str]  # parameter name patterns kept frozen
    epochs: int
    steps: "int | None"
    batch_size: int
    warmup_ratio: float
    weight_decay: float
    clip: float
    seed: int
    temperature: float
    in_batch: bool  # in-batch negatives
    stats: dict[str, Any]  # embedding.tuning.train_query_encoder's statistics (losses, steps, grad norms, ...)
    parameter_changes: ParameterChanges
    train: str  # the training file's URL
    train_qrels: "str | None"
    queries: int  # training queries
    device: str
    threads: int


class NegativeFilters(TypedDict):
    lang: "str | None"
    where: "str | None"


class NegativesRecord(TypedDict):
    """What hard-negative mining found (the retune job's statistics over the mined lists)."""

    queries: int
    per_query: int  # negatives wanted per query
    mine_k: int
    skip_top: int
    filters: NegativeFilters
    mined_mean: float
    mined_min: int
    mined_total: int
    queries_short: int  # queries that got fewer than per_query
    unique_documents: int
    positive_in_top_k_share: float
    positive_at_rank_1_share: float
    positive_in_skipped_ranks_share: float
    mean_best_positive_rank: "float | None"
    skipped_non_positive: int
    in_batch: bool


class RunRow(TypedDict):
    """One training run of a retune (a sweep has several); ``None``s without a dev set."""

    lr: float
    freeze: list[str]
    steps: int
    loss_before: float
    loss_after: float
    tensors_changed: int
    max_abs_change: float
    ndcg_before: "float | None"
    ndcg_after: "float | None"
    delta: "float | None"  # nDCG@10 points
    worst_language: "str | None"
    worst_delta: "float | None"
    passed: "bool | None"  # the gate's verdict
    reasons: list[str]  # why the gate refused
    per_language_after: "dict[str, dict[str, float]] | None"


class GateVerdict(TypedDict):
    """The retune gate's verdict: may the tuned encoder replace the base? Deltas in nDCG@10 points."""

    passed: bool
    overall_delta: float
    per_language_delta: dict[str, float]
    worst_language: "str | None"
    worst_delta: "float | None"
    reasons: list[str]
    tolerance: float
    max_regression: float


class Scores(TypedDict):
    """Dev-set metric means, overall and per language."""

    overall: dict[str, float]
    per_language: dict[str, dict[str, float]]


class DeltaPoints(TypedDict):
    overall: float
    per_language: dict[str, float]


class DevSet(TypedDict):
    queries: str  # URL
    qrels: str  # URL
    judged_queries: int


class Evaluation(TypedDict):
    """The gate's evaluation (None without a dev set): exact search, base vs tuned encoder."""

    method: str  # "exact"
    k: int
    dim: int
    before: Scores
    after: Scores
    delta_points: DeltaPoints
    gate: GateVerdict
    dev: DevSet


class Immutability(TypedDict):
    """The set's and its indexes' files, hashed before and after tuning: vectors never change."""

    files: int
    unchanged: bool
    before: dict[str, str]  # URL → sha256
    after: dict[str, str]


class EncoderManifest(Committed):
    """``encoders/<name>/<version>/manifest.json`` (``jobs.retune``): a query encoder (HF folder)."""

    fingerprint: str  # of the tuned encoder
    base_fingerprint: str
    base: EncoderBase
    settings: EncoderSettingsRecord
    compatible_with: SetRef  # search refuses the encoder on any other set fingerprint
    source: SetRef
    index: EncoderIndexRef
    vectors: VectorsRef
    training: TrainingRecord
    negatives: NegativesRecord
    evaluation: "Evaluation | None"
    forced: bool  # published with --force although the gate did not pass (or without a gate)
    runs: list[RunRow]
    chosen_run: int  # 1-based
    immutability: Immutability
    files: list[FileEntry]
    config: dict[str, Any]  # RetuneConfig fields
    timings: dict[str, float]
    created_at: str


class ReleasedIndex(TypedDict):
    """A run report's ``indexes`` entry for a re-index: the new version of one index."""

    version: str
    how: str  # "updated" (in place) | "rebuilt"
    bytes: int
    parent: NotRequired[str]  # updated: the IndexUpdate fields
    removed: NotRequired[int]
    added: NotRequired[int]
    holes: NotRequired[int]


class ReindexDecision(TypedDict):
    """How a re-index went about it; an incremental run adds its :class:`Drift` keys."""

    mode: str  # "incremental" | "full"
    reason: str  # "delta", "--full" or the codec drift that forced a full re-embed
    added_share: float  # documents added since the indexes were trained / documents then
    max_added_share: float
    rebuild_indexes: bool
    residual_ratio: NotRequired["float | None"]
    refit_codec: NotRequired[bool]
    residual_values: NotRequired[int]
    codec_lineage: NotRequired[CodecLineageUpdate]
    encoded_in: NotRequired[str]
    codec_avg_residual: NotRequired[float]
    cumulative_ratio: NotRequired["float | None"]
    codec_added_share: NotRequired[float]
    max_residual_ratio: NotRequired[float]
    min_refit_share: NotRequired[float]


class RunReportRecord(TypedDict):
    """``runs/<run id>.json``: one re-index or rollback run, whatever its outcome (the runs view).

    Written from the start of the run on: a run that fails early lacks the later keys.
    """

    run_id: str  # "<UTC stamp>-<job>-<set>-<6 hex>"
    job: str  # "reindex" | "rollback"
    set: str
    started_at: str
    host: str
    pid: int
    config: dict[str, Any]  # reindex: ReindexConfig fields; rollback: {"to"}
    counts: dict[str, int]  # reindex: new, changed, deleted, unchanged, snapshot
    bytes: dict[str, int]  # reindex: written, reused (a BytesRecord)
    status: str  # published | failed | bad_input | refused | nothing_to_do | busy (jobs.errors.RUN_STATUS)
    exit_code: int
    finished_at: str
    seconds: float
    error: NotRequired[str]  # "<exception type>: <message>" of a failed run
    parent: NotRequired["str | None"]  # reindex: the set version diffed against; rollback: the one left
    model: NotRequired[str]  # reindex: the model fingerprint
    decision: NotRequired[ReindexDecision]
    version: NotRequired["str | None"]  # the set version written (reindex) or restored (rollback)
    indexes: NotRequired["dict[str, ReleasedIndex] | dict[str, str]"]  # reindex: records; rollback: versions
    gc: NotRequired[dict[str, Any]]  # storage.gc.collect's report (--keep)
    timings: NotRequired[dict[str, float]]  # reindex


#: What :meth:`Artifact.manifest` returns, by the artifact's kind.
AnyManifest = SetManifest | IndexManifest | EncoderManifest


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
               sha256: str, shard: "int | None" = None) -> FileEntry:
    """One ``files`` entry of a manifest; ``path`` is relative to ``base`` when under it."""
    try:
        path = loc.relative_to(base)
    except ValueError:
        path = loc.url  # reused by reference from another version
    entry: FileEntry = {"path": path, "kind": kind, "rows": int(rows), "bytes": int(nbytes), "sha256": sha256}
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

    def pointer(self) -> "CurrentPointer | None":
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

    def manifest(self, version: "str | None" = None) -> AnyManifest:
        """The committed manifest of ``version`` (default the current one): a :class:`SetManifest`,
        :class:`IndexManifest` or :class:`EncoderManifest` by ``kind``."""
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
        claim_body: ClaimRecord = {"run_key": run_key, "owner": owner, "claimed_at": utcnow()}
        body = dumps(claim_body).encode()
        while not self.version_dir(layout.version_name(number)).join(layout.CLAIM).write_if_absent(body):
            number += 1
        return layout.version_name(number), False

    def commit(self, version: str, manifest: dict) -> AnyManifest:
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
        body: CurrentPointer = {"version": v, "published_at": utcnow()}
        if set_name is not None:
            body["set"] = set_name
        if indexes is not None:
            body["indexes"] = dict(sorted(indexes.items()))
        self.loc.join(layout.CURRENT).write_text(dumps(body))
        logger.info("published %s/%s %s%s", self.kind, self.name, v,
                    f" with indexes {body['indexes']}" if indexes else "")


def pinned_index(set_pointer: "CurrentPointer | None", index: str) -> "str | None":
    """The version of ``index`` a set's ``CURRENT`` body pins, if any."""
    return ((set_pointer or {}).get("indexes") or {}).get(index)


def list_names(root: Location, kind: str) -> list[str]:
    """Names of artifacts of ``kind`` under ``root`` (those with a folder)."""
    return sorted(c.name for c in root.join(kind).list() if not c.name.startswith("."))


def committed_manifests(root: Location, kind: str) -> list[dict[str, Any]]:
    """Every committed manifest of ``kind`` (an :data:`AnyManifest`), with ``is_current`` and
    ``_dir`` (the version folder's URL) added, by name and version."""
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
