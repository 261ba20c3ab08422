"""Pure planners: which rows make a shard, which rows feed the codec fit.

No I/O here; both are checked by invariant tests (tests/jobs/test_plan.py).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, end)`` of input file ``file`` form shard ``shard``."""

    shard: int
    file: int
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict:
        return {"shard": self.shard, "file": self.file, "start": self.start, "end": self.end}


def build_pieces(rows_per_file: list[int], rows_per_shard: int) -> list[Piece]:
    """Cut every file into shards of at most ``rows_per_shard`` rows.

    Pieces never span files and start at multiples of ``rows_per_shard`` inside
    their file (so a JSONL reader can seek to a recorded offset). Shard numbers
    run 0..n-1 in file order, so the plan is the same on every run over the same input.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    pieces: list[Piece] = []
    for f, n in enumerate(rows_per_file):
        if n < 0:
            raise ValueError(f"file {f} has a negative row count {n}")
        for start in range(0, n, rows_per_shard):
            pieces.append(Piece(len(pieces), f, start, min(n, start + rows_per_shard)))
    return pieces


#: text bytes a shard of :func:`auto_rows_per_shard` holds: 1,024 rows of ~1 KB paragraphs,
#: the fixed default before (a both-mode shard of those keeps ~1 GB of float tokens in pass 1)
SHARD_TEXT_BYTES = 1 << 20
#: bounds of :func:`auto_rows_per_shard`: never fewer rows than the old fixed default (long
#: texts are cut at the model's token limit anyway), never so many that a 10k corpus is one
#: shard (actors in parallel, a resume loses at most one shard's work)
AUTO_ROWS_PER_SHARD = (1024, 4096)


def auto_rows_per_shard(text_bytes_per_row: "float | None") -> int:
    """Rows per shard for texts of ``text_bytes_per_row`` mean UTF-8 bytes: the largest power
    of two in :data:`AUTO_ROWS_PER_SHARD` whose rows hold at most :data:`SHARD_TEXT_BYTES`.

    Short texts get larger shards: a shard is sorted by length and cut into batches, and a
    larger pool pads less (12,000 Tatoeba sentences, ~34 bytes, encoded shard by shard in
    one process: 50.8 s in 4,096-row shards, 51.7 s in 1,024-row ones, the bare forward
    50.5 s; ``benchmarks/bench_embed.py --shard-sizes``); paragraphs (~1.1 KB in XQuAD)
    keep 1,024. None (nothing to measure) gives the lower bound.
    """
    lo, hi = AUTO_ROWS_PER_SHARD
    if text_bytes_per_row is None or not text_bytes_per_row > 0:
        return lo
    rows = lo
    while rows < hi and 2 * rows * text_bytes_per_row <= SHARD_TEXT_BYTES:
        rows *= 2
    return rows


def sample_size(n_docs: int) -> int:
    """Documents sampled to fit the codec: PLAID's ``1 + 16·sqrt(120·n)``, at most ``n``."""
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    return min(n_docs, 1 + int(16 * math.sqrt(120 * n_docs))) if n_docs else 0


def id_keys(ids: list[str], seed: int) -> np.ndarray:
    """A pseudo-random ``uint64`` per document id, salted with ``seed`` (see :func:`plan_sample`)."""
    salt = int(seed).to_bytes(8, "little", signed=True)
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8, salt=salt).digest(),
                                       "little") for i in ids), dtype=np.uint64, count=len(ids))


def plan_sample(pieces: list[Piece], n_sample: int, seed: int,
                keys: "list[np.ndarray] | None" = None) -> dict[int, list[int]]:
    """Choose ``n_sample`` rows uniformly without replacement, grouped by shard.

    With ``keys`` (one array per input file, one key per row, e.g. :func:`id_keys`)
    the rows with the smallest keys are chosen: a document is in the sample or not
    whatever else the corpus holds, so a snapshot with a few documents changed gets
    nearly the same sample, hence nearly the same codec. Without, a seeded draw by
    position.

    Returns
    -------
    {shard: sorted row offsets within the piece}; only shards with a sampled row appear.
    """
    total = sum(p.rows for p in pieces)
    if not 0 <= n_sample <= total:
        raise ValueError(f"cannot sample {n_sample} rows from {total}")
    if keys is None:
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=n_sample, replace=False))
    else:
        flat = np.concatenate([np.asarray(keys[p.file][p.start:p.end], np.uint64) for p in pieces]) \
            if pieces else np.zeros(0, np.uint64)
        if len(flat) != total:
            raise ValueError(f"keys cover {len(flat)} rows, the pieces {total}")
        chosen = np.sort(np.argsort(flat, kind="stable")[:n_sample])
    bounds = np.cumsum([0] + [p.rows for p in pieces])
    which = np.searchsorted(bounds, chosen, side="right") - 1
    plan: dict[int, list[int]] = {}
    for idx, g in zip(which, chosen):
        piece = pieces[int(idx)]
        plan.setdefault(piece.shard, []).append(int(g - bounds[idx]))
    return plan


@dataclass(frozen=True)
class DeltaPiece:
    """Rows ``start + r`` for ``r`` in ``rows`` of input file ``file`` form shard ``shard``."""

    shard: int
    file: int
    start: int
    end: int
    rows: tuple[int, ...]

    def to_dict(self) -> dict:
        import json

        return {"shard": self.shard, "file": self.file, "start": self.start, "end": self.end,
                "rows": json.dumps(list(self.rows))}


def plan_delta(rows_per_file: dict[int, list[int]], rows_per_shard: int, stride: int,
               first_shard: int) -> list[DeltaPiece]:
    """Group the changed rows of each file into shards of at most ``rows_per_shard`` rows.

    A re-index encodes only new and changed documents; they are scattered through
    the snapshot, so a shard reads the range from its first to its last row and
    keeps the listed ones. Ranges start at a multiple of ``stride`` (the scan's
    seek granularity for JSONL). Shards are numbered from ``first_shard`` in file
    and row order, so the same diff always gives the same plan (a rerun resumes).

    Parameters
    ----------
    rows_per_file : {file index: row offsets in the file}, any order, no duplicates.
    """
    if rows_per_shard < 1 or stride < 1:
        raise ValueError(f"rows_per_shard and stride must be >= 1, got {rows_per_shard}, {stride}")
    pieces: list[DeltaPiece] = []
    for f in sorted(rows_per_file):
        rows = sorted(rows_per_file[f])
        if len(set(rows)) != len(rows) or (rows and rows[0] < 0):
            raise ValueError(f"file {f}: row offsets must be unique and >= 0")
        for lo in range(0, len(rows), rows_per_shard):
            group = rows[lo:lo + rows_per_shard]
            start = group[0] // stride * stride
            pieces.append(DeltaPiece(first_shard + len(pieces), f, start, group[-1] + 1,
                                     tuple(r - start for r in group)))
    return pieces


#: tokens per run of a shard's compression shared by pass 2's threads (``jobs.embed_worker``)
COMPRESS_GROUP_TOKENS = 32768


def token_groups(lengths: "list[int]", target: int) -> "list[int]":
    """Document bounds ``[0, ..., len(lengths)]`` cutting a shard's documents (``lengths``:
    their token counts) into runs of at least ``target`` tokens but the last, each document
    whole in one run."""
    bounds, run = [0], 0
    for i, n in enumerate(lengths):
        run += n
        if run >= target and i + 1 < len(lengths):
            bounds.append(i + 1)
            run = 0
    bounds.append(len(lengths))
    return bounds
