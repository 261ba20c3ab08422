"""xQG query generation with a tiny random seq2seq model, end to end into augmented vectors."""
from __future__ import annotations

import numpy as np
import pytest

from embedding.augment import augment_dense, augment_tokens
from embedding.encoder import Encoder
from embedding.model import load_model
from embedding.querygen import GenerationSettings, GeneratorError, QueryGenerator, check_generator_dir, prompts
from fixtures_models import MULTILINGUAL_TEXTS, build_tiny_seq2seq

PASSAGES = MULTILINGUAL_TEXTS["en"][:3]


@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory):
    return build_tiny_seq2seq(tmp_path_factory.mktemp("tiny-t5"))


def test_generates_n_queries_per_passage_per_language(seq2seq_dir):
    gen = QueryGenerator.load(seq2seq_dir, GenerationSettings(queries_per_lang=2, max_new_tokens=6,
                                                              max_batch=4), device="cpu")
    out = gen.generate(PASSAGES, ["de", "fr", "en"], passage_langs=["en"] * 3)
    assert len(out) + out.empty == 3 * 2 * 2  # own language skipped
    assert set(out.langs) <= {"de", "fr"} and "en" not in out.langs
    assert sorted(set(out.passage.tolist())) == [0, 1, 2] and np.all(np.diff(out.passage) >= 0)
    assert all(t.strip() == t and t for t in out.texts)
    again = gen.generate(PASSAGES, ["de", "fr", "en"], passage_langs=["en"] * 3)
    assert again.texts == out.texts  # seeded: reproducible


def test_generated_queries_augment_encoded_passages(seq2seq_dir, tiny_colbert_dir):
    """Generator -> query encoder -> augmentation, as the embed job runs it per shard."""
    gen = QueryGenerator.load(seq2seq_dir, GenerationSettings(queries_per_lang=2, max_new_tokens=8,
                                                              min_new_tokens=4), device="cpu")
    enc = Encoder(load_model(tiny_colbert_dir, device="cpu"))
    docs = enc.encode_documents(PASSAGES, dense=True, colbert=True)
    qs = gen.generate(PASSAGES, ["de", "ru"])
    qv = enc.encode_query_tokens(qs.texts, qs.langs)
    assert qv.dense.shape == (len(qs), docs.dense.shape[1]) and len(qv.tokens) == len(qs)
    np.testing.assert_allclose(qv.dense, enc.encode_queries(qs.texts), atol=1e-5)
    dense = augment_dense(docs.dense, qv.dense, qs.passage, 0.5)
    assert dense.shape == docs.dense.shape and not np.allclose(dense, docs.dense)
    tokens = augment_tokens(docs.tokens, qv.tokens, qs.passage, cap=10)
    for before, after in zip(docs.tokens, tokens):
        assert len(before) < len(after) <= len(before) + 10
        np.testing.assert_array_equal(after[:len(before)], before)


def test_query_tokens_are_the_query_encoders_content_tokens(tiny_colbert_dir):
    enc = Encoder(load_model(tiny_colbert_dir, device="cpu"))
    text = MULTILINGUAL_TEXTS["de"][1]  # "Wo ist der nächste Bahnhof, bitte?"
    got = enc.encode_query_tokens([text], colbert=True, dense=False).tokens[0]
    matrix = enc.encode_queries_colbert([text])[0]
    ids = enc.tokenize([text], enc.s.query_maxlen, enc.query_marker_id)[0][0]
    specials = set(enc.lm.tokenizer.all_special_ids)
    content = [k for k, t in enumerate(ids) if t not in specials and t not in set(enc.skip_ids.tolist())]
    assert len(got) == len(content)
    # same vectors as the query encoder's at those positions (mask expansion aside)
    np.testing.assert_allclose(got, matrix[content], atol=1e-4)


def test_not_a_seq2seq_folder_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(GeneratorError, match="is not a seq2seq model: .*model_type 'bert'"):
        check_generator_dir(tiny_model_dir)
    with pytest.raises(GeneratorError, match="not a seq2seq"):
        QueryGenerator.load(tiny_model_dir, device="cpu")
    with pytest.raises(GeneratorError, match="does not exist"):
        check_generator_dir(tmp_path / "missing")


def test_prompts_and_settings():
    out, owner, langs = prompts(["P1", "P2"], ["de", "xx"], "Generate a {language} ({lang}) question: {text}",
                                passage_langs=["de", None])
    assert out == ["Generate a xx (xx) question: P1", "Generate a German (de) question: P2",
                   "Generate a xx (xx) question: P2"]
    assert owner.tolist() == [0, 1, 1] and langs == ["xx", "de", "xx"]
    for bad in (dict(queries_per_lang=0), dict(prompt="no text"), dict(prompt="{text} {nope}"),
                dict(do_sample=False, num_beams=2, queries_per_lang=4), dict(top_p=0.0),
                dict(min_new_tokens=40, max_new_tokens=32)):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)
