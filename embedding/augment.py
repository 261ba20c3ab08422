"""xQG passage augmentation: a passage's vectors joined with those of queries about it.

The queries (generated, or given by the user) are in other languages than the
passage; adding them to the passage's representation lets a query in one of
those languages find it (Zhuang et al., SIGIR 2023, "Augmenting Passage
Representations with Query Generation for Enhanced Cross-Lingual Dense Retrieval").

* dense (:func:`augment_dense`): ``normalise(w * p + (1 - w) * mean(q_1..q_k))`` with
  ``w`` the passage's weight; a passage without queries keeps its vector. The result
  is a full-dimension unit vector, so MRL truncation works on it as on any stored
  vector (:func:`embedding.mrl.truncate`); ``dim`` mixes prefixes instead.
* ColBERT (:func:`augment_tokens`): the queries' token vectors appended after the
  passage's own, at most ``cap`` of them per passage, taken in the order given
  (:func:`interleave` orders queries so that a cap keeps every language).

Queries are given flat: ``owner[j]`` is the passage (row) of query ``j``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from embedding.mrl import truncate


def _check_owner(owner: np.ndarray, n_queries: int, n_passages: int) -> np.ndarray:
    owner = np.asarray(owner)
    if owner.ndim != 1 or len(owner) != n_queries:
        raise ValueError(f"owner must be ({n_queries},), one passage per query, got shape {owner.shape}")
    if owner.size and (not np.issubdtype(owner.dtype, np.integer) or owner.min() < 0 or owner.max() >= n_passages):
        raise ValueError(f"owner must hold passage rows in 0..{n_passages - 1}")
    return owner.astype(np.int64, copy=False)


def check_weight(weight: float) -> float:
    """The passage weight, checked to lie in [0, 1]."""
    if not isinstance(weight, (int, float, np.floating)) or not 0.0 <= float(weight) <= 1.0:
        raise ValueError(f"passage weight must be in [0, 1], got {weight!r}")
    return float(weight)


def query_means(queries: np.ndarray, owner: np.ndarray, n_passages: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean query vector of each passage and its query count.

    Returns
    -------
    means : (n_passages, D) float32, zero rows where a passage has no query.
    counts : (n_passages,) int64.
    """
    q = np.asarray(queries, np.float32)
    owner = _check_owner(owner, len(q), n_passages)
    sums = np.zeros((n_passages, q.shape[1]), np.float64)
    np.add.at(sums, owner, q)
    counts = np.bincount(owner, minlength=n_passages)
    means = np.zeros_like(sums, dtype=np.float32)
    has = counts > 0
    means[has] = (sums[has] / counts[has, None]).astype(np.float32)
    return means, counts


def augment_dense(passages: np.ndarray, queries: np.ndarray, owner: np.ndarray, weight: float,
                  dim: "int | None" = None) -> np.ndarray:
    """Weighted mean of each passage vector and its queries' mean vector, re-normalised.

    Parameters
    ----------
    passages : (n, D) float16/float32 passage vectors (unit rows, as stored).
    queries : (m, D) float query vectors (unit rows).
    owner : (m,) int, the passage row of each query.
    weight : the passage's weight ``w`` in [0, 1] (1 leaves passages unchanged).
    dim : mix the first ``dim`` dimensions (each input truncated and re-normalised first,
        as MRL does); None mixes full vectors (truncate the result later as usual).

    Returns
    -------
    (n, dim or D) float32 unit rows; passages without queries are their own (re-normalised) vector.
    """
    w = check_weight(weight)
    p = truncate(passages, dim)
    q = truncate(queries, dim) if len(queries) else np.zeros((0, p.shape[1]), np.float32)
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]}, passages {p.shape[1]}")
    means, counts = query_means(q, owner, len(p))
    mixed = p.copy()
    has = counts > 0
    mixed[has] = w * p[has] + (1.0 - w) * means[has]
    return truncate(mixed)


def augment_tokens(passage_tokens: Sequence[np.ndarray], query_tokens: Sequence[np.ndarray],
                   owner: np.ndarray, cap: "int | None") -> list[np.ndarray]:
    """Each passage's token vectors followed by its queries' token vectors, at most ``cap`` added.

    Parameters
    ----------
    passage_tokens : n arrays (t_i, dim) float.
    query_tokens : m arrays (u_j, dim) float, in the order they are to be added.
    owner : (m,) int, the passage row of each query.
    cap : most query tokens added to one passage (the last query that fits only in part
        is cut); None adds all.

    Returns
    -------
    n arrays (t_i + min(cap, sum u_j), dim) float32; passage tokens first, unchanged.
    """
    if cap is not None and (not isinstance(cap, (int, np.integer)) or cap < 0):
        raise ValueError(f"cap must be an integer >= 0 or None, got {cap!r}")
    owner = _check_owner(owner, len(query_tokens), len(passage_tokens))
    added: list[list[np.ndarray]] = [[] for _ in passage_tokens]
    room = [cap if cap is not None else -1 for _ in passage_tokens]
    for j, i in enumerate(owner.tolist()):
        toks = np.asarray(query_tokens[j], np.float32)
        if room[i] >= 0:
            toks = toks[:room[i]]
            room[i] -= len(toks)
        if len(toks):
            added[i].append(toks)
    out = []
    for i, own in enumerate(passage_tokens):
        own = np.asarray(own, np.float32)
        if added[i] and own.shape[1:] != added[i][0].shape[1:]:
            raise ValueError(f"passage {i}: query tokens have dimension {added[i][0].shape[1:]}, "
                             f"passage tokens {own.shape[1:]}")
        out.append(np.ascontiguousarray(np.concatenate([own, *added[i]])) if added[i] else own)
    return out


def select_queries(owner: np.ndarray, langs: Sequence[str], per_lang: "int | None") -> np.ndarray:
    """Positions of the first ``per_lang`` queries of each (passage, language), in input order.

    None keeps all. This is how fewer queries per passage are taken from a larger set.
    """
    if per_lang is not None and per_lang < 1:
        raise ValueError(f"per_lang must be >= 1 or None, got {per_lang!r}")
    owner = np.asarray(owner)
    if per_lang is None:
        return np.arange(len(owner))
    seen: dict = {}
    keep = []
    for j, key in enumerate(zip(owner.tolist(), langs)):
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= per_lang:
            keep.append(j)
    return np.array(keep, np.int64)


def interleave(owner: np.ndarray, langs: Sequence[str]) -> np.ndarray:
    """An order of the queries taking each passage's languages in turn (first query of
    every language, then the second, ...), so a token cap drops whole ranks, not languages.

    Returns
    -------
    (m,) int64 permutation of the query positions.
    """
    owner = np.asarray(owner)
    rank = np.zeros(len(owner), np.int64)
    seen: dict = {}
    for j, key in enumerate(zip(owner.tolist(), langs)):
        rank[j] = seen.get(key, 0)
        seen[key] = rank[j] + 1
    return np.lexsort((np.arange(len(owner)), rank, owner)).astype(np.int64)
