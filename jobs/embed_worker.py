"""The mapper of the embed job: one actor holds one model and turns pieces into shards.

An actor reads its piece straight from the corpus (local or s3://), encodes the
non-empty texts in length buckets, compresses ColBERT tokens with the set's
codec, writes the shard's Parquet files and then its marker. The marker is
what makes a shard "done" for a resumed run; the driver only ever sees the
small per-shard statistics.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedding.codec import ResidualCodec
from embedding.languages import LanguageError, route_languages
from embedding.model import adapter_languages
from embedding.vectors import DocumentVectors
from jobs.embed_augment import ShardAugmenter
from jobs.failpoints import failpoint
from jobs.plan import COMPRESS_GROUP_TOKENS, token_groups
from jobs.runtime import arrow_pool
from jobs.sample_cache import cache_table, read_cache_and_precision, sample_cache, write_cache
from storage import layout, schemas
from storage.augment_queries import AugmentQueryError
from storage.corpus import ColumnMap, CorpusError, CorpusFile, meta_hashes, read_rows, text_hashes
from storage.fs import Location
from storage.manifest import file_entry

if TYPE_CHECKING:  # imported on first use at run time: torch loads only when a model does
    from embedding.encoder import Encoder

logger = logging.getLogger(__name__)

RESERVED = set(schemas.DOCS_CORE.names)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an actor needs, as plain data (it crosses process boundaries)."""

    model_dir: str
    settings: dict
    fingerprint: str
    files: list          # CorpusFile dicts
    columns: dict        # ColumnMap fields
    version_dir: str     # URL of the version being written
    dense: bool
    colbert: bool
    threads: int
    device: str
    max_batch: int
    max_tokens: int
    augment: "dict | None" = None  # jobs.embed_augment.ShardAugmenter's spec; None: no augmentation
    precision: str = "auto"        # embedding.model.PRECISIONS, resolved on the actor's own device


class ShardError(RuntimeError):
    """A shard failed on a worker: the message names the shard, its file and records.

    One message argument and no ``__init__`` of its own, so it pickles back to the
    driver whole (Ray does not carry ``__cause__`` across; the message does).
    """


class ShardInputError(ShardError, CorpusError):
    """A shard failed on its input (a :class:`CorpusError`): the user's to fix (exit 2)."""


def shard_error(err: Exception, shard: int, url: str, start: int, end: int) -> ShardError:
    """``err`` raised while working on rows ``[start, end)`` of ``url`` as shard ``shard``,
    as a :class:`ShardError` (a :class:`ShardInputError` for bad input) to raise ``from err``."""
    if isinstance(err, ShardError):
        return err
    where = f"shard {shard} ({url}, records {start + 1}-{end})"
    # a language without an adapter, bad augmentation queries in a corpus column: the input's fault
    if isinstance(err, (CorpusError, LanguageError, AugmentQueryError)):
        return ShardInputError(f"{err} ({where})")
    return ShardError(f"{where}: {type(err).__name__}: {err}")


class EncoderActor:
    """Holds one model, loaded on first use; ``__call__`` handles one batch of piece rows.

    The model is loaded lazily: a shard whose every document the codec-sample pass
    already encoded is compressed and written without it, so the second pass over a
    small corpus (PLAID's sample is all of it) never loads the model at all.

    Two calls may run at once (``jobs.embed_pool.calls_per_actor``, each in its own
    thread): the model load, the forward passes and the compression hold ``_compute``,
    one shard at a time, while reading a shard and writing one do not. The next shard's
    read and the last one's writes (s3 round trips, Parquet encoding) overlap the
    encoding instead of stalling it, and each call still returns only when its own
    files and marker are written.
    """

    def __init__(self, spec: WorkerSpec, codec_url: "str | None" = None, *, exclusive: bool = True) -> None:
        # torch, transformers and the model are imported and loaded on first use (the
        # ``lm`` property): an actor with nothing to encode starts in a fraction of the time.
        arrow_pool()  # before this process's first Parquet read (see jobs.runtime)
        self.spec = spec
        self._lm = None
        self._encoder = None
        self._load_s = 0.0  # model load seconds not yet reported in a shard's stats
        self.files = [CorpusFile.from_dict(f) for f in spec.files]
        self.cols = ColumnMap(**spec.columns)
        self.vdir = Location(spec.version_dir)
        self.codec = ResidualCodec.from_bytes(Location(codec_url).read_bytes()) if codec_url else None
        # X-MOD models: the adapters, read from config.json (no torch) to count the routing
        self.adapters = adapter_languages(spec.model_dir)
        self.augmenter = ShardAugmenter(spec.augment, self.vdir, spec.device) if spec.augment else None
        # exclusive=False: calls compute at once, each on its own threads (pass 2's cached
        # shards: no model, each compression on one thread; see jobs.embed_pool.write_cached_shards)
        self._compute = threading.Lock() if exclusive else contextlib.nullcontext()
        self._load_lock = threading.Lock()
        #: added to every shard's statistics (its marker): facts about the process that wrote it
        self.stats_extra: dict = {"arrow_pool": pa.default_memory_pool().backend_name}
        #: threads that share each shard's compression (pass 2's tasks set it; see compress_tokens)
        self.compress_pool: "Executor | None" = None

    @property
    def lm(self):
        if self._lm is None:
            with self._load_lock:  # calls that compute at once (exclusive=False) load it once
                if self._lm is None:
                    self._load()
        return self._lm

    def _load(self) -> None:
        """Load the model and check its fingerprint (under ``_load_lock``, see :attr:`lm`)."""
        start = time.perf_counter()
        import torch
        import transformers

        from embedding.model import EncoderSettings, load_model

        if self.spec.device == "cpu":
            torch.set_num_threads(self.spec.threads)
        transformers.utils.logging.set_verbosity_error()  # no per-actor load reports in the job log
        transformers.utils.logging.disable_progress_bar()
        spec = self.spec
        lm = load_model(spec.model_dir, EncoderSettings(**spec.settings), device=spec.device,
                        precision=spec.precision)
        if lm.fingerprint != spec.fingerprint:
            raise RuntimeError(f"model at {spec.model_dir} on this worker has fingerprint "
                               f"{lm.fingerprint[:12]}, the job expects {spec.fingerprint[:12]}: "
                               "every node must see the same model files")
        self._lm = lm
        self._load_s += time.perf_counter() - start

    @property
    def encoder(self) -> "Encoder":
        if self._encoder is None:
            # The model first: embedding.encoder imports torch (~1.3 s in a fresh actor),
            # and that import belongs to the load (``lm``'s timer, reported as
            # load_seconds), not to the first shard's encoding.
            lm = self.lm
            from embedding.encoder import Encoder

            encoder = Encoder(lm, max_batch=self.spec.max_batch, max_tokens=self.spec.max_tokens)
            if self.spec.device == "cuda":
                # cuBLAS's handle and the kernels load on the first forward: part of the load,
                # as for the benchmark's reference, not of the first shard's forward.
                start = time.perf_counter()
                encoder.forward_only(["warm-up"] * 2, 16)
                self._load_s += time.perf_counter() - start
            self._encoder = encoder
        return self._encoder

    def _stage_seconds(self) -> dict[str, float]:
        return dict(self._encoder.stage_seconds) if self._encoder is not None else {}

    @staticmethod
    def _stage_delta(before: dict, after: dict) -> dict[str, float]:
        """The encoder's seconds per stage spent between two snapshots, as stats keys."""
        return {f"{k}_seconds": round(v - before.get(k, 0.0), 3) for k, v in after.items()}

    @contextlib.contextmanager
    def _computing(self) -> Iterator[dict]:
        """Hold the compute lock for one call's model and codec work. The dict it yields
        gets the call's statistics of it: ``wait_seconds`` (for the other call), and on
        exit the encoder's seconds per stage and the model load it paid (``load_seconds``)."""
        waiting = time.perf_counter()
        with self._compute:
            span = {"wait_seconds": round(time.perf_counter() - waiting, 3)}
            stages = self._stage_seconds()
            yield span
            span.update(self._stage_delta(stages, self._stage_seconds()), load_seconds=self._take_load_seconds())

    def _take_load_seconds(self) -> float:
        """Model load seconds spent since the last call (reported once, by one shard)."""
        out, self._load_s = self._load_s, 0.0
        return round(out, 3)

    def _read(self, row: dict) -> pa.Table:
        return read_rows(self.files[int(row["file"])], int(row["start"]), int(row["end"]), self.cols)

    def _failed(self, row: dict, err: Exception) -> "ShardError":
        return shard_error(err, int(row["shard"]), self.files[int(row["file"])].url, int(row["start"]),
                           int(row["end"]))


class ShardEncoder(EncoderActor):
    """Pass 2: encode + compress + write every shard of the plan."""

    def __call__(self, batch: dict) -> dict:
        stats = []
        for i in range(len(batch["shard"])):
            row = {k: batch[k][i] for k in ("shard", "file", "start", "end", "rows") if k in batch}
            try:
                stats.append(json.dumps(self.write_shard(row)))
            except Exception as err:
                raise self._failed(row, err) from err
        return {"stats": np.array(stats, dtype=object)}

    def write_shard(self, row: dict) -> dict:
        """Read, encode, compress and write one shard; its statistics (the marker's content).

        Only the model and the codec run under the actor's compute lock: the read before
        it and the writes after it overlap the other call's encoding (see :class:`EncoderActor`).
        """
        started_at, start = time.time(), time.perf_counter()
        shard = int(row["shard"])
        failpoint("embed.shard", shard)
        table = self._read(row)
        if row.get("rows"):  # a re-index delta shard: only these rows of the range changed
            table = table.take(pa.array(json.loads(str(row["rows"])), pa.int64()))
        texts = pc.fill_null(table.column("text"), "").to_pylist()
        keep = np.array([bool(t.strip()) for t in texts], bool)
        kept = table.filter(pa.array(keep))
        kept_texts = [t for t, k in zip(texts, keep) if k]
        langs = kept.column("lang").to_pylist()
        ids = kept.column("id").to_pylist()
        cached, cached_precision = self._cached(shard)
        read_s = time.perf_counter() - start
        with self._computing() as span:
            t0 = time.perf_counter()
            enc = self._encode(np.flatnonzero(keep), kept_texts, langs, cached) if kept_texts else None
            encode_s = time.perf_counter() - t0
            precision = self._precisions(np.flatnonzero(keep), cached, cached_precision)
            aug = self._augment(row, np.flatnonzero(keep), ids, kept_texts, langs, kept, enc)
            augment_s = time.perf_counter() - t0 - encode_s  # generation and query encoding (xQG)
            t1 = time.perf_counter()
            tokens, residual = (self._tokens_table(ids, enc.tokens) if enc is not None and self.spec.colbert
                                else (None, {}))  # residual: of the passages' own tokens (a re-index's drift)
            tokens_aug = (self._tokens_table(ids, aug.tokens)[0] if aug is not None and aug.tokens is not None
                          else None)
            compress_s = time.perf_counter() - t1
        entries = []
        write = lambda kind, tbl: entries.append(self._write(kind, shard, tbl))  # noqa: E731
        t0 = time.perf_counter()
        column = self.augmenter.cfg.column if self.augmenter is not None else None
        if column in kept.column_names:  # the queries, not metadata
            kept = kept.drop_columns([column])
        write("docs", self._docs_table(kept, kept_texts, enc, shard))
        if enc is not None and self.spec.dense:
            write("dense", schemas.dense_table(ids, enc.dense))
        if tokens is not None:
            write("tokens", tokens)
        if aug is not None and aug.dense is not None:
            write("dense_aug", schemas.dense_table(ids, aug.dense))
        if tokens_aug is not None:
            write("tokens_aug", tokens_aug)
        if not keep.all():
            skipped = table.filter(pa.array(~keep)).column("id")
            write("skipped", pa.table({"id": skipped, "reason": pa.array(["empty_text"] * len(skipped)),
                                       "shard": pa.array([shard] * len(skipped), pa.int32())},
                                      schema=schemas.SKIPPED))
        stats = {"shard": shard, "rows_in": table.num_rows, "documents": len(ids),
                 "skipped_empty": int((~keep).sum()),
                 "tokens": int(sum(len(t) for t in enc.tokens)) if enc is not None and enc.tokens else 0,
                 "input_tokens": int(enc.n_tokens.sum()) if enc is not None else 0,
                 "truncated": int(enc.truncated.sum()) if enc is not None else 0, "precision": precision,
                 "encode_seconds": round(encode_s, 3), "read_seconds": round(read_s, 3), **span,
                 "compress_seconds": round(compress_s, 3), **residual,
                 "write_seconds": round(time.perf_counter() - t0, 3),
                 "seconds": round(time.perf_counter() - start, 3), "started_at": round(started_at, 3),
                 **({**aug.stats, "augment_seconds": round(augment_s, 3)} if aug is not None else {}),
                 **self._routing(langs), **self.stats_extra, "files": entries}
        marker = self.vdir.join(layout.SHARD_MARKERS, f"{shard:05d}.json")
        marker.write_text(json.dumps(stats))  # last: the shard is done
        return stats

    def _routing(self, langs: list) -> dict:
        """X-MOD models: the shard's documents per adapter and, by language, those that fell back."""
        if self.adapters is None:
            return {}
        counts = route_languages(langs, self.adapters, self.spec.settings.get("adapter_fallback")).counts()
        return {"per_adapter": counts["per_adapter"], "fallback_languages": counts["fallback_languages"]}

    def _augment(self, row: dict, offsets: np.ndarray, ids: list[str], texts: list[str], langs: list,
                 kept: pa.Table, enc: "DocumentVectors | None"):
        """xQG: the shard's augmented vectors (``jobs.embed_augment``), or None."""
        if self.augmenter is None or enc is None:
            return None
        url, start = self.files[int(row["file"])].url, int(row["start"])
        where = [f"{url}: record {start + int(o) + 1}" for o in offsets]
        return self.augmenter.augment(self.encoder, ids, texts, langs, kept, where,
                                      enc.dense if self.spec.dense else None,
                                      enc.tokens if self.spec.colbert else None)

    def _cached(self, shard: int) -> "tuple[dict, str | None]":
        """The shard's documents pass 1 already encoded (its sample cache), by row offset,
        and the type the model ran in there (None: no cache, or one that does not say)."""
        cache_loc = sample_cache(self.vdir, shard)
        if not (self.spec.colbert and cache_loc.exists()):
            return {}, None
        return read_cache_and_precision(cache_loc, self.codec.dim)

    def _precisions(self, offsets: np.ndarray, cached: dict, cached_precision: "str | None") -> list[str]:
        """The types the model ran in for the shard's encodings: this actor's for the rows it
        encoded, the cache's for those pass 1 did ("unknown" for a cache that does not say)."""
        out = set()
        if any(int(o) not in cached for o in offsets):
            out.add(self.lm.precision)
        if any(int(o) in cached for o in offsets):
            out.add(cached_precision or "unknown")
        return sorted(out)

    def _encode(self, offsets: np.ndarray, texts: list[str], langs: list, cached: dict) -> DocumentVectors:
        """Encode the kept rows, taking those pass 1 already encoded from ``cached``."""
        todo = [i for i, o in enumerate(offsets) if int(o) not in cached]
        fresh = self.encoder.encode_documents([texts[i] for i in todo], dense=self.spec.dense,
                                              colbert=self.spec.colbert,
                                              langs=[langs[i] for i in todo]) if todo else None
        if not cached:
            return fresh
        n = len(texts)
        hidden = len(next(iter(cached.values()))[0]) if self.spec.dense else 0
        out = DocumentVectors(np.zeros((n, hidden), np.float32) if self.spec.dense else None,
                              [None] * n, np.zeros(n, np.int32), np.zeros(n, bool))
        for j, i in enumerate(todo):
            self._put(out, i, fresh.dense[j] if fresh.dense is not None else None, fresh.tokens[j],
                      fresh.n_tokens[j], fresh.truncated[j])
        for i, o in enumerate(offsets):
            if int(o) in cached:
                self._put(out, i, *cached[int(o)])
        return out

    @staticmethod
    def _put(out: DocumentVectors, i: int, dense_vec, tokens, n_tokens, truncated) -> None:
        if out.dense is not None:
            out.dense[i] = dense_vec
        out.tokens[i] = tokens
        out.n_tokens[i] = n_tokens
        out.truncated[i] = truncated

    def _write(self, kind: str, shard: int, table: pa.Table) -> dict:
        loc = self.vdir.join(kind, layout.shard_name(shard))
        info = schemas.write_table(loc, table)
        return file_entry(loc, self.vdir, kind=kind, shard=shard, nbytes=info["bytes"],
                          rows=info["rows"], sha256=info["sha256"])

    def _docs_table(self, kept: pa.Table, texts: list[str], enc, shard: int) -> pa.Table:
        n = kept.num_rows
        core = {
            "id": kept.column("id"), "lang": kept.column("lang"), "title": kept.column("title"),
            "sha256": pa.array(text_hashes(texts), pa.string()),
            "n_chars": pa.array([len(t) for t in texts], pa.int32()),
            "n_tokens": pa.array(enc.n_tokens if enc is not None else np.zeros(0, np.int32), pa.int32()),
            "truncated": pa.array(enc.truncated if enc is not None else np.zeros(0, bool), pa.bool_()),
            "shard": pa.array(np.full(n, shard, np.int32)),
            "meta_sha256": pa.array(meta_hashes(kept), pa.string()),
        }
        table = pa.table(core, schema=schemas.DOCS_CORE)
        for name in kept.column_names:
            if name in ("id", "text", "lang", "title"):
                continue
            out = name if name not in RESERVED else f"extra_{name}"
            table = table.append_column(out, kept.column(name))
        return table

    def _tokens_table(self, ids: list[str], tokens: list[np.ndarray]) -> tuple[pa.Table, dict]:
        """The compressed tokens' table, and the residual statistics of the vectors
        (``residual_abs_sum`` over ``residual_values``, see ``compress_with_residual_sum``)."""
        lengths = [len(t) for t in tokens]
        # The documents' arrays as they are, not concatenated first: the codec gathers each
        # batch's rows (float16 from the sample cache, float32 from the model). On a GPU
        # encoder the nearest-centroid search runs on the GPU, off the CPU threads.
        codes, residuals, abs_sum = self.compress_tokens(tokens)
        splits = np.cumsum(lengths)[:-1]
        return (schemas.tokens_table(ids, np.split(codes, splits), np.split(residuals, splits),
                                     self.codec.code_dtype),
                {"residual_abs_sum": abs_sum, "residual_values": int(sum(lengths)) * self.codec.dim})

    def compress_tokens(self, tokens: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
        """``compress_with_residual_sum`` of a shard's documents; with :attr:`compress_pool` (pass
        2's tasks, CPU) in runs of documents (``jobs.plan.token_groups``) that the pool's threads
        share, so no thread idles while another compresses the last shard alone. The same bytes
        (a token's code does not depend on the others); the residual sum is added run by run."""
        device = "cuda" if self.spec.device == "cuda" else None
        if self.compress_pool is None or device is not None:  # an encoder actor's shard, or on the GPU
            return self.codec.compress_with_residual_sum(tokens, device=device)
        bounds = token_groups([len(t) for t in tokens], COMPRESS_GROUP_TOKENS)
        if len(bounds) < 3:  # one run: nothing to share
            return self.codec.compress_with_residual_sum(tokens)
        parts = list(self.compress_pool.map(lambda ab: self.codec.compress_with_residual_sum(tokens[ab[0]:ab[1]]),
                                            zip(bounds[:-1], bounds[1:])))
        return (np.concatenate([c for c, _, _ in parts]), np.concatenate([r for _, r, _ in parts]),
                float(sum(a for _, _, a in parts)))


class SampleEncoder(EncoderActor):
    """Pass 1: encode the sampled rows of a shard and cache their vectors under ``_sample/``.

    The sampled documents' full encodings (dense vector, raw token vectors) are cached
    so that pass 2 never runs the model on them again (on a small corpus, where PLAID's
    sample is most of it, the job still encodes every document once), and so that a
    run killed during this pass keeps the shards it finished. The driver reads the
    token vectors for the codec fit back from the cache; the actor returns statistics.
    """

    def __call__(self, batch: dict) -> dict:
        out = []
        for i in range(len(batch["shard"])):
            row = {k: batch[k][i] for k in ("shard", "file", "start", "end")}
            try:
                out.append(self.sample_shard(row, json.loads(batch["rows"][i])))
            except Exception as err:
                raise self._failed(row, err) from err
        return {"stats": np.array(out, dtype=object)}

    def sample_shard(self, row: dict, rows: list[int]) -> str:
        """Encode the sampled ``rows`` (offsets in the piece) of one shard into its cache; JSON stats."""
        started_at, start = time.time(), time.perf_counter()
        failpoint("embed.sample", int(row["shard"]))
        table = self._read(row)
        texts = pc.fill_null(table.column("text"), "").to_pylist()
        langs = table.column("lang").to_pylist()
        offsets = [o for o in rows if texts[o].strip()]
        with self._computing() as span:  # the read above and the write below overlap the other call's encoding
            enc = self.encoder.encode_documents([texts[o] for o in offsets], dense=self.spec.dense, colbert=True,
                                                langs=[langs[o] for o in offsets]) if offsets else None
        t0 = time.perf_counter()
        write_cache(sample_cache(self.vdir, int(row["shard"])),
                    cache_table(offsets, enc, self.lm.precision if enc is not None else None))
        return json.dumps({"shard": int(row["shard"]), "documents": len(offsets),
                           "write_seconds": round(time.perf_counter() - t0, 3), **span,
                           "seconds": round(time.perf_counter() - start, 3),
                           "started_at": round(started_at, 3)})
