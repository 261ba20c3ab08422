"""xQG passage augmentation in the embed job: the settings, the driver's checks, the actors' part.

A set embedded with augmentation stores, next to each shard's ``dense`` and ``tokens``
files, ``dense_aug`` and ``tokens_aug`` files of the same schemas: each passage's
vectors augmented with the vectors of queries about it in other languages
(:mod:`embedding.augment`). The plain vectors stay, so one set serves both and the
index build chooses (``tessera index --vectors augmented``).

The queries come from one of three sources:

* ``queries``: a Parquet/JSONL file (passage id, text, lang). The driver reads and checks
  it before it claims a version (unknown passages, bad rows: exit 2, nothing written) and
  copies it into the version folder (``_augment/queries.parquet``) for the actors, so a
  local file reaches every node and a resumed run reads what the first attempt checked.
* ``column``: a corpus column holding each document's queries; each actor reads it with
  its piece (bad values fail the shard as bad input before anything is published).
* ``generator``: a seq2seq folder; each encoder actor loads it next to the encoder and
  generates ``per_lang`` queries per passage per target language for the shard it
  encodes. In the encoder actor, not a pass of its own: the passages are already read
  and in memory there, the queries go straight into the same actor's query encoder, a
  killed run resumes shard by shard like any other (generation is seeded per batch, so
  a shard done again gets the same queries), and no second actor pool starts.

Queries are encoded with the query side of the model (query prefix, query marker, the
query's language adapter): the vectors added to a passage are those a search in that
language compares with it, which is what lets such a query find the passage.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from storage import schemas
from storage.fs import Location

if TYPE_CHECKING:
    from embedding.querygen import QueryGenerator

logger = logging.getLogger(__name__)

QUERIES_DIR = "_augment"
QUERIES_FILE = f"{QUERIES_DIR}/queries.parquet"
SOURCES = ("queries", "column", "generator")
#: GenerationSettings fields an AugmentConfig may set (None: GenerationSettings' default)
GENERATION_FIELDS = ("prompt", "max_new_tokens", "min_new_tokens", "do_sample", "top_k", "top_p",
                     "temperature", "num_beams", "max_input_length")


@dataclass(frozen=True)
class AugmentConfig:
    """How passages are augmented (part of ``jobs.embed.EmbedConfig``, its ``augment``).

    Attributes
    ----------
    queries : a Parquet/JSONL file (local or s3://) of ``passage_id``, ``text``, ``lang``.
    column : a corpus column with each document's queries (strings or ``{text, lang}``).
    generator : a local seq2seq model folder that writes the queries.
    langs : target languages: the generator's; for a file or column, only queries in
        these languages are used (None: all).
    per_lang : queries per passage per language: the generator's ``queries_per_lang``
        (None: its default); for a file or column the first ``per_lang`` (None: all).
    weight : the passage's weight in the dense mean (1 - weight: its queries' mean).
    max_tokens : most query token vectors appended to a passage's ColBERT tokens (None: all).
    seed : the generator's seed (None: the embed run's ``seed``).
    prompt, max_new_tokens, ... : generation settings (:class:`embedding.querygen.GenerationSettings`;
        None takes its default).
    """

    queries: "str | None" = None
    column: "str | None" = None
    generator: "str | None" = None
    langs: "tuple[str, ...] | None" = None
    per_lang: "int | None" = None
    # 0.7: on XQuAD X->English (me5-small, benchmarks/results/xqg_xquad.txt) w=0.7 gained
    # (mean nDCG@10 0.881 -> 0.892), w<=0.5 broke even or lost
    weight: float = 0.7
    max_tokens: "int | None" = 64
    seed: "int | None" = None
    prompt: "str | None" = None
    max_new_tokens: "int | None" = None
    min_new_tokens: "int | None" = None
    do_sample: "bool | None" = None
    top_k: "int | None" = None
    top_p: "float | None" = None
    temperature: "float | None" = None
    num_beams: "int | None" = None
    max_input_length: "int | None" = None

    def __post_init__(self) -> None:
        from embedding.augment import check_weight

        if isinstance(self.langs, (list, str)):
            langs = self.langs.split(",") if isinstance(self.langs, str) else self.langs
            object.__setattr__(self, "langs", tuple(x.strip() for x in langs if x.strip()))
        given = [s for s in SOURCES if getattr(self, s)]
        if len(given) != 1:
            raise ValueError("augmentation needs exactly one source of queries (a queries file, a corpus "
                             f"column or a generator folder), got {given or 'none'}")
        if self.generator and not self.langs:
            raise ValueError("a query generator needs target languages (augment_langs, e.g. 'de,fr')")
        if self.langs is not None and not self.langs:
            raise ValueError("augment_langs is empty")
        check_weight(self.weight)
        for name in ("per_lang", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < (1 if name == "per_lang" else 0)):
                raise ValueError(f"augment {name} must be an integer >= {1 if name == 'per_lang' else 0}, "
                                 f"got {value!r}")
        if self.generator:
            self.generation(0)  # bad generation settings fail here, before anything runs
        elif any(getattr(self, f) is not None for f in GENERATION_FIELDS):
            raise ValueError("generation settings go with a query generator (augment_generator)")

    @property
    def source(self) -> str:
        return next(s for s in SOURCES if getattr(self, s))

    def generation(self, run_seed: int):
        """The generator's :class:`~embedding.querygen.GenerationSettings`."""
        from embedding.querygen import GenerationSettings

        given = {f: getattr(self, f) for f in GENERATION_FIELDS if getattr(self, f) is not None}
        if self.per_lang is not None:
            given["queries_per_lang"] = self.per_lang
        if not given.get("do_sample", True) and "num_beams" not in given:
            given["num_beams"] = given.get("queries_per_lang", GenerationSettings.queries_per_lang)
        return GenerationSettings(seed=self.seed if self.seed is not None else run_seed, **given)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["langs"] = list(self.langs) if self.langs is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        return cls(**{**d, "langs": tuple(d["langs"]) if d.get("langs") is not None else None})


# ---- the driver ---------------------------------------------------------------------
def describe(aug: AugmentConfig, run_seed: int) -> dict:
    """What the augmentation is made from, before Ray starts: the queries file's content tag
    (sha256 of a local file, an s3 object's ETag) or the generator's fingerprint and
    settings. Goes into the run and input keys and the manifest. Bad folders raise here."""
    out: dict = {"source": aug.source}
    if aug.queries:
        from jobs import preflight

        out["file"] = preflight.content_tag(preflight.input_file(aug.queries, "augmentation queries file"))
    elif aug.column:
        out["column"] = aug.column
    else:
        from embedding.model import EncoderSettings, fingerprint
        from embedding.querygen import check_generator_dir

        d = check_generator_dir(aug.generator)
        out["generator"] = {"path": str(d.resolve()), "fingerprint": fingerprint(d, EncoderSettings()),
                            "settings": aug.generation(run_seed).to_dict()}
    return out


def check_queries(cfg, ids: list):
    """The queries file of ``cfg`` (an EmbedConfig with ``augment``) read and checked against the
    corpus ids (``ids``: one pyarrow array per file) and, for an X-MOD model without a fallback,
    the queries' languages against its adapters. None for the other sources (a generator's
    target languages are checked here too).

    Raises AugmentQueryError (unknown passages, bad rows) or LanguageError: exit 2, before
    a version is claimed.
    """
    from embedding.languages import route_languages
    from embedding.model import adapter_languages

    aug, fallback = cfg.augment, cfg.adapter_fallback
    adapters = adapter_languages(cfg.model)

    if aug.generator:
        if adapters is not None:
            route_languages(list(aug.langs), adapters, fallback, what="target languages of the query generator")
        return None
    if not aug.queries:
        return None
    from storage.augment_queries import load_augment_queries

    known = set()
    for arr in ids:
        known.update(arr.to_pylist())
    queries = load_augment_queries(aug.queries, known_ids=known)
    if adapters is not None:
        langs = [lang for lang in queries.langs if aug.langs is None or lang in aug.langs]
        route_languages(langs, adapters, fallback, what=f"augmentation queries in {aug.queries}")
    return queries


def write_queries(queries, vdir: Location) -> None:
    """The checked queries, for the actors (``_augment/queries.parquet`` in the version folder)."""
    if queries is not None:
        schemas.write_table(vdir.join(QUERIES_FILE), queries.table())


def manifest_record(aug: "AugmentConfig | None", source: dict, shard_stats: list[dict]) -> dict:
    """``{"augment": ...}`` for the manifest (``{}`` without augmentation): the settings, where
    the queries came from (``source["augment"]``, :func:`describe`'s record), the files
    holding the augmented vectors, and counts summed over the shards."""
    if aug is None:
        return {}
    total = lambda key: int(sum(s.get(key, 0) for s in shard_stats))  # noqa: E731
    if not total("aug_queries"):
        logger.warning("passage augmentation (%s) found no queries: the augmented vectors are the plain ones",
                       aug.source)
    return {"augment": {**source["augment"], "settings": aug.to_dict(),
                        "counts": {"queries": total("aug_queries"), "passages": total("aug_passages"),
                                   "tokens": total("aug_tokens"),
                                   "generated_empty": total("aug_generated_empty")}}}


def adapter_counts(shard_stats: list[dict]) -> dict:
    """X-MOD models: the manifest counts of documents per adapter and of those that fell back."""
    per, langs = Counter(), Counter()
    for s in shard_stats:
        per.update(s.get("per_adapter", {}))
        langs.update(s.get("fallback_languages", {}))
    if not per:
        return {}
    return {"per_adapter": dict(sorted(per.items())), "adapter_fallback": int(sum(langs.values())),
            "adapter_fallback_languages": dict(sorted(langs.items()))}


# ---- the actors -----------------------------------------------------------------------
@dataclass
class Augmented:
    """One shard's augmented vectors: dense (n, H) float32 or None, tokens n arrays or None."""

    dense: "np.ndarray | None"
    tokens: "list[np.ndarray] | None"
    stats: dict


class ShardAugmenter:
    """Held by an encoder actor: the queries of a shard's passages, encoded and mixed in.

    Parameters
    ----------
    spec : the ``augment`` of a ``jobs.embed_worker.WorkerSpec``: ``{"config": AugmentConfig
        dict, "run_seed": int}``.
    vdir : the version folder (where the driver put ``_augment/queries.parquet``).
    device : the actor's torch device (the generator's).
    """

    def __init__(self, spec: dict, vdir: Location, device: str) -> None:
        self.cfg = AugmentConfig.from_dict(spec["config"])
        self.run_seed = int(spec["run_seed"])
        self.vdir, self.device = vdir, device
        self._by_passage: "dict | None" = None
        self._table: "pa.Table | None" = None
        self._generator: "QueryGenerator | None" = None

    def queries(self, ids: list[str], texts: list[str], langs: list, table: pa.Table,
                where: list[str]) -> tuple[np.ndarray, list[str], list, int]:
        """The selected queries of the passages ``ids``: owner (m,) int64 rows, texts, langs,
        and the generator's empty outputs dropped."""
        from embedding.augment import select_queries

        empty = 0
        if self.cfg.generator:
            gen = self.generator.generate(texts, list(self.cfg.langs), passage_langs=langs)
            return gen.passage, gen.texts, gen.langs, int(gen.empty)
        if self.cfg.column:
            from storage.augment_queries import queries_from_column

            # a JSONL piece where no document has the column has no such column: no queries
            values = table.column(self.cfg.column).to_pylist() if self.cfg.column in table.column_names \
                else [None] * len(ids)
            q = queries_from_column(ids, values, column=self.cfg.column, where=where)
            pos = {pid: i for i, pid in enumerate(ids)}
            owner, qtexts, qlangs = np.array([pos[p] for p in q.passage_ids], np.int64), q.texts, q.langs
        else:
            owner, qtexts, qlangs = self._from_file(ids)
        if self.cfg.langs is not None:
            keep = [j for j, lang in enumerate(qlangs) if lang in self.cfg.langs]
            owner, qtexts, qlangs = owner[keep], [qtexts[j] for j in keep], [qlangs[j] for j in keep]
        pick = select_queries(owner, qlangs, self.cfg.per_lang)
        return owner[pick], [qtexts[j] for j in pick], [qlangs[j] for j in pick], empty

    def augment(self, encoder, ids: list[str], texts: list[str], langs: list, table: pa.Table,
                where: list[str], passage_dense: "np.ndarray | None",
                passage_tokens: "list[np.ndarray] | None") -> Augmented:
        """The shard's augmented vectors (passages without queries keep their own)."""
        from embedding.augment import augment_dense, augment_tokens, interleave

        owner, qtexts, qlangs, empty = self.queries(ids, texts, langs, table, where)
        dense, tokens = passage_dense is not None, passage_tokens is not None
        q = encoder.encode_query_tokens(qtexts, qlangs, dense=dense, colbert=tokens) if qtexts else None
        out = Augmented(None, None, {"aug_queries": len(qtexts), "aug_passages": int(len(np.unique(owner))),
                                     "aug_tokens": 0, "aug_generated_empty": empty})
        if dense:
            hidden = passage_dense.shape[1]
            out.dense = augment_dense(passage_dense, q.dense if q is not None else np.zeros((0, hidden)),
                                      owner, self.cfg.weight)
        if tokens:
            order = interleave(owner, qlangs)
            qtok = [q.tokens[j] for j in order] if q is not None else []
            out.tokens = augment_tokens(passage_tokens, qtok, owner[order], self.cfg.max_tokens)
            out.stats["aug_tokens"] = int(sum(len(a) - len(p) for a, p in zip(out.tokens, passage_tokens)))
        return out

    @property
    def generator(self) -> "QueryGenerator":
        if self._generator is None:
            from embedding.querygen import QueryGenerator

            self._generator = QueryGenerator.load(self.cfg.generator, self.cfg.generation(self.run_seed),
                                                  device=self.device)
        return self._generator

    def _from_file(self, ids: list[str]) -> tuple[np.ndarray, list[str], list]:
        if self._by_passage is None:
            self._table = schemas.read_table(self.vdir.join(QUERIES_FILE))
            by: dict = {}
            for j, pid in enumerate(self._table.column("passage_id").to_pylist()):
                by.setdefault(pid, []).append(j)
            self._by_passage = by
        picked = [(i, j) for i, pid in enumerate(ids) for j in self._by_passage.get(pid, ())]
        rows = pa.array([j for _, j in picked], pa.int64())
        sub = self._table.take(rows)
        return (np.array([i for i, _ in picked], np.int64), sub.column("text").to_pylist(),
                sub.column("lang").to_pylist())
