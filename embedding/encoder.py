"""Texts in, vectors out: dense (pooled, MRL-ready) and ColBERT (one vector per token).

Documents are encoded once; when the dense and ColBERT inputs are the same text
(no ColBERT document marker) one forward pass feeds both. Batches are bucketed
by token length to cut padding.

X-MOD models (per-language adapters, e.g. ColBERT-XM) take each text's language
(``langs``): texts are grouped by adapter first, then bucketed by length, so every
forward pass runs one adapter (:mod:`embedding.languages` plans the routing). Queries
without a language get the encoder's detector's guess, else the fallback adapter.
"""
from __future__ import annotations

import logging
import os
import string
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from embedding.batching import CPU_BATCH_COST, length_buckets
from embedding.languages import Routing, route_languages
from embedding.model import LoadedModel
from embedding.vectors import DocumentVectors  # noqa: F401  (re-exported: callers import it from here)

logger = logging.getLogger(__name__)

#: forward passes a CPU encoder runs at once (``streams="auto"``), each in its own thread
#: on an equal share of torch's threads. Two single-threaded streams beat one two-threaded
#: forward by ~12% with me5-small on 2 CPUs (bfloat16, 1,500 XQuAD sentences, interleaved
#: runs: 10.6 against 12.1 s): a one-batch forward's small products scale poorly over
#: threads, and a stream waits on no other thread's barrier when Ray's daemons take a core.
CPU_STREAMS = 2
#: environment variable that replaces :data:`CPU_STREAMS` for ``streams="auto"`` (1 turns streams off)
STREAMS_ENV = "TESSERA_CPU_STREAMS"


def auto_streams() -> int:
    """What ``streams="auto"`` stands for: ``$TESSERA_CPU_STREAMS`` if set, else :data:`CPU_STREAMS`."""
    raw = os.environ.get(STREAMS_ENV, "").strip()
    if not raw:
        return CPU_STREAMS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{STREAMS_ENV} must be an integer >= 1, got {raw[:20]!r}")
    return int(raw)

#: Punctuation whose tokens ColBERT drops from documents (its skiplist), plus common non-ASCII marks.
PUNCTUATION = string.punctuation + "。，、！？；：「」『』（）《》…—–«»“”‘’¿¡·"


def truncate_ids(ids: list[int], special: list[int], limit: int, marker: "int | None") -> tuple[list[int], int]:
    """Cut an encoding to ``limit`` tokens, keeping its special tokens, with an optional marker.

    The marker goes right after the leading special token (e.g. ``[CLS]``); only the text
    between the leading and trailing special tokens is cut.

    Returns
    -------
    (ids, full): the kept ids and the untruncated length (marker included).
    """
    lead = 0
    while lead < len(ids) and special[lead]:
        lead += 1
    lead = min(lead, 1) if lead < len(ids) else lead  # e.g. [CLS]; never eat the text
    trail = 0
    while trail < len(ids) - lead and special[len(ids) - 1 - trail]:
        trail += 1
    head, body, tail = ids[:lead], ids[lead:len(ids) - trail], ids[len(ids) - trail:]
    if marker is not None:
        head = head + [marker]
    room = max(0, limit - len(head) - len(tail))
    return head + body[:room] + tail, len(head) + len(body) + len(tail)


class Encoder:
    """Encodes with a :class:`~embedding.model.LoadedModel`.

    Parameters
    ----------
    max_batch : most sequences per forward pass.
    max_tokens : most padded tokens per forward pass (bounds memory).
    batch_cost : how texts are cut into batches (:func:`embedding.batching.length_buckets`):
        ``"auto"`` (default) :data:`embedding.batching.CPU_BATCH_COST` on CPU and greedy
        batches elsewhere; None greedy; a number of tokens per batch.
    detector : X-MOD models: text -> language code (or None) for queries given without
        a language (:func:`embedding.languages.make_detector`); None sends them to the fallback.
    streams : forward passes run at once when documents are encoded on CPU, each batch
        in one of ``streams`` threads with ``torch.get_num_threads() // streams`` torch
        threads: ``"auto"`` (default) :func:`auto_streams` (2, or ``$TESSERA_CPU_STREAMS``),
        at most one per torch thread; 1 runs one batch at a time on all of them. On a GPU,
        one. Queries are always one stream. The model is shared by the streams: its forward
        must not change its own state (true of inference in the architectures
        ``transformers.AutoModel`` loads without remote code).
    """

    def __init__(self, lm: LoadedModel, *, max_batch: int = 64, max_tokens: int = 16384,
                 detector: "Callable[[str], str | None] | None" = None,
                 batch_cost: "int | str | None" = "auto", streams: "int | str" = "auto") -> None:
        if streams != "auto" and (isinstance(streams, bool) or not isinstance(streams, int) or streams < 1):
            raise ValueError(f"streams must be 'auto' or an integer >= 1, got {streams!r}")
        self.streams = streams
        self.lm = lm
        self.detector = detector
        self.s = lm.settings
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        if batch_cost == "auto":
            batch_cost = CPU_BATCH_COST if lm.device.type == "cpu" else None
        self.batch_cost = batch_cost
        tok = lm.tokenizer
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._mask = tok.mask_token_id
        # Public for tests and benchmarks that inspect tokenisation: marker token ids, skipped ids.
        self.query_marker_id = tok.convert_tokens_to_ids(self.s.query_marker) if self.s.query_marker else None
        self.doc_marker_id = tok.convert_tokens_to_ids(self.s.doc_marker) if self.s.doc_marker else None
        self.skip_ids = self._skiplist() if self.s.skip_punctuation else np.zeros(0, np.int64)
        #: seconds spent per stage ("tokenize", "forward", "post"), summed over calls; the
        #: embed job reports them so a run shows what is the model and what is not
        self.stage_seconds: dict[str, float] = {}

    def _add_time(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + now - since
        return now

    # ---- public -----------------------------------------------------------------------
    def encode_queries(self, texts: list[str], langs: "Sequence[str | None] | None" = None) -> np.ndarray:
        """Dense query vectors, (n, H) float32 unit rows.

        ``langs``: each query's language (X-MOD models; None entries are detected).
        """
        routing = self.route(self.query_languages(texts, langs), what="queries")
        ids = self.tokenize([self.s.query_prefix + t for t in texts], self.s.max_length)[0]
        out = np.zeros((len(texts), self.lm.hidden_size), np.float32)
        for batch, lang_id in self.batches(ids, routing):
            hidden, mask = self._forward([ids[i] for i in batch], lang_id=lang_id)
            out[batch] = self._pool(hidden, mask)
        return out

    def encode_queries_colbert(self, texts: list[str], langs: "Sequence[str | None] | None" = None) -> np.ndarray:
        """ColBERT query matrices, (n, query_maxlen, dim) float32; rows unit or zero.

        With query augmentation the padding is replaced by mask tokens, whose
        output vectors take part in scoring (ColBERT's query expansion).
        ``langs`` as in :meth:`encode_queries`.
        """
        routing = self.route(self.query_languages(texts, langs), what="queries")
        lq = self.s.query_maxlen
        ids = self.tokenize([self.s.query_prefix + t for t in texts], lq, self.query_marker_id)[0]
        out = np.zeros((len(texts), lq, self.lm.colbert_dim), np.float32)
        augment = self.s.query_augmentation and self._mask is not None
        for batch, lang_id in self.batches(ids, routing):
            seqs = [ids[i] for i in batch]
            if augment:
                hidden, mask = self._forward(seqs, pad_to=lq, pad_id=self._mask,
                                             attend_pad=self.s.attend_to_mask_tokens, lang_id=lang_id)
                mask = torch.ones_like(mask)  # every position, expansion tokens included, scores
            else:
                hidden, mask = self._forward(seqs, pad_to=lq, lang_id=lang_id)
            vecs = self._project(hidden) * mask.unsqueeze(-1)
            out[batch] = vecs.float().cpu().numpy()
        return out

    def encode_query_tokens(self, texts: list[str], langs: "Sequence[str | None] | None" = None, *,
                            dense: bool = True, colbert: bool = True) -> DocumentVectors:
        """Queries as passage augmentation (xQG): dense vectors and content token vectors.

        Encoded as queries are (query prefix, query marker, the query's adapter), so the
        vectors are those a search would compare: dense exactly :meth:`encode_queries`;
        ColBERT the real tokens of :meth:`encode_queries_colbert` (no ``[MASK]``
        expansion, which is a query-time device), without the special tokens and the
        marker (the passage has its own) and without punctuation (the document
        skiplist: these vectors are stored as document tokens). One forward pass feeds
        both when the query has no marker.

        Returns
        -------
        DocumentVectors: dense (n, H) float32 unit rows or None; tokens n arrays
        (t_i, dim) float32 unit rows (t_i may be 0) or None; n_tokens / truncated of
        the ColBERT input (query_maxlen).
        """
        if not (dense or colbert):
            raise ValueError("nothing to encode: dense and colbert are both off")
        langs = self.query_languages(texts, langs)
        routing = self.route(langs, what="queries")
        inputs = [self.s.query_prefix + t for t in texts]
        n = len(texts)
        out = DocumentVectors(None, None, np.zeros(n, np.int32), np.zeros(n, bool))
        if not colbert:
            out.dense = self.encode_queries(texts, langs)
            return out
        # Like encode_documents: with no query marker the dense input (cut at max_length)
        # starts with the ColBERT input (cut at query_maxlen), so one forward feeds both.
        shared = dense and self.query_marker_id is None and self.s.query_maxlen <= self.s.max_length
        limit = self.s.max_length if shared else self.s.query_maxlen
        ids, full = self.tokenize(inputs, limit, None if shared else self.query_marker_id)
        out.n_tokens[:] = full
        out.truncated[:] = full > self.s.query_maxlen
        out.tokens = [None] * n  # type: ignore[list-item]
        if dense:
            out.dense = np.zeros((n, self.lm.hidden_size), np.float32) if shared else self.encode_queries(texts, langs)
        drop = np.union1d(self.skip_ids, [t for t in [*self.lm.tokenizer.all_special_ids, self.query_marker_id]
                                       if t is not None]).astype(np.int64)
        for batch, lang_id in self.batches(ids, routing):
            hidden, mask = self._forward([ids[i] for i in batch], lang_id=lang_id)
            if shared:
                out.dense[batch] = self._pool(hidden, mask)
            width = min(hidden.shape[1], self.s.query_maxlen)
            keep = mask[:, :width].bool() & ~self._skip_mask(batch, ids, width, drop)
            vecs = self._project(hidden[:, :width]).float().cpu().numpy()
            keep_np = keep.cpu().numpy()
            for row, i in enumerate(batch):
                out.tokens[i] = np.ascontiguousarray(vecs[row][keep_np[row]])
        return out

    def encode_documents(self, texts: list[str], *, dense: bool = True, colbert: bool = False,
                         langs: "Sequence[str | None] | None" = None) -> DocumentVectors:
        """Encode passages for storage (prefix, markers, truncation, skiplist applied).

        ``langs``: each document's language; an X-MOD model encodes each with its
        language's adapter (the fallback adapter where it has none; see :meth:`route`).
        """
        if not (dense or colbert):
            raise ValueError("nothing to encode: dense and colbert are both off")
        routing = self.route(langs if langs is not None else [None] * len(texts), what="documents")
        inputs = [self.s.passage_prefix + t for t in texts]
        shared = dense and colbert and self.doc_marker_id is None and self.s.doc_maxlen <= self.s.max_length
        n = len(texts)
        out = DocumentVectors(None, None, np.zeros(n, np.int32), np.zeros(n, bool))
        if dense:
            ids, full = self.tokenize(inputs, self.s.max_length)
            out.n_tokens[:] = full
            out.truncated |= full > self.s.max_length
            out.dense = np.zeros((n, self.lm.hidden_size), np.float32)
            if shared:
                out.tokens = [None] * n  # type: ignore[list-item]
                out.truncated |= full > self.s.doc_maxlen
            self._run_documents(ids, out, routing, pool=True, colbert_limit=self.s.doc_maxlen if shared else 0)
        if colbert and not shared:
            ids, full = self.tokenize(inputs, self.s.doc_maxlen, self.doc_marker_id)
            out.n_tokens[:] = np.maximum(out.n_tokens, full)
            out.truncated |= full > self.s.doc_maxlen
            out.tokens = [None] * n  # type: ignore[list-item]
            self._run_documents(ids, out, routing, pool=False, colbert_limit=self.s.doc_maxlen)
        return out

    def forward_only(self, texts: list[str], max_length: int,
                     langs: "Sequence[str | None] | None" = None) -> int:
        """Tokenize and run the bare model forward (no pooling, no copies); returns tokens seen.

        The benchmark's reference point for pipeline overhead.
        """
        routing = self.route(langs if langs is not None else [None] * len(texts))
        ids, _ = self.tokenize(texts, max_length)
        seen: list[int] = []

        def step(batch: np.ndarray, lang_id: "int | None") -> tuple[float, float]:
            start = time.perf_counter()
            hidden, mask = self._forward([ids[i] for i in batch], lang_id=lang_id)
            if hidden.is_cuda:
                torch.cuda.synchronize()
            seen.append(int(mask.sum()))
            return time.perf_counter() - start, 0.0

        self._each_batch(ids, routing, step)
        return sum(seen)

    # ---- language adapters ------------------------------------------------------------
    def route(self, langs: "Sequence[str | None]", *, what: str = "texts") -> "Routing | None":
        """Which adapter encodes each text (X-MOD models); None for a model without adapters.

        Raises
        ------
        embedding.languages.LanguageError
            A language without an adapter and no ``adapter_fallback`` setting.
        """
        if self.lm.adapters is None:
            return None
        return route_languages(langs, self.lm.adapters, self.s.adapter_fallback, what=what)

    def query_languages(self, texts: list[str], langs: "Sequence[str | None] | None") -> list:
        """Each query's language: the given one, else the detector's guess (X-MOD models only)."""
        given = list(langs) if langs is not None else [None] * len(texts)
        if len(given) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(given)} languages")
        if self.lm.adapters is None or self.detector is None:
            return given
        return [lang if lang else self.detector(text) for text, lang in zip(texts, given)]

    def batches(self, ids: list[list[int]], routing: "Routing | None") -> Iterator[tuple[np.ndarray, "int | None"]]:
        """Length-bucketed batches, one adapter each: ``(positions, adapter index or None)``."""
        lengths = np.array([len(x) for x in ids])
        if routing is None:
            for batch in length_buckets(lengths, self.max_batch, self.max_tokens, self.batch_cost):
                yield batch, None
            return
        for lang_id, positions in routing.groups():
            for part in length_buckets(lengths[positions], self.max_batch, self.max_tokens, self.batch_cost):
                yield positions[part], lang_id

    # ---- internals --------------------------------------------------------------------
    def _run_documents(self, ids: list[list[int]], out: DocumentVectors, routing: "Routing | None", *,
                       pool: bool, colbert_limit: int) -> None:
        def step(batch: np.ndarray, lang_id: "int | None") -> tuple[float, float]:
            start = time.perf_counter()
            hidden, mask = self._forward([ids[i] for i in batch], lang_id=lang_id)
            if hidden.is_cuda:
                torch.cuda.synchronize()
            forwarded = time.perf_counter()
            self._post(batch, ids, hidden, mask, out, pool, colbert_limit)  # rows of its own batch only
            return forwarded - start, time.perf_counter() - forwarded

        self._each_batch(ids, routing, step)

    def stream_plan(self, n_batches: int) -> tuple[int, int]:
        """``(streams, torch threads per stream)`` for a pass over ``n_batches`` batches in
        this thread: several streams only on CPU, with two or more batches and torch threads."""
        threads = torch.get_num_threads()
        if self.lm.device.type != "cpu" or n_batches < 2:
            return 1, threads
        want = auto_streams() if self.streams == "auto" else self.streams
        streams = max(1, min(want, threads, n_batches))
        return streams, max(1, threads // streams)

    def _each_batch(self, ids: list[list[int]], routing: "Routing | None",
                    step: Callable[[np.ndarray, "int | None"], tuple[float, float]]) -> None:
        """Run ``step(positions, adapter)`` on every batch (:meth:`batches`, longest first)
        and add its ``(forward, post)`` seconds to :attr:`stage_seconds`. With several streams
        (:meth:`stream_plan`) the first (longest) batch still runs alone, in this thread on
        all of torch's threads, so that whatever a model builds on first use for a length
        (a cache of position tables) exists before two threads share it; the other batches
        then go to that many threads in order, each running on its share of torch's threads,
        and the stages get the pass's wall-clock seconds in proportion to the seconds their
        steps took, so the stages still add up to the wall clock. ``step`` must write only
        its own batch's rows. The first error stops the pass (batches not started are
        dropped) and is raised here."""
        batches = list(self.batches(ids, routing))
        streams, per_stream = self.stream_plan(len(batches))
        if streams > 1:
            self._add_seconds(*step(*batches[0]))
            batches = batches[1:]
            streams, per_stream = self.stream_plan(len(batches))  # fewer batches left: fewer, wider streams
        if streams == 1:
            for batch, lang_id in batches:
                self._add_seconds(*step(batch, lang_id))
            return
        threads = torch.get_num_threads()

        def run(item: tuple[np.ndarray, "int | None"]) -> tuple[float, float]:
            torch.set_num_threads(per_stream)  # this thread's OpenMP team (and ATen's default for new threads)
            return step(*item)

        start = time.perf_counter()
        executor = ThreadPoolExecutor(streams, thread_name_prefix="tessera-forward")
        try:
            spent = list(executor.map(run, batches))
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)  # ATen's default back to this thread's count
        wall = time.perf_counter() - start
        forward_s, post_s = sum(s[0] for s in spent), sum(s[1] for s in spent)
        share = forward_s / (forward_s + post_s) if forward_s + post_s > 0 else 1.0
        self._add_seconds(wall * share, wall * (1.0 - share))

    def _add_seconds(self, forward_s: float, post_s: float) -> None:
        for stage, seconds in (("forward", forward_s), ("post", post_s)):
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def _post(self, batch: np.ndarray, ids: list[list[int]], hidden: torch.Tensor, mask: torch.Tensor,
              out: DocumentVectors, pool: bool, colbert_limit: int) -> None:
        """Pooling and ColBERT projection of one batch's hidden states into ``out``."""
        if pool:
            out.dense[batch] = self._pool(hidden, mask)
        if colbert_limit:
            h = hidden[:, :colbert_limit]
            keep = mask[:, :colbert_limit].bool() & ~self._skip_mask(batch, ids, h.shape[1])
            vecs = self._project(h).float().cpu().numpy()
            keep_np = keep.cpu().numpy()
            for row, i in enumerate(batch):
                out.tokens[i] = np.ascontiguousarray(vecs[row][keep_np[row]])

    def _skip_mask(self, batch: np.ndarray, ids: list[list[int]], width: int,
                   skip: "np.ndarray | None" = None) -> torch.Tensor:
        """(b, width) bool: positions holding a token of ``skip`` (default the punctuation skiplist)."""
        skip = self.skip_ids if skip is None else skip
        mask = np.zeros((len(batch), width), bool)
        if len(skip):
            for row, i in enumerate(batch):
                seq = np.asarray(ids[i][:width])
                mask[row, :len(seq)] = np.isin(seq, skip)
        return torch.from_numpy(mask).to(self.lm.device)

    def tokenize(self, texts: list[str], limit: int, marker: "int | None" = None
                  ) -> tuple[list[list[int]], np.ndarray]:
        """Token ids truncated to ``limit`` (special tokens kept), and full lengths.

        Returns
        -------
        ids : list of n lists of int, each at most ``limit`` long.
        full : (n,) int32, length of the untruncated encoding (marker included).
        """
        start = time.perf_counter()
        enc = self.lm.tokenizer(texts, add_special_tokens=True, truncation=False,
                                return_special_tokens_mask=True, verbose=False)
        ids_out, full = [], np.zeros(len(texts), np.int32)
        for k, (ids, special) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
            kept, full[k] = truncate_ids(ids, special, limit, marker)
            ids_out.append(kept)
        self._add_time("tokenize", start)
        return ids_out, full

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]], *, pad_to: "int | None" = None, pad_id: "int | None" = None,
                 attend_pad: bool = False, lang_id: "int | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and mask of one batch; ``lang_id``: the X-MOD adapter of every row."""
        width = pad_to or max(len(s) for s in seqs)
        fill = self._pad if pad_id is None else pad_id
        input_ids = torch.full((len(seqs), width), fill, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        attn = torch.ones_like(mask) if attend_pad else mask
        dev = self.lm.device
        if lang_id is None:
            hidden = self.lm.model(input_ids=input_ids.to(dev), attention_mask=attn.to(dev)).last_hidden_state
        else:
            lang_ids = torch.full((len(seqs),), lang_id, dtype=torch.long, device=dev)
            hidden = self.lm.model(input_ids=input_ids.to(dev), attention_mask=attn.to(dev),
                                   lang_ids=lang_ids).last_hidden_state
        return hidden, mask.to(dev)

    @torch.inference_mode()
    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        if self.s.pooling == "cls":
            pooled = hidden[:, 0].float()
        else:
            # summed in float32: a bfloat16 sum over hundreds of tokens would round at each step
            hidden = hidden.float()
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    @torch.inference_mode()
    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        vecs = self.lm.projection(hidden) if self.lm.projection is not None else hidden
        return torch.nn.functional.normalize(vecs.float(), dim=-1)

    def _skiplist(self) -> np.ndarray:
        tok = self.lm.tokenizer
        unk = tok.unk_token_id
        found = set()
        for ch in PUNCTUATION:
            for form in (ch, "\u2581" + ch, "\u0120" + ch, "##" + ch):
                tid = tok.convert_tokens_to_ids(form)
                if isinstance(tid, int) and tid != unk:
                    found.add(tid)
        return np.array(sorted(found), np.int64)
