"""Loading an encoder from a local Hugging Face folder, and its fingerprint.

Any folder that ``transformers.AutoModel`` loads works. Tessera reads a few
optional files to learn a checkpoint's conventions:

* ``tessera_encoder.json``: our own settings (pooling, prefixes, lengths);
* ``config_sentence_transformers.json`` / ``1_Pooling/config.json``: prefixes
  and pooling of sentence-transformers (and PyLate) folders;
* ``artifact.metadata``: a Stanford ColBERT checkpoint's markers and lengths;
* a ColBERT projection: ``linear.weight`` inside the weights (Stanford ColBERT) or
  a PyLate ``Dense`` module listed in ``modules.json``;
* ``config.json`` with ``"model_type": "xmod"``: an X-MOD encoder (ColBERT-XM) with one
  adapter per language (``config.languages``); :func:`adapter_languages` reads them
  without torch, and the encoder routes each text to its language's adapter
  (:mod:`embedding.languages`), unknown languages to ``adapter_fallback``.

The fingerprint is a sha256 over the weights, the tokenizer files and the
encoder settings: two encoders with the same fingerprint produce the same vectors.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a model is loaded: checking a folder needs no torch
    import torch

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json",
                   "merges.txt", "vocab.json")
SETTINGS_FILE = "tessera_encoder.json"
CACHE_DIR_ENV = "TESSERA_CACHE_DIR"
TOKENIZER_CACHE_ENV = "TESSERA_TOKENIZER_CACHE"
#: bumped when the snapshot's content changes meaning
TOKENIZER_SNAPSHOT_FORMAT = 1
#: texts a tokenizer snapshot must tokenize like the tokenizer it was taken from
TOKENIZER_PROBES = (
    "query: how many people live in Berlin?", "passage: The 2015 season ended early.",
    "Привет, мир! Как дела?", "東京は日本の首都です。", "مرحبا بالعالم", "नमस्ते दुनिया",
    "Γειά σου Κόσμε", "สวัสดีชาวโลก", "Xin chào thế giới", "İstanbul'da hava güzel.",
    "  leading and trailing   spaces \t tabs\nnewlines  ", "",
    "ünïcödé ß ﬁ ½ ™ 🙂 e\u0301", "<s> </s> <unk> <pad> <mask> [CLS] [SEP] [MASK] [Q] [D]",
)


#: settings that :meth:`EncoderSettings.to_dict` omits while None (see there)
OPTIONAL_SETTINGS = ("adapter_fallback",)
#: Dense pooling of the last hidden state.
POOLINGS = ("mean", "cls")
#: What an embed job stores: single vectors, ColBERT token vectors, or both.
MODES = ("dense", "colbert", "both")
#: ``config.json`` ``model_type`` of X-MOD encoders (per-language adapters)
XMOD_MODEL_TYPE = "xmod"


class ModelError(ValueError):
    """A model folder that can't be used; the message names the folder and what is wrong."""


@dataclass(frozen=True)
class EncoderSettings:
    """How texts become vectors. Part of the fingerprint.

    Attributes
    ----------
    pooling : "mean" or "cls" pooling of the last hidden state for dense vectors.
    query_prefix, passage_prefix : prepended to queries / documents (e5 style).
    max_length : token limit of the dense encoder.
    doc_maxlen, query_maxlen : ColBERT token limits.
    query_augmentation : pad ColBERT queries to ``query_maxlen`` with mask tokens.
    attend_to_mask_tokens : let the augmentation tokens be attended to.
    skip_punctuation : drop punctuation tokens from ColBERT documents.
    query_marker, doc_marker : tokens inserted after the first special token, or None.
    adapter_fallback : X-MOD models only: the adapter (name or language code) of texts whose
        language has none; None makes such a text an error.
    """

    pooling: str = "mean"
    query_prefix: str = ""
    passage_prefix: str = ""
    max_length: int = 512
    doc_maxlen: int = 300
    query_maxlen: int = 32
    query_augmentation: bool = True
    attend_to_mask_tokens: bool = False
    skip_punctuation: bool = True
    query_marker: "str | None" = None
    doc_marker: "str | None" = None
    adapter_fallback: "str | None" = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        for name in ("max_length", "doc_maxlen", "query_maxlen"):
            if getattr(self, name) < 4:
                raise ValueError(f"{name} must be >= 4, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        # Left out when unset: the dict is hashed into the fingerprint, and every set
        # embedded before the setting existed must keep its fingerprint.
        for name in OPTIONAL_SETTINGS:
            if out[name] is None:
                del out[name]
        return out

    def replace(self, **changes) -> "EncoderSettings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class LoadedModel:
    """A model ready to encode: transformer, tokenizer, optional ColBERT projection."""

    path: Path
    model: torch.nn.Module
    tokenizer: object
    projection: "torch.nn.Linear | None"
    settings: EncoderSettings
    fingerprint: str
    device: torch.device
    #: X-MOD adapter names in ``lang_ids`` order; None for a model without adapters
    adapters: "tuple[str, ...] | None" = None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def precision(self) -> str:
        """The type the model runs in: "float32", "bfloat16" or "float16"."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def colbert_dim(self) -> int:
        return int(self.projection.out_features) if self.projection is not None else self.hidden_size


#: encoder precisions a job or a searcher takes (``--precision``); "auto" is :func:`resolve_precision`'s choice
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def check_precision(precision: str) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`, else ``ValueError`` listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device_type: str) -> str:
    """The torch dtype name an encoder runs in on ``device_type`` ("cpu", "cuda", ...).

    "auto": on CUDA bfloat16 (float16 where the GPU lacks it); on a CPU that multiplies
    bfloat16 natively (AVX-512 BF16 or AMX, :func:`embedding.codec.native_bf16`)
    bfloat16, else float32. On such a CPU (2 AMD EPYC cores) me5-small encoded 768 XQuAD
    sentences in 8.2-8.6 s instead of 14.7-15.5 s in float32 and one query in 12 ms
    instead of 20, its token vectors at cosine 0.99995 (min 0.99984) with float32's; where
    bfloat16 is emulated it is slower than float32, so "auto" keeps float32 there.
    float16 needs CUDA.
    """
    if check_precision(precision) == "auto":
        if device_type == "cuda":
            import torch
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if device_type == "cpu":
            from embedding.codec import native_bf16
            return "bfloat16" if native_bf16() else "float32"
        return "float32"
    if precision == "float16" and device_type != "cuda":
        raise ValueError(f"precision float16 runs on CUDA only, not on {device_type}: use bfloat16 or float32")
    return precision


# ---- settings -----------------------------------------------------------------------
def read_settings(model_dir: "str | Path") -> EncoderSettings:
    """Settings a folder declares about itself (see the module docstring)."""
    d = Path(model_dir)
    found: dict = {}
    st = _read_json(d / "config_sentence_transformers.json")
    if st:
        prompts = st.get("prompts") or {}
        found["query_prefix"] = st.get("query_prefix", prompts.get("query", ""))
        found["passage_prefix"] = st.get("document_prefix", prompts.get("passage", prompts.get("document", "")))
        for ours, theirs in (("query_maxlen", "query_length"), ("doc_maxlen", "document_length")):
            if st.get(theirs):
                found[ours] = int(st[theirs])
    pool = _read_json(d / "1_Pooling" / "config.json")
    if pool.get("pooling_mode_cls_token"):
        found["pooling"] = "cls"
    meta = _read_json(d / "artifact.metadata")
    if meta:
        found["query_marker"] = meta.get("query_token_id", "[unused0]")
        found["doc_marker"] = meta.get("doc_token_id", "[unused1]")
        for key in ("query_maxlen", "doc_maxlen"):
            if meta.get(key):
                found[key] = int(meta[key])
        if "attend_to_mask_tokens" in meta:
            found["attend_to_mask_tokens"] = bool(meta["attend_to_mask_tokens"])
    found.update(_read_json(d / SETTINGS_FILE))
    known = {f.name for f in dataclasses.fields(EncoderSettings)}
    unknown = set(found) - known
    if unknown:
        raise ModelError(f"{d / SETTINGS_FILE}: unknown setting(s) {sorted(unknown)}")
    return EncoderSettings(**found)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: invalid JSON: {err}") from err


def adapter_languages(model_dir: "str | Path") -> "tuple[str, ...] | None":
    """The language adapters of an X-MOD folder, in ``lang_ids`` order; None for other models.

    Read from ``config.json`` alone (no torch), so a job can check languages and the
    fallback before it starts workers. The order is the config's: X-MOD builds its
    adapter ``ModuleDict`` from ``config.languages`` and indexes it by position.
    """
    config = _read_json(Path(model_dir) / "config.json")
    if config.get("model_type") != XMOD_MODEL_TYPE:
        return None
    languages = config.get("languages") or ["en_XX"]  # XmodConfig's default
    if not isinstance(languages, list) or not all(isinstance(x, str) and x for x in languages):
        raise ModelError(f"{Path(model_dir) / 'config.json'}: 'languages' must be a list of adapter names, "
                         f"got {languages!r}")
    return tuple(languages)


def check_adapter_settings(model_dir: "str | Path", settings: EncoderSettings) -> "tuple[str, ...] | None":
    """The folder's adapters, after checking ``settings.adapter_fallback`` against them.

    Raises
    ------
    ModelError
        A fallback for a model without adapters, or one that names no adapter.
    """
    from embedding.languages import LanguageError, check_fallback

    adapters = adapter_languages(model_dir)
    if settings.adapter_fallback is None:
        return adapters
    if adapters is None:
        raise ModelError(f"model folder {model_dir}: adapter_fallback={settings.adapter_fallback!r} given, "
                         "but the model has no language adapters (not an X-MOD model)")
    try:
        check_fallback(settings.adapter_fallback, adapters)
    except LanguageError as err:
        raise ModelError(f"model folder {model_dir}: {err}") from err
    return adapters


# ---- fingerprint --------------------------------------------------------------------
def weight_files(model_dir: "str | Path") -> list[Path]:
    """Weight files of the folder (and of a PyLate Dense module), sorted."""
    d = Path(model_dir)
    files = [p for p in d.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
             and "optimizer" not in p.name and "training_args" not in p.name]
    return sorted(files)


def fingerprint(model_dir: "str | Path", settings: EncoderSettings) -> str:
    """sha256 over weights, tokenizer files, config and encoder settings.

    Returns
    -------
    str, 64 hex digits.
    """
    d = Path(model_dir)
    files = sorted(set(weight_files(d) + [d / n for n in TOKENIZER_FILES + ("config.json",) if (d / n).is_file()]))
    # The files' part is memoised on (path, size, mtime): a job, a searcher that tries
    # several settings and an in-process encoder would otherwise re-read the weights
    # (470 MB for me5-small) once each. Any rewrite of a file changes its key.
    stats = tuple((str(p.relative_to(d)), st.st_size, st.st_mtime_ns) for p in files for st in (p.stat(),))
    digest = _files_digest(str(d.resolve()), stats).copy()
    digest.update(json.dumps(settings.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _files_digest(model_dir: str, stats: tuple) -> "hashlib._Hash":
    """sha256 state after every file of ``stats`` (never mutated: callers ``copy()`` it)."""
    d = Path(model_dir)
    digest = hashlib.sha256()
    for rel, _, _ in stats:
        digest.update(rel.encode() + b"\0")
        with open(d / rel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest


# ---- loading ------------------------------------------------------------------------
def check_model_dir(model_dir: "str | Path") -> Path:
    """Raise ModelError unless the folder has a config, weights and a tokenizer."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError(f"model folder {d} does not exist")
    if not (d / "config.json").is_file():
        raise ModelError(f"model folder {d} has no config.json: not a Hugging Face model folder")
    if not weight_files(d):
        raise ModelError(f"model folder {d} has no weights (*.safetensors or *.bin)")
    if not any((d / n).is_file() for n in TOKENIZER_FILES):
        raise ModelError(f"model folder {d} has no tokenizer files")
    return d


def load_model(model_dir: "str | Path", settings: "EncoderSettings | None" = None, *,
               device: "str | None" = None, precision: str = "auto") -> LoadedModel:
    """Load an encoder folder offline.

    Parameters
    ----------
    settings : overrides the folder's own settings when given.
    device : "cpu", "cuda", ... ; default cuda when available.
    precision : the weights' and activations' type, one of :data:`PRECISIONS`
        (:func:`resolve_precision`; training passes "float32").
    """
    import torch
    from transformers import AutoModel

    d = check_model_dir(model_dir)
    settings = settings or read_settings(d)
    adapters = check_adapter_settings(d, settings)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tokenizer = load_tokenizer(d)
        model = AutoModel.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model folder {d} could not be loaded: {err}") from err
    _check_markers(d, tokenizer, settings)
    projection = load_projection(d, int(model.config.hidden_size))
    model.eval()
    dtype = getattr(torch, resolve_precision(precision, dev.type))
    model.to(dev, dtype=dtype)
    if projection is not None:
        projection.to(dev, dtype=dtype)
    fp = fingerprint(d, settings)
    logger.info("loaded %s on %s (%s), fingerprint %s", d, dev, dtype, fp[:12])
    if adapters is not None:
        _check_adapters(d, model, adapters)
    return LoadedModel(d, model, tokenizer, projection, settings, fp, dev, adapters)


def _check_adapters(d: Path, model, adapters: tuple[str, ...]) -> None:
    """The loaded model's adapters are the config's, in the same order (``lang_ids``)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    found = tuple(layers[0].output.adapter_modules.keys()) if layers else None
    if found != adapters:
        raise ModelError(f"model folder {d}: X-MOD config lists adapters {list(adapters)}, "
                         f"the loaded model has {list(found) if found is not None else 'none'}")


def cache_root() -> Path:
    """Tessera's local cache folder: ``$TESSERA_CACHE_DIR``, default ``~/.cache/tessera``."""
    base = os.environ.get(CACHE_DIR_ENV)
    return Path(base).expanduser() if base else Path.home() / ".cache" / "tessera"


def tokenizer_cache_dir() -> "Path | None":
    """Where :func:`load_tokenizer` keeps its snapshots: ``cache_root() / "tokenizers"``;
    None when ``$TESSERA_TOKENIZER_CACHE`` is ``off``."""
    if os.environ.get(TOKENIZER_CACHE_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return None
    return cache_root() / "tokenizers"


def _tokenizer_key(d: Path) -> str:
    """sha256 over the tokenizer files' bytes, the folder and the library versions."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(f"{d.resolve()}\0{transformers.__version__}\0{tokenizers.__version__}\0"
                            f"{sys.version}\0{TOKENIZER_SNAPSHOT_FORMAT}".encode())
    for name in TOKENIZER_FILES:
        path = d / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _same_tokenization(a, b) -> bool:
    return a(list(TOKENIZER_PROBES))["input_ids"] == b(list(TOKENIZER_PROBES))["input_ids"] \
        and a.all_special_ids == b.all_special_ids and len(a) == len(b)


def load_tokenizer(model_dir: "str | Path"):
    """The folder's tokenizer (``AutoTokenizer``), through a local snapshot cache.

    ``AutoTokenizer.from_pretrained`` re-parses ``tokenizer.json`` in Python and
    rebuilds the vocabulary on every call: 4.6 s for XLM-R's 17 MB file, paid by
    every process that starts an encoder (each actor, each re-index driver, each
    ``tessera search``). The first load pickles the loaded tokenizer to
    :func:`tokenizer_cache_dir`; later loads unpickle it (1.2 s for XLM-R). The
    snapshot is the loaded object itself, so it tokenizes identically; it is
    written only after a round trip gave the same ids on probe texts in several
    scripts, and keyed on the tokenizer files' bytes and the library versions, so
    an edited file or an upgrade loads afresh. A snapshot that fails to load is
    replaced. The cache holds pickles: like the model folder, it must be writable
    only by you. ``TESSERA_TOKENIZER_CACHE=off`` turns it off.
    """
    from transformers import AutoTokenizer

    d = Path(model_dir)
    cache = tokenizer_cache_dir()
    path = cache / f"{_tokenizer_key(d)}.pkl" if cache is not None else None
    if path is not None and path.is_file():
        try:
            tokenizer = pickle.loads(path.read_bytes())
            tokenizer.name_or_path = str(d)
            return tokenizer
        except Exception as err:  # noqa: BLE001 - any unreadable snapshot is rebuilt
            logger.warning("tokenizer snapshot %s unreadable (%s: %s); loading %s afresh",
                           path, type(err).__name__, err, d)
    tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if path is not None:
        _save_snapshot(tokenizer, path, d)
    return tokenizer


def _save_snapshot(tokenizer, path: Path, d: Path) -> None:
    try:
        data = pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL)
        if not _same_tokenization(tokenizer, pickle.loads(data)):
            logger.warning("tokenizer of %s does not survive a pickle round trip: not cached", d)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # concurrent writers (actors starting together) write the same bytes
    except Exception as err:  # noqa: BLE001 - a cache that can't be written only costs time
        logger.warning("tokenizer snapshot for %s not written to %s: %s: %s", d, path, type(err).__name__, err)


def _check_markers(d: Path, tokenizer, settings: EncoderSettings) -> None:
    for marker in (settings.query_marker, settings.doc_marker):
        if marker is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(marker)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ModelError(f"model folder {d}: marker token {marker!r} is not in the vocabulary")


def load_projection(d: Path, hidden: int) -> "torch.nn.Linear | None":
    """The folder's ColBERT projection (:func:`projection_sources`' first ``linear.weight``)
    as a bias-free ``torch.nn.Linear``, or None for a folder without one.

    Raises
    ------
    ModelError
        The weight is not ``(dim, hidden)``.
    """
    import torch

    weight = _first_projection(d, _read_weight)
    if weight is None:
        return None
    _check_projection_shape(d, tuple(weight.shape), hidden)
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
    layer.eval()
    return layer


def projection_shape(d: Path, hidden: int) -> "tuple[int, int] | None":
    """``(dim, hidden)`` of the folder's ColBERT projection, the one :func:`load_projection`
    would load, or None for a folder without one; the same errors. A safetensors file's
    header is read without torch or the weights: a driver that only needs the model's
    dimensions (``jobs.embed.describe_model``) does not pay torch's import (~1.2 s and
    ~180 MB of a job's driver); a pickled ``.bin`` still loads through torch."""
    shape = _first_projection(d, _read_shape)
    if shape is None:
        return None
    _check_projection_shape(d, shape, hidden)
    return int(shape[0]), int(shape[1])


def _check_projection_shape(d: Path, shape: tuple, hidden: int) -> None:
    if len(shape) != 2 or shape[1] != hidden:
        raise ModelError(f"model folder {d}: ColBERT projection has shape {tuple(shape)}, "
                         f"expected (dim, {hidden})")


def projection_sources(d: Path) -> "list[Path]":
    """The files that may hold a ColBERT projection (key ``linear.weight``), in the order
    they are searched: the folder's own weights (Stanford ColBERT: safetensors, then
    ``.bin``), then each PyLate ``Dense`` module of ``modules.json`` (its safetensors, then
    its ``pytorch_model.bin``)."""
    found = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))
    for module in _read_json_list(d / "modules.json"):
        if "Dense" not in module.get("type", ""):
            continue
        mdir = d / module.get("path", "")
        found += sorted(mdir.glob("*.safetensors"))
        if (mdir / "pytorch_model.bin").is_file():
            found.append(mdir / "pytorch_model.bin")
    return found


def _first_projection(d: Path, read):
    """``read(path)`` of the first of :func:`projection_sources` that holds ``linear.weight``."""
    for path in projection_sources(d):
        value = read(path)
        if value is not None:
            return value
    return None


def _read_weight(path: Path) -> "torch.Tensor | None":
    """``linear.weight`` of one weights file, or None."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("linear.weight") if "linear.weight" in f.keys() else None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("linear.weight") if isinstance(state, dict) else None


def _read_shape(path: Path) -> "tuple | None":
    """The shape of ``linear.weight`` in one weights file, or None; a safetensors file's from
    its header alone (no torch, no tensor read)."""
    if path.suffix != ".safetensors":
        weight = _read_weight(path)
        return tuple(weight.shape) if weight is not None else None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return tuple(f.get_slice("linear.weight").get_shape()) if "linear.weight" in f.keys() else None


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, list) else []


def default_threads() -> int:
    """Torch intra-op threads for one CPU worker: what the process was given."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
