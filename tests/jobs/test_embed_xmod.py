"""X-MOD (ColBERT-XM style) models through the CLI: each document through its language's adapter,
the fallback counted in the manifest, a language without an adapter refused before anything is
written, and queries routed by --query-lang, a queries file's lang or a detector."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from fixtures_models import MULTILINGUAL_TEXTS, build_tiny_xmod
from storage import manifest as mf
from storage import schemas
from storage.fs import location
from storage.manifest import Artifact
from tests.helpers import cli, write_jsonl
from tests.storage.test_manifest_types import mismatches


@pytest.fixture(scope="module")
def xmod_dir(tmp_path_factory):
    return build_tiny_xmod(tmp_path_factory.mktemp("tiny-xmod"))


def xmod_docs() -> list[dict]:
    """5 English, 5 German and 3 French documents (the model has en_XX and de_DE adapters)."""
    rows = []
    for lang, n in (("en", 5), ("de", 5), ("fr", 3)):
        rows += [{"id": f"{lang}-{i}", "text": t, "lang": lang} for i, t in enumerate(MULTILINGUAL_TEXTS[lang][:n])]
    return rows


def stored_dense(root: str, set_name: str, kind: str = "dense") -> dict:
    art = Artifact(location(root), "sets", set_name)
    m = art.manifest(art.current())
    vdir = art.version_dir(m["version"])
    table = pa.concat_tables([schemas.read_table(vdir.join(e["path"])) for e in m["files"] if e["kind"] == kind])
    return dict(zip(table.column("id").to_pylist(), schemas.dense_matrix(table).astype(np.float32)))


def test_xmod_embed_routes_languages_and_counts_the_fallback(ray_local, xmod_dir, tmp_path, capsys):
    from embedding.encoder import Encoder
    from embedding.model import EncoderSettings, load_model

    rows = xmod_docs()
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    root = str(tmp_path / "store")
    code, out, err = cli(capsys, "embed", "--corpus", corpus, "--model", str(xmod_dir), "--set", "x", "--root", root,
                         "--mode", "both", "--nbits", "2", "--n-centroids", "8", "--rows-per-shard", "8",
                         "--adapter-fallback", "en", "--json")
    assert code == 0, err[-3000:]
    m = json.loads(out)
    c = m["counts"]
    assert c["per_adapter"] == {"de_DE": 5, "en_XX": 8}
    assert c["adapter_fallback"] == 3 and c["adapter_fallback_languages"] == {"fr": 3}
    assert m["config"]["adapter_fallback"] == "en" and m["model"]["settings"]["adapter_fallback"] == "en"
    assert mismatches(m, mf.SetManifest) == []  # the typed record declares the new keys

    # the stored vectors are each document's own adapter's (the fallback's for French)
    lm = load_model(xmod_dir, EncoderSettings(adapter_fallback="en"), device="cpu")
    direct = Encoder(lm).encode_documents([r["text"] for r in rows], langs=[r["lang"] for r in rows]).dense
    stored = stored_dense(root, "x")
    for r, vec in zip(rows, direct):
        np.testing.assert_allclose(stored[r["id"]], vec, atol=3e-3)
    as_en = Encoder(lm).encode_documents([rows[5]["text"]], langs=["en"]).dense[0]
    assert not np.allclose(stored["de-0"], as_en, atol=3e-3)  # German went through de_DE, not en_XX

    # queries: --query-lang routes them; a queries file's lang too; a detector for the rest
    for kind in ("flat", "plaid"):
        code, out, err = cli(capsys, "index", "--set", "x", "--kind", kind, "--root", root)
        assert code == 0, err[-2000:]
    for kind in ("flat", "plaid"):
        code, out, err = cli(capsys, "search", "--index", f"x-{kind}", "--root", root, "--json", "-k", "1",
                             "--query-lang", "de", rows[6]["text"])
        assert code == 0, err[-2000:]
        assert json.loads(out)[0]["results"][0]["id"] == "de-1"
    queries = write_jsonl(str(tmp_path / "q.jsonl"), [{"id": "q1", "text": rows[7]["text"], "lang": "de"},
                                                      {"id": "q2", "text": rows[1]["text"], "lang": "en"}])
    code, out, err = cli(capsys, "search", "--index", "x-flat", "--root", root, "--queries", queries, "-k", "1",
                         "--lang-detector", "script")
    assert code == 0, err[-2000:]
    hits = {h["query_id"]: h["doc_id"] for h in map(json.loads, out.splitlines())}
    assert hits == {"q1": "de-2", "q2": "en-1"}

    from indexing.searcher import Searcher

    s = Searcher.open(root, "x-flat", detector="script")
    de = s.encode_queries([rows[6]["text"]], ["de"])
    und = s.encode_queries([rows[6]["text"]], [None])  # Latin script: no guess, the fallback (en)
    en = s.encode_queries([rows[6]["text"]], ["en"])
    np.testing.assert_allclose(und, en, atol=1e-6)
    assert not np.allclose(de, en, atol=1e-4)
    # tessera eval routes each query by the lang of its queries file too
    from jobs.evaluate import search_all
    from storage.queries import Query

    text = rows[6]["text"]
    got = search_all(s, [Query("q", text, "de")], 3, 8)["q"]
    assert got == s.search([text], 3, langs=["de"])[0]
    assert [score for _, score in got] != [score for _, score in s.search([text], 3, langs=["en"])[0]]
    code, _, err = cli(capsys, "search", "--index", "x-flat", "--root", root, "--lang-detector", "nope", "q")
    assert code == 2 and "nope" in err


def test_a_language_without_an_adapter_and_no_fallback_is_refused_before_anything_is_written(
        xmod_dir, tmp_path, capsys):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), xmod_docs())
    root = tmp_path / "store"
    root.mkdir()
    code, out, err = cli(capsys, "embed", "--corpus", corpus, "--model", str(xmod_dir), "--set", "x",
                         "--root", str(root), "--mode", "dense")
    assert code == 2, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("tessera:")][-1]
    assert "'fr': 3 document(s)" in line and corpus in line and "--adapter-fallback" in line
    assert list(root.iterdir()) == []  # no set, no version, no claim

    code, _, err = cli(capsys, "embed", "--corpus", corpus, "--model", str(xmod_dir), "--set", "x",
                       "--root", str(root), "--adapter-fallback", "pt")
    assert code == 2 and "'pt'" in err and list(root.iterdir()) == []
