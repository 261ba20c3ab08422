"""X-MOD (ColBERT-XM style) encoders: each text goes through its language's adapter."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedding.encoder import Encoder
from embedding.languages import LanguageError, make_detector, resolve_adapter, route_languages, script_language
from embedding.model import EncoderSettings, ModelError, adapter_languages, fingerprint, load_model, read_settings
from fixtures_models import MULTILINGUAL_TEXTS, build_tiny_xmod

EN = MULTILINGUAL_TEXTS["en"][:4]
DE = MULTILINGUAL_TEXTS["de"][:4]


@pytest.fixture(scope="module")
def xmod_dir(tmp_path_factory):
    return build_tiny_xmod(tmp_path_factory.mktemp("tiny-xmod"))


@pytest.fixture(scope="module")
def xmod_colbert_dir(tmp_path_factory):
    return build_tiny_xmod(tmp_path_factory.mktemp("tiny-xmod-colbert"), colbert_dim=16)


@pytest.fixture(scope="module")
def lm(xmod_dir):
    return load_model(xmod_dir, device="cpu", precision="float32")


def _reference(lm, texts: list[str], adapter: str, prefix: str = "") -> np.ndarray:
    """Mean-pooled unit vectors straight from the model, one text at a time, with ``adapter``."""
    out = []
    for text in texts:
        enc = lm.tokenizer([prefix + text], return_tensors="pt", return_token_type_ids=False)
        lang_ids = torch.tensor([lm.adapters.index(adapter)])
        with torch.inference_mode():
            hidden = lm.model(**enc, lang_ids=lang_ids).last_hidden_state[0]
        out.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy())
    return np.stack(out)


def test_folder_declares_its_adapters(xmod_dir, tiny_model_dir):
    assert adapter_languages(xmod_dir) == ("en_XX", "de_DE")
    assert adapter_languages(tiny_model_dir) is None


def test_documents_go_through_their_own_adapter(lm):
    enc = Encoder(lm, max_batch=3)
    mixed = [EN[0], DE[0], EN[1], DE[1], DE[2], EN[2]]
    langs = ["en", "de", "en", "de-DE", "de_DE", "en_XX"]
    got = enc.encode_documents(mixed, langs=langs, dense=True)
    ref_en = _reference(lm, [EN[0], EN[1], EN[2]], "en_XX")
    ref_de = _reference(lm, [DE[0], DE[1], DE[2]], "de_DE")
    np.testing.assert_allclose(got.dense[[0, 2, 5]], ref_en, atol=1e-5)
    np.testing.assert_allclose(got.dense[[1, 3, 4]], ref_de, atol=1e-5)
    # the other adapter gives other vectors: the adapters take part
    wrong = _reference(lm, [DE[0], DE[1], DE[2]], "en_XX")
    assert np.abs(wrong - ref_de).max() > 1e-2


def test_every_forward_runs_one_adapter(lm):
    """Batches are grouped by language: each adapter sees only its own texts, in whole batches.
    Two forward streams run batches at once on CPU: the adapters' calls are paired per thread."""
    import threading

    seen: dict[int, dict[str, list[int]]] = {}

    def record(name: str, rows: int) -> None:
        seen.setdefault(threading.get_ident(), {"en_XX": [], "de_DE": []})[name].append(rows)

    hooks = [module.register_forward_hook(lambda m, args, out, name=name: record(name, len(args[0])))
             for name, module in lm.model.encoder.layer[0].output.adapter_modules.items()]
    try:
        enc = Encoder(lm, max_batch=2)
        enc.encode_documents([EN[0], DE[0], EN[1], DE[1], EN[2]], langs=["en", "de", "en", "de", "en"])
    finally:
        for h in hooks:
            h.remove()
    # X-MOD calls every adapter on every forward, with the rows routed to it (0 when none),
    # one forward after another in its thread
    calls = [pair for by_name in seen.values() for pair in zip(by_name["en_XX"], by_name["de_DE"])]
    assert len(calls) == 3, seen                             # 3 English texts in 2 batches, 2 German in 1
    assert all(a == 0 or b == 0 for a, b in calls), calls    # never both languages in one batch
    assert sum(a for a, _ in calls) == 3 and sum(b for _, b in calls) == 2


def test_colbert_xm_tokens_and_queries(xmod_colbert_dir):
    lm = load_model(xmod_colbert_dir, device="cpu", precision="float32")
    assert lm.projection is not None and lm.colbert_dim == 16
    enc = Encoder(lm)
    de = enc.encode_documents(DE[:2], langs=["de", "de"], dense=False, colbert=True)
    as_en = enc.encode_documents(DE[:2], langs=["en", "en"], dense=False, colbert=True)
    assert [t.shape for t in de.tokens] == [t.shape for t in as_en.tokens]
    assert all(t.shape[1] == 16 for t in de.tokens)
    assert max(np.abs(a - b).max() for a, b in zip(de.tokens, as_en.tokens)) > 1e-2
    q_de = enc.encode_queries_colbert(DE[:2], langs=["de", "de"])
    q_en = enc.encode_queries_colbert(DE[:2], langs=["en", "en"])
    assert q_de.shape == (2, 32, 16) and np.abs(q_de - q_en).max() > 1e-2


def test_queries_use_given_or_detected_language(lm):
    enc = Encoder(lm, detector=lambda text: "de" if "ist" in text else None)
    ref = enc.encode_queries([DE[1]], ["de"])
    np.testing.assert_allclose(enc.encode_queries([DE[1]]), ref, atol=1e-6)  # detected
    with pytest.raises(LanguageError, match="no adapter"):
        Encoder(lm).encode_queries([DE[1]])  # no language, no detector, no fallback


def test_unknown_language_without_fallback_is_an_error(lm):
    with pytest.raises(LanguageError, match=r"'fr' \(2\).*adapters are \['en_XX', 'de_DE'\]"):
        Encoder(lm).encode_documents(["Bonjour", "Merci"], langs=["fr", "fr"])


def test_fallback_encodes_unknown_languages_and_counts_them(xmod_dir, lm):
    settings = EncoderSettings(adapter_fallback="en")
    lm_fb = load_model(xmod_dir, settings, device="cpu", precision="float32")
    enc = Encoder(lm_fb)
    got = enc.encode_documents([DE[0], "Bonjour tout le monde", EN[0]], langs=["de", "fr", None])
    np.testing.assert_allclose(got.dense[1], _reference(lm, ["Bonjour tout le monde"], "en_XX")[0], atol=1e-5)
    counts = enc.route(["de", "fr", None]).counts()
    assert counts == {"per_adapter": {"de_DE": 1, "en_XX": 2}, "fallback": 2,
                      "fallback_languages": {"fr": 1, "und": 1}}
    assert lm_fb.fingerprint != lm.fingerprint  # the fallback changes vectors: part of the fingerprint


def test_bad_fallback_and_fallback_without_adapters(xmod_dir, tiny_model_dir):
    with pytest.raises(ModelError, match="fallback language 'fr' is not one of the model's adapters"):
        load_model(xmod_dir, EncoderSettings(adapter_fallback="fr"), device="cpu", precision="float32")
    with pytest.raises(ModelError, match="no language adapters"):
        load_model(tiny_model_dir, EncoderSettings(adapter_fallback="en"), device="cpu", precision="float32")


def test_fallback_from_the_folder_settings(tmp_path):
    d = build_tiny_xmod(tmp_path / "m")
    (d / "tessera_encoder.json").write_text(json.dumps({"adapter_fallback": "de_DE"}))
    assert read_settings(d).adapter_fallback == "de_DE"


def test_unset_fallback_keeps_old_fingerprints(tiny_model_dir):
    """Sets embedded before the setting existed keep their fingerprint."""
    assert "adapter_fallback" not in EncoderSettings().to_dict()
    assert fingerprint(tiny_model_dir, EncoderSettings()) == fingerprint(tiny_model_dir, EncoderSettings())
    assert EncoderSettings(adapter_fallback="en").to_dict()["adapter_fallback"] == "en"


def test_plain_models_ignore_languages(tiny_model_dir):
    enc = Encoder(load_model(tiny_model_dir, device="cpu", precision="float32"))
    a = enc.encode_documents(EN[:2], langs=["xx", None])
    b = enc.encode_documents(EN[:2])
    np.testing.assert_array_equal(a.dense, b.dense)


# ---- the routing planner ----------------------------------------------------------------
ADAPTERS = ("en_XX", "de_DE", "zh_CN", "zh_TW", "pt_XX")


@pytest.mark.parametrize("lang,adapter", [
    ("de_DE", "de_DE"), ("de", "de_DE"), ("DE-de", "de_DE"), ("zh", "zh_CN"), ("zh-TW", "zh_TW"),
    ("pt-BR", "pt_XX"), ("fr", None), (None, None), ("", None),
])
def test_resolve_adapter(lang, adapter):
    assert resolve_adapter(lang, ADAPTERS) == adapter


def test_route_languages_groups_and_counts():
    r = route_languages(["de", "en", "fr", "de", None], ADAPTERS, "en")
    assert r.lang_ids.tolist() == [1, 0, 0, 1, 0]
    assert r.fallback.tolist() == [False, False, True, False, True]
    assert [(a, p.tolist()) for a, p in r.groups()] == [(0, [1, 2, 4]), (1, [0, 3])]
    positions = np.concatenate([p for _, p in r.groups()])
    assert sorted(positions.tolist()) == list(range(5))  # every text exactly once


def test_detectors():
    assert script_language("Πού είναι ο σταθμός;") == "el"
    assert script_language("東京は日本の首都です。") == "ja"
    assert script_language("请问最近的火车站在哪里？") == "zh"
    assert script_language("Где находится вокзал?") == "ru"
    assert script_language("Where is the station?") is None
    assert make_detector("none") is None and make_detector("script") is script_language
    assert make_detector("embedding.languages:script_language") is script_language
    with pytest.raises(LanguageError):
        make_detector("no.such.module:fn")
