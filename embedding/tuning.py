"""Query-encoder-only tuning against frozen document vectors (no Ray here).

Only the query side is in the autograd graph. Documents are the vectors already
in the store — dense (MRL-truncated, re-normalised) or decompressed ColBERT
token matrices — held as fixed tensors, so the document space never moves and
the stored set stays valid for the tuned encoder ("adiabatic" tuning, Vasilyev
et al.: tiny learning rates keep what the model knew about other languages).

* :class:`QueryTower` builds the query inputs exactly like
  :class:`embedding.encoder.Encoder` (prefix, truncation that keeps the special
  tokens, ColBERT marker, mask-token query augmentation) and returns pooled,
  normalised vectors *with* gradients; in eval mode it equals
  ``Encoder.encode_queries`` / ``encode_queries_colbert``.
* :class:`DenseDocs` / :class:`TokenDocs` look document rows up as tensors.
* :func:`train_query_encoder` runs AdamW with linear warm-up and decay over
  InfoNCE: each (query, positive) example scores its positive against its mined
  hard negatives and the other examples' positives in the batch (in-batch
  negatives), divided by a temperature.
* :class:`TrainConfig` (one run's settings and their defaults) lives in
  :mod:`embedding.tuning_config`, which imports no torch; it is importable from here.
* :func:`save_query_encoder` writes a Hugging Face folder that ``transformers``
  loads as is: the base folder's files with the tuned tensors swapped in.

Scores: dense = cosine; ColBERT = MaxSim divided by the number of scored query
tokens (a mean over query tokens, in [-1, 1]), so one temperature suits both.
The default temperature 0.05 sits between e5's 0.01 and sentence-transformers'
0.05: with tiny learning rates a softer distribution spreads the gradient over
several hard negatives instead of the single hardest one.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedding.codec import ResidualCodec
from embedding.encoder import truncate_ids
from embedding.model import SETTINGS_FILE, EncoderSettings, LoadedModel, ModelError, weight_files
from embedding.tuning_config import TrainConfig

logger = logging.getLogger(__name__)

#: Examples (at most) on which the loss is measured before and after training, in eval mode.
LOSS_SAMPLE = 512


# ---- parameters -------------------------------------------------------------------------
def match_freeze(names: list[str], patterns: tuple[str, ...]) -> dict[str, list[str]]:
    """``{pattern: [matched parameter names]}``.

    Raises
    ------
    ValueError
        A pattern matches no parameter (likely a typo), or every parameter is frozen.
    """
    matched = {p: [n for n in names if fnmatch.fnmatchcase(n, p)] for p in patterns}
    empty = [p for p, found in matched.items() if not found]
    if empty:
        raise ValueError(f"freeze pattern(s) {empty} match no parameter (likely a typo); parameter names "
                         f"look like {names[:2] + names[-2:]}")
    frozen = {n for found in matched.values() for n in found}
    if names and len(frozen) == len(names):
        raise ValueError(f"freeze patterns {list(patterns)} match every parameter: nothing left to train")
    return matched


def parameter_names(model_dir: "str | Path") -> list[str]:
    """Parameter names of the folder's ``AutoModel``, without loading weights (meta device)."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model folder {model_dir} could not be read: {err}") from err
    return [n for n, _ in model.named_parameters()]


def trainable_parameters(model: torch.nn.Module, freeze: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Set ``requires_grad`` by the freeze patterns; return (trainable names, frozen names)."""
    names = [n for n, _ in model.named_parameters()]
    frozen = {n for found in match_freeze(names, freeze).values() for n in found}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return [n for n in names if n not in frozen], [n for n in names if n in frozen]


# ---- the query side, differentiable -----------------------------------------------------
@dataclass
class QueryBatch:
    """Model inputs for n queries.

    Attributes
    ----------
    input_ids : (n, W) int64.
    attention_mask : (n, W) int64, what the transformer attends to.
    score_mask : (n, W) float32, dense: the tokens mean pooling averages;
        ColBERT: the positions whose vectors score (augmentation tokens included).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    score_mask: torch.Tensor


class QueryTower:
    """Texts → query vectors with gradients, built like :class:`embedding.encoder.Encoder`.

    Parameters
    ----------
    lm : the loaded model (its ``model`` is trained in place).
    colbert : ColBERT token matrices instead of pooled dense vectors.
    dim : Matryoshka prefix (re-normalised); None keeps the full dimension.
    """

    def __init__(self, lm: LoadedModel, *, colbert: bool, dim: "int | None" = None) -> None:
        self.lm, self.s, self.colbert, self.dim = lm, lm.settings, colbert, dim
        tok = lm.tokenizer
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._mask = tok.mask_token_id
        self._marker = tok.convert_tokens_to_ids(self.s.query_marker) if colbert and self.s.query_marker else None

    def inputs(self, texts: list[str]) -> QueryBatch:
        """Tokenize and pad exactly as :meth:`embedding.encoder.Encoder.encode_queries` does."""
        limit = self.s.query_maxlen if self.colbert else self.s.max_length
        seqs = [_truncate(ids, special, limit, self._marker) for ids, special in
                _encode(self.lm.tokenizer, [self.s.query_prefix + t for t in texts])]
        augment = self.colbert and self.s.query_augmentation and self._mask is not None
        width = self.s.query_maxlen if self.colbert else max(len(x) for x in seqs)
        fill = self._mask if augment else self._pad
        ids = torch.full((len(seqs), width), fill, dtype=torch.long)
        real = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            real[row, :len(seq)] = 1
        attn = torch.ones_like(real) if augment and self.s.attend_to_mask_tokens else real
        score = torch.ones_like(real) if augment else real
        return QueryBatch(ids, attn, score.float())

    def forward(self, batch: QueryBatch) -> torch.Tensor:
        """Dense: (n, dim) unit rows; ColBERT: (n, Lq, dim) unit or zero rows. Differentiable."""
        dev = self.lm.device
        hidden = self.lm.model(input_ids=batch.input_ids.to(dev),
                               attention_mask=batch.attention_mask.to(dev)).last_hidden_state.float()
        mask = batch.score_mask.to(dev)
        if self.colbert:
            proj = self.lm.projection
            vecs = proj(hidden.to(proj.weight.dtype)).float() if proj is not None else hidden
            vecs = _prefix_normalize(vecs, self.dim)
            return vecs * mask.unsqueeze(-1)
        if self.s.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return _prefix_normalize(pooled, self.dim)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.forward(self.inputs(texts))


def _encode(tokenizer, texts: list[str]):
    enc = tokenizer(texts, add_special_tokens=True, truncation=False, return_special_tokens_mask=True,
                    verbose=False)
    return zip(enc["input_ids"], enc["special_tokens_mask"])


def _truncate(ids: list[int], special: list[int], limit: int, marker: "int | None") -> list[int]:
    """The same truncation as :class:`~embedding.encoder.Encoder` applies to queries."""
    return truncate_ids(ids, special, limit, marker)[0]


def _prefix_normalize(x: torch.Tensor, dim: "int | None") -> torch.Tensor:
    if dim is not None:
        x = x[..., :dim]
    return torch.nn.functional.normalize(x, dim=-1)


# ---- the document side, frozen ----------------------------------------------------------
class DenseDocs:
    """Fixed dense document vectors looked up by row.

    Parameters
    ----------
    vectors : (n, dim) float, unit rows (already truncated to the training dimension).
    """

    kind = "dense"

    def __init__(self, vectors: np.ndarray, device: "str | torch.device" = "cpu") -> None:
        self.vectors = torch.as_tensor(np.ascontiguousarray(vectors, np.float32), device=device)

    def __len__(self) -> int:
        return len(self.vectors)

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, None]:
        """(len(rows), dim) float32, no mask."""
        return self.vectors[torch.as_tensor(rows, device=self.vectors.device)], None


class TokenDocs:
    """ColBERT documents kept compressed, decompressed per batch.

    Parameters
    ----------
    codec : the set's residual codec.
    codes : (T,) centroid codes of the documents' tokens, document after document.
    residuals : (T, codec.residual_bytes) uint8.
    lengths : (n,) tokens per document (>= 1).
    dim : Matryoshka prefix (None: the codec's dimension).
    """

    kind = "colbert"

    def __init__(self, codec: ResidualCodec, codes: np.ndarray, residuals: np.ndarray, lengths: np.ndarray,
                 dim: "int | None" = None, device: "str | torch.device" = "cpu") -> None:
        self.codec, self.codes, self.residuals = codec, codes, residuals
        self.lengths = np.asarray(lengths, np.int64)
        if (self.lengths < 1).any():
            raise ValueError("every document needs at least one token vector")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.dim, self.device = dim, torch.device(device)

    def __len__(self) -> int:
        return len(self.lengths)

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(rows), L, dim) float32 unit token rows (zero padded) and (len(rows), L) bool mask."""
        lengths = self.lengths[rows]
        width = int(lengths.max())
        dim = self.dim or self.codec.dim
        out = np.zeros((len(rows), width, dim), np.float32)
        mask = np.zeros((len(rows), width), bool)
        for i, r in enumerate(rows):
            lo, hi = self.offsets[r], self.offsets[r + 1]
            out[i, :hi - lo] = self.codec.decompress(self.codes[lo:hi], self.residuals[lo:hi], dim=dim)
            mask[i, :hi - lo] = True
        return torch.from_numpy(out).to(self.device), torch.from_numpy(mask).to(self.device)


def score(queries: torch.Tensor, docs: torch.Tensor, doc_mask: "torch.Tensor | None",
          query_mask: "torch.Tensor | None" = None) -> torch.Tensor:
    """Query × document scores, (B, U).

    Dense: ``queries`` (B, dim) · ``docs`` (U, dim) = cosine. ColBERT: ``queries`` (B, Lq, dim),
    ``docs`` (U, L, dim) with ``doc_mask`` (U, L): MaxSim divided by the scored query tokens
    (``query_mask`` (B, Lq), default the non-zero rows).
    """
    if doc_mask is None:
        return queries @ docs.T
    sims = torch.einsum("bqd,utd->buqt", queries, docs)
    sims = sims.masked_fill(~doc_mask[None, :, None, :], float("-inf")).amax(-1)   # (B, U, Lq)
    if query_mask is None:
        query_mask = (queries.detach().abs().sum(-1) > 0).float()
    sims = sims * query_mask[:, None, :]
    return sims.sum(-1) / query_mask.sum(-1, keepdim=True).clamp(min=1)


# ---- training data and the loss --------------------------------------------------------
@dataclass(frozen=True)
class TrainingData:
    """Queries with their positive and hard-negative document rows (rows of the docs lookup).

    Attributes
    ----------
    texts : n query texts.
    positives : n int64 arrays, at least one row each.
    negatives : n int64 arrays (possibly empty), mined hard negatives, best first.
    """

    texts: list[str]
    positives: list[np.ndarray]
    negatives: list[np.ndarray]

    def __post_init__(self) -> None:
        if not (len(self.texts) == len(self.positives) == len(self.negatives)):
            raise ValueError("texts, positives and negatives must have one entry per query")
        if not self.texts:
            raise ValueError("no training queries")
        empty = [i for i, p in enumerate(self.positives) if len(p) == 0]
        if empty:
            raise ValueError(f"{len(empty)} training queries have no positive document (first: {empty[:5]})")

    def examples(self) -> np.ndarray:
        """(m, 2) int64: (query, positive row), one example per positive."""
        return np.array([(q, int(p)) for q, pos in enumerate(self.positives) for p in pos], np.int64)


def batch_candidates(data: TrainingData, batch: np.ndarray, n_negatives: int,
                     in_batch: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of each example of a batch, the positive first (a pure planner).

    Parameters
    ----------
    batch : (B, 2) (query, positive row) examples.
    n_negatives : hard negatives per example (fewer mined: padded).

    Returns
    -------
    unique : (U,) int64 document rows to look up.
    cand : (B, C) int64 positions into ``unique`` (C = 1 + n_negatives + (B - 1 if in_batch)).
    valid : (B, C) bool; False for padding, duplicates within a row, and other positives
        of the example's own query (never pushed away).
    """
    b = len(batch)
    width = 1 + n_negatives + (b - 1 if in_batch else 0)
    rows = np.full((b, width), -1, np.int64)
    for i, (q, pos) in enumerate(batch):
        negs = data.negatives[q][:n_negatives]
        rows[i, 0] = pos
        rows[i, 1:1 + len(negs)] = negs
        if in_batch:
            rows[i, 1 + n_negatives:] = np.delete(batch[:, 1], i)
    valid = rows >= 0
    for i, (q, _) in enumerate(batch):
        own = set(int(p) for p in data.positives[q])
        seen: set[int] = set()
        for j in range(width):
            r = int(rows[i, j])
            if r < 0:
                continue
            if r in seen or (j > 0 and r in own):
                valid[i, j] = False
            seen.add(r)
    unique, inverse = np.unique(np.where(valid, rows, rows[:, :1]), return_inverse=True)
    return unique, inverse.reshape(b, width), valid


def info_nce(q: torch.Tensor, docs, data: TrainingData, batch: np.ndarray, cfg: TrainConfig,
             n_negatives: int, query_mask: "torch.Tensor | None" = None) -> torch.Tensor:
    """Mean InfoNCE loss of a batch: -log softmax(score / T)[positive]."""
    unique, cand, valid = batch_candidates(data, batch, n_negatives, cfg.in_batch)
    dvecs, dmask = docs(unique)
    s = score(q, dvecs, dmask, query_mask)                                    # (B, U)
    cand_t = torch.as_tensor(cand, device=s.device)
    logits = s.gather(1, cand_t) / cfg.temperature
    logits = logits.masked_fill(~torch.as_tensor(valid, device=s.device), float("-inf"))
    target = torch.zeros(len(batch), dtype=torch.long, device=s.device)
    return torch.nn.functional.cross_entropy(logits, target)


# ---- training ---------------------------------------------------------------------------
def _schedule(total: int, warmup_ratio: float):
    warm = int(round(total * warmup_ratio))

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))
    return factor


def _batches(n: int, cfg: TrainConfig, gen: torch.Generator) -> list[np.ndarray]:
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    out: list[np.ndarray] = []
    while len(out) < total:
        order = torch.randperm(n, generator=gen).numpy()
        out.extend(order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size))
    return out[:total]


def _sample_examples(examples: np.ndarray, seed: int) -> np.ndarray:
    if len(examples) <= LOSS_SAMPLE:
        return examples
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), LOSS_SAMPLE, replace=False))
    return examples[idx]


@torch.no_grad()
def mean_loss(tower: QueryTower, docs, data: TrainingData, examples: np.ndarray, cfg: TrainConfig,
              n_negatives: int) -> float:
    """InfoNCE over ``examples`` in eval mode (no dropout), batch by batch; the mean."""
    was_training = tower.lm.model.training
    tower.lm.model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        batch = examples[i:i + cfg.batch_size]
        qb = tower.inputs([data.texts[q] for q in batch[:, 0]])
        loss = info_nce(tower.forward(qb), docs, data, batch, cfg, n_negatives,
                        qb.score_mask.to(tower.lm.device) if tower.colbert else None)
        total += float(loss) * len(batch)
        count += len(batch)
    tower.lm.model.train(was_training)
    return total / max(count, 1)


def train_query_encoder(lm: LoadedModel, data: TrainingData, docs, cfg: TrainConfig, *,
                        n_negatives: int = 7, dim: "int | None" = None) -> tuple[torch.nn.Module, dict]:
    """Tune ``lm.model`` in place on the query side only.

    Parameters
    ----------
    lm : a float32 model (adiabatic steps of ~1e-8 vanish in half precision).
    data : queries with positive and hard-negative rows of ``docs``.
    docs : :class:`DenseDocs` or :class:`TokenDocs` (ColBERT).
    n_negatives : hard negatives per example in the loss.
    dim : Matryoshka prefix of the query vectors (match the documents').

    Returns
    -------
    (model, stats): stats hold the steps, the loss before/after in eval mode on a fixed
    sample, per-step losses (first and last), gradient norms and the trainable/frozen names.
    """
    if next(lm.model.parameters()).dtype != torch.float32:
        raise ValueError("train in float32: adiabatic updates are below half-precision resolution")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tower = QueryTower(lm, colbert=docs.kind == "colbert", dim=dim)
    if lm.projection is not None:  # the ColBERT projection stays as stored
        lm.projection.requires_grad_(False)
    trainable, frozen = trainable_parameters(lm.model, cfg.freeze)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    examples = data.examples()
    probe = _sample_examples(examples, cfg.seed)
    start = time.perf_counter()
    loss_before = mean_loss(tower, docs, data, probe, cfg, n_negatives)
    batches = _batches(len(examples), cfg, gen)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(len(batches), cfg.warmup_ratio))
    lm.model.train()
    losses, norms = [], []
    t0 = time.perf_counter()
    for step, idx in enumerate(batches):
        batch = examples[idx]
        qb = tower.inputs([data.texts[q] for q in batch[:, 0]])
        loss = info_nce(tower.forward(qb), docs, data, batch, cfg, n_negatives,
                        qb.score_mask.to(lm.device) if tower.colbert else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        norms.append(float(norm))
        if step % 50 == 0 or step == len(batches) - 1:
            rate = (step + 1) / max(time.perf_counter() - t0, 1e-9)
            logger.info("step %d/%d: loss %.4f, grad norm %.3g, lr %.3g; %.2f steps/s, ETA %.0fs", step + 1,
                        len(batches), losses[-1], norms[-1], sched.get_last_lr()[0], rate,
                        (len(batches) - step - 1) / rate)
    lm.model.eval()
    for p in lm.model.parameters():
        p.requires_grad_(False)
    loss_after = mean_loss(tower, docs, data, probe, cfg, n_negatives)
    head = max(1, len(losses) // 10)
    stats = {
        "steps": len(batches), "examples": int(len(examples)), "queries": len(data.texts),
        "epochs": round(len(batches) * cfg.batch_size / max(1, len(examples)), 3),
        "loss_before": loss_before, "loss_after": loss_after, "loss_sample": int(len(probe)),
        "loss_first_steps": float(np.mean(losses[:head])), "loss_last_steps": float(np.mean(losses[-head:])),
        "grad_norm_mean": float(np.mean(norms)), "grad_norm_max": float(np.max(norms)),
        "trainable_tensors": len(trainable), "frozen": frozen,
        "trainable_parameters": int(sum(p.numel() for p in params)),
        "n_negatives": n_negatives, "seconds": round(time.perf_counter() - start, 3),
    }
    logger.info("trained %d steps: loss %.4f -> %.4f (eval mode, %d examples)", len(batches), loss_before,
                loss_after, len(probe))
    return lm.model, stats


def parameter_changes(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict:
    """How far the tuned parameters moved from ``base`` (a CPU copy of the state before).

    Returns
    -------
    ``{"tensors_changed", "tensors", "elements_changed", "elements", "max_abs_change",
    "changed": [names]}``. At learning rates ~1e-8 a weight near 1.0 (LayerNorm) may not
    move at all in float32: its update is below half an ulp.
    """
    changed, n_el, n_changed, max_abs = [], 0, 0, 0.0
    for name, p in model.named_parameters():
        diff = (p.detach().cpu() - base[name]).abs()
        n_el += diff.numel()
        moved = int((diff > 0).sum())
        n_changed += moved
        if moved:
            changed.append(name)
            max_abs = max(max_abs, float(diff.max()))
    return {"tensors_changed": len(changed), "tensors": len(base), "elements_changed": n_changed,
            "elements": n_el, "max_abs_change": max_abs, "changed": changed}


# ---- saving -----------------------------------------------------------------------------
def save_query_encoder(base_dir: "str | Path", model: torch.nn.Module, settings: EncoderSettings,
                       out_dir: "str | Path", *, required: "set[str] | None" = None) -> Path:
    """Write the tuned encoder as a Hugging Face folder ``transformers`` loads as is.

    Every file of ``base_dir`` is copied (tokenizer, config, ColBERT projection and
    metadata), then each weight file is rewritten with the same keys, the model's
    parameters swapped in (float32). A ``pytorch_model.bin`` becomes ``model.safetensors``
    (no pickle written). ``tessera_encoder.json`` records ``settings`` in full, so the
    folder's fingerprint is the one the manifest names.

    Parameters
    ----------
    required : parameters that must be written (those the tuning changed); default all.
        Others absent from the base files (e.g. a pooler transformers initialises at
        load time, unused by the query vectors) are left out, as in the base.

    Raises
    ------
    ModelError
        A required parameter is in no weight file, or the weights are sharded .bin files.
    """
    from safetensors.torch import load_file, save_file

    base, out = Path(base_dir), Path(out_dir)
    top = [p for p in weight_files(base) if p.parent == base]
    # safetensors win over a stale .bin copy (as in transformers); a lone .bin is converted
    weights = [p for p in top if p.suffix == ".safetensors"] or [p for p in top if p.suffix == ".bin"]
    if len(weights) > 1 and weights[0].suffix == ".bin":
        raise ModelError(f"{base}: sharded .bin weights; convert the folder to safetensors first")
    if not weights:
        raise ModelError(f"{base}: no top-level weight file (*.safetensors or *.bin)")
    skip = {p.name for p in top}
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=lambda d, names: [n for n in names if Path(d) == base and n in skip])
    state = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in model.named_parameters()}
    prefix = getattr(model, "base_model_prefix", "") + "."
    written: set[str] = set()
    for path in weights:
        tensors = load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
        for key in list(tensors):
            name = key if key in state or not key.startswith(prefix) else key[len(prefix):]
            if name in state:
                tensors[key] = state[name].clone()
                written.add(name)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        target = out / (path.name if path.suffix == ".safetensors" else "model.safetensors")
        save_file(tensors, str(target), metadata={"format": "pt"})
    missing = sorted((set(state) if required is None else set(required)) - written)
    if missing:
        raise ModelError(f"{base}: {len(missing)} parameter(s) of the model are in no weight file "
                         f"(first: {missing[:3]}); can't save the tuned encoder in the base layout")
    (out / SETTINGS_FILE).write_text(json.dumps(settings.to_dict(), indent=2, sort_keys=True))
    return out
