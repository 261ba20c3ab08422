"""The mapper of the embed job: one actor holds one model and turns pieces into shards.

An actor reads its piece straight from the corpus (local or s3://), encodes the
non-empty texts in length buckets, compresses ColBERT tokens with the set's
codec, writes the shard's Parquet files and then its marker. The marker is
what makes a shard "done" for a resumed run; the driver only ever sees the
small per-shard statistics.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedding.codec import ResidualCodec
from embedding.encoder import DocumentVectors, Encoder
from embedding.model import EncoderSettings, load_model
from storage import layout, schemas
from storage.corpus import ColumnMap, CorpusFile, meta_hashes, read_rows, text_hashes
from storage.fs import Location
from storage.manifest import file_entry

logger = logging.getLogger(__name__)

RESERVED = set(schemas.DOCS_CORE.names)
FAILPOINTS_ENV = "TESSERA_FAILPOINTS"
SAMPLE_CACHE = "_sample"


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


class EncoderActor:
    """Loads the model once; ``__call__`` handles one batch of piece rows."""

    def __init__(self, spec: WorkerSpec, codec_url: "str | None" = None) -> None:
        import torch
        import transformers

        transformers.utils.logging.set_verbosity_error()  # no per-actor load reports in the job log
        transformers.utils.logging.disable_progress_bar()
        if spec.device == "cpu":
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.lm = load_model(spec.model_dir, EncoderSettings(**spec.settings), device=spec.device)
        if self.lm.fingerprint != spec.fingerprint:
            raise RuntimeError(f"model at {spec.model_dir} on this worker has fingerprint "
                               f"{self.lm.fingerprint[:12]}, the job expects {spec.fingerprint[:12]}: "
                               "every node must see the same model files")
        self.encoder = Encoder(self.lm, max_batch=spec.max_batch, max_tokens=spec.max_tokens)
        self.files = [CorpusFile.from_dict(f) for f in spec.files]
        self.cols = ColumnMap(**spec.columns)
        self.vdir = Location(spec.version_dir)
        self.codec = ResidualCodec.from_bytes(Location(codec_url).read_bytes()) if codec_url else None
        self._residual_stats: dict = {}

    def _read(self, row: dict) -> pa.Table:
        f = self.files[int(row["file"])]
        try:
            return read_rows(f, int(row["start"]), int(row["end"]), self.cols)
        except Exception as err:
            raise RuntimeError(f"shard {int(row['shard'])}: reading {f.url} rows "
                               f"{int(row['start'])}-{int(row['end'])} failed: {err}") from err


class ShardEncoder(EncoderActor):
    """Pass 2: encode + compress + write every shard of the plan."""

    def __call__(self, batch: dict) -> dict:
        stats = []
        for i in range(len(batch["shard"])):
            row = {k: batch[k][i] for k in ("shard", "file", "start", "end", "rows") if k in batch}
            try:
                stats.append(json.dumps(self.write_shard(row)))
            except Exception as err:
                f = self.files[int(row["file"])]
                raise RuntimeError(f"shard {int(row['shard'])} ({f.url} rows {int(row['start'])}-"
                                   f"{int(row['end'])}) failed: {type(err).__name__}: {err}") from err
        return {"stats": np.array(stats, dtype=object)}

    def write_shard(self, row: dict) -> dict:
        start = time.perf_counter()
        shard = int(row["shard"])
        failpoint("embed.shard", shard)
        self._residual_stats = {}
        table = self._read(row)
        if row.get("rows"):  # a re-index delta shard: only these rows of the range changed
            table = table.take(pa.array(json.loads(str(row["rows"])), pa.int64()))
        texts = pc.fill_null(table.column("text"), "").to_pylist()
        keep = np.array([bool(t.strip()) for t in texts], bool)
        kept = table.filter(pa.array(keep))
        kept_texts = [t for t, k in zip(texts, keep) if k]
        t0 = time.perf_counter()
        enc = self._encode(shard, np.flatnonzero(keep), kept_texts) if kept_texts else None
        encode_s = time.perf_counter() - t0
        ids = kept.column("id").to_pylist()
        entries = []
        write = lambda kind, tbl: entries.append(self._write(kind, shard, tbl))  # noqa: E731
        write("docs", self._docs_table(kept, kept_texts, enc, shard))
        if enc is not None and self.spec.dense:
            write("dense", schemas.dense_table(ids, enc.dense))
        if enc is not None and self.spec.colbert:
            write("tokens", self._tokens_table(ids, enc.tokens))
        if not keep.all():
            skipped = table.filter(pa.array(~keep)).column("id")
            write("skipped", pa.table({"id": skipped, "reason": pa.array(["empty_text"] * len(skipped)),
                                       "shard": pa.array([shard] * len(skipped), pa.int32())},
                                      schema=schemas.SKIPPED))
        stats = {"shard": shard, "rows_in": table.num_rows, "documents": len(ids),
                 "skipped_empty": int((~keep).sum()),
                 "tokens": int(sum(len(t) for t in enc.tokens)) if enc is not None and enc.tokens else 0,
                 "input_tokens": int(enc.n_tokens.sum()) if enc is not None else 0,
                 "truncated": int(enc.truncated.sum()) if enc is not None else 0,
                 "encode_seconds": round(encode_s, 3), **self._residual_stats,
                 "seconds": round(time.perf_counter() - start, 3), "files": entries}
        marker = self.vdir.join(layout.SHARD_MARKERS, f"{shard:05d}.json")
        marker.write_text(json.dumps(stats))  # last: the shard is done
        return stats

    def _encode(self, shard: int, offsets: np.ndarray, texts: list[str]) -> DocumentVectors:
        """Encode the kept rows, taking those pass 1 already encoded from the sample cache."""
        cache_loc = sample_cache(self.vdir, shard)
        cached = read_cache(cache_loc, self.lm.colbert_dim, self.lm.hidden_size) \
            if self.spec.colbert and cache_loc.exists() else {}
        todo = [i for i, o in enumerate(offsets) if int(o) not in cached]
        fresh = self.encoder.encode_documents([texts[i] for i in todo], dense=self.spec.dense,
                                              colbert=self.spec.colbert) if todo else None
        if not cached:
            return fresh
        n = len(texts)
        out = DocumentVectors(np.zeros((n, self.lm.hidden_size), np.float32) if self.spec.dense else None,
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

    def _tokens_table(self, ids: list[str], tokens: list[np.ndarray]) -> pa.Table:
        lengths = [len(t) for t in tokens]
        allv = np.concatenate(tokens) if sum(lengths) else np.zeros((0, self.codec.dim), np.float32)
        codes, residuals = self.codec.compress(allv)
        self._residual_stats = residual_stats(self.codec, allv, codes)
        splits = np.cumsum(lengths)[:-1]
        return schemas.tokens_table(ids, np.split(codes, splits), np.split(residuals, splits),
                                    self.codec.code_dtype)


def residual_stats(codec: ResidualCodec, vectors: np.ndarray, codes: np.ndarray) -> dict:
    """Sum of ``|residual|`` over the vectors' values and their count: a re-index compares
    the mean with the codec's ``avg_residual`` to tell whether the centroids still fit."""
    if not len(vectors):
        return {"residual_abs_sum": 0.0, "residual_values": 0}
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    diff = np.abs(unit - codec.centroids[codes.astype(np.int64)])
    return {"residual_abs_sum": float(diff.sum(dtype=np.float64)), "residual_values": int(diff.size)}


def failpoint(name: str, value: int) -> None:
    """Fault injection for tests: ``TESSERA_FAILPOINTS="embed.shard=3"`` fails shard 3.

    ``embed.shard=3:crash`` kills the worker process instead of raising;
    ``embed.shard=3:kill`` has Ray kill the worker's actor (``ray.kill``).
    """
    for item in filter(None, os.environ.get(FAILPOINTS_ENV, "").split(",")):
        key, _, target = item.partition("=")
        target, _, how = target.partition(":")
        if key == name and target.strip() == str(value):
            if how == "crash":
                os._exit(17)
            if how == "kill":
                import ray

                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                time.sleep(60)  # the kill lands while we wait
            raise RuntimeError(f"failpoint {name}={value} triggered")


class SampleEncoder(EncoderActor):
    """Pass 1: encode the sampled rows, keep their vectors for pass 2, return their tokens.

    The sampled documents' full encodings (dense vector, raw token vectors) are cached
    under ``_sample/`` so pass 2 never runs the model on them again: on a small corpus,
    where PLAID's sample is most of it, the job still encodes every document once.
    """

    def __call__(self, batch: dict) -> dict:
        out = []
        for i in range(len(batch["shard"])):
            row = {k: batch[k][i] for k in ("shard", "file", "start", "end")}
            table = self._read(row)
            texts = pc.fill_null(table.column("text"), "").to_pylist()
            offsets = [o for o in json.loads(batch["rows"][i]) if texts[o].strip()]
            if not offsets:
                continue
            enc = self.encoder.encode_documents([texts[o] for o in offsets], dense=self.spec.dense, colbert=True)
            cache = sample_cache(self.vdir, int(row["shard"]))
            schemas.write_table(cache, _cache_table(offsets, enc))
            out.extend(enc.tokens)
        dim = self.lm.colbert_dim
        vectors = np.concatenate(out).astype(np.float16) if out else np.zeros((0, dim), np.float16)
        return {"vector": vectors}


def sample_cache(vdir: Location, shard: int) -> Location:
    return vdir.join(SAMPLE_CACHE, layout.shard_name(shard))


def _cache_table(offsets: list[int], enc: DocumentVectors) -> pa.Table:
    cols = {"row": pa.array(offsets, pa.int32()), "n_tokens": pa.array(enc.n_tokens, pa.int32()),
            "truncated": pa.array(enc.truncated, pa.bool_()),
            "tokens": pa.array([np.ascontiguousarray(t, np.float16).tobytes() for t in enc.tokens], pa.binary())}
    if enc.dense is not None:
        cols["dense"] = pa.array([np.asarray(v, np.float32).tobytes() for v in enc.dense], pa.binary())
    return pa.table(cols)


def read_cache(loc: Location, dim: int, hidden: int) -> dict[int, tuple]:
    """{row offset: (dense (H,) or None, tokens (t, dim) float32, n_tokens, truncated)}."""
    table = schemas.read_table(loc).to_pylist()
    return {r["row"]: (np.frombuffer(r["dense"], np.float32) if r.get("dense") is not None else None,
                       np.frombuffer(r["tokens"], np.float16).reshape(-1, dim).astype(np.float32),
                       r["n_tokens"], r["truncated"]) for r in table}
