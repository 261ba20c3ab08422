"""The retune job end to end on a tiny model: one module-scoped store (set ``t`` with dense and
ColBERT vectors, a flat and a plaid index; set ``d``, dense only, with other settings)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_models import MULTILINGUAL_TEXTS
from indexing.searcher import IncompatibleEncoderError, Searcher
from jobs import retune as retune_mod
from jobs.build_index import IndexConfig
from jobs.build_index import run as build
from jobs.embed import EmbedConfig
from jobs.embed import run as embed
from jobs.evaluate import EvalConfig
from jobs.evaluate import run as evaluate_run
from jobs.retune import GateRefused, RetuneConfig, run
from jobs.retune_data import load_training
from jobs.retune_gate import choose_run, gate
from jobs.retune_worker import select_negatives
from storage import catalog
from storage.fs import Location
from storage.manifest import Artifact, NotFoundError
from storage.queries import QueryFileError

REPO = Path(__file__).resolve().parents[2]
LANGS = ("en", "de", "fr", "es", "ru")
TRAIN_LANGS = ("en",)


def _words(text: str, part: str) -> str:
    if " " not in text:  # no spaces (zh): characters
        return text[1:7] if part == "train" else text[-7:-1]
    w = text.rstrip(".?!").split()
    return " ".join(w[1:5] if part == "train" else w[-4:])


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir, ray_session_tmp, s3_server):
    from conftest import ensure_local_ray

    ensure_local_ray()
    tmp = tmp_path_factory.mktemp("retune")
    docs = [{"id": f"{lang}-{i}", "text": t, "lang": lang} for lang in LANGS
            for i, t in enumerate(MULTILINGUAL_TEXTS[lang])]
    root = str(tmp / "store")
    embed(EmbedConfig(corpus=(_jsonl(tmp / "corpus.jsonl", docs),), model=str(tiny_model_dir), set_name="t",
                      root=root, rows_per_shard=32, n_centroids=16, mode="both", max_batch=16))
    for kind in ("flat", "plaid"):
        build(IndexConfig(set_name="t", kind=kind, root=root))
    # another set: dense only, other passage prefix = another fingerprint
    embed(EmbedConfig(corpus=(str(tmp / "corpus.jsonl"),), model=str(tiny_model_dir), set_name="d", root=root,
                      mode="dense", passage_prefix="passage: ", max_batch=16))
    build(IndexConfig(set_name="d", kind="flat", root=root))
    train = _jsonl(tmp / "train.jsonl", [{"text": _words(d["text"], "train"), "doc_id": d["id"], "lang": d["lang"]}
                                         for d in docs if d["lang"] in TRAIN_LANGS])
    dev_q = _jsonl(tmp / "dev.jsonl", [{"id": f"q-{d['id']}", "text": _words(d["text"], "dev"), "lang": d["lang"]}
                                       for d in docs])
    (tmp / "dev.tsv").write_text("".join(f"q-{d['id']}\t0\t{d['id']}\t1\n" for d in docs))
    return {"root": root, "tmp": tmp, "docs": docs, "train": train, "dev_queries": dev_q,
            "dev_qrels": str(tmp / "dev.tsv")}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))


def _cfg(store, **kw) -> RetuneConfig:
    base = dict(set_name="t", index="t-flat", train=store["train"], root=store["root"],
                dev_queries=store["dev_queries"], dev_qrels=store["dev_qrels"], steps=4, batch_size=8,
                negatives=3, mine_k=20, skip_top=1, threads=1)
    base.update(kw)
    return RetuneConfig(**base)


# ---- pure parts ------------------------------------------------------------------------------
def test_select_negatives_skips_top_ranks_and_positives():
    ranked = ["a", "p", "b", "c", "q", "d", "e"]
    negs, info = select_negatives(ranked, {"p", "q"}, n=3, skip_top=2)
    assert negs == ["b", "c", "d"] and info == {"best_positive_rank": 2, "skipped_non_positive": 1}
    negs, info = select_negatives(ranked[:3], {"z"}, n=5, skip_top=0)
    assert negs == ["a", "p", "b"] and info["best_positive_rank"] is None


@pytest.mark.parametrize("where, named", [
    ("cast((select content from read_text('/etc/hostname')) as int) = 1", "a subquery is not allowed"),
    ("1=1) union select 1 --", 'syntax error at or near ")"'),
    ("lang = 'de' -- and more", "comments are not allowed"),
])
def test_negatives_where_is_one_expression_checked_before_anything_runs(tmp_path, where, named):
    """Issue 14 item 2: --negatives-where goes through storage.catalog.check_filter in the config."""
    store = {"train": str(tmp_path / "t.jsonl"), "root": str(tmp_path), "dev_queries": "d.jsonl", "dev_qrels": "d.tsv"}
    with pytest.raises(ValueError, match="invalid filter") as err:
        _cfg(store, negatives_where=where)
    assert named in str(err.value)
    assert _cfg(store, negatives_where="lang in ('de', 'fr')").negatives_where == "lang in ('de', 'fr')"
    with pytest.raises(ValueError, match="invalid filter"):        # eval --where: the same check
        EvalConfig(index="t-flat", queries="q.jsonl", qrels="q.tsv", where=where)


def test_gate_points_tolerance_and_regression():
    before = {"overall": {"nDCG@10": 0.60}, "per_language": {"en": {"nDCG@10": 0.70}, "de": {"nDCG@10": 0.50}}}
    better = {"overall": {"nDCG@10": 0.62}, "per_language": {"en": {"nDCG@10": 0.75}, "de": {"nDCG@10": 0.496}}}
    g = gate(before, better, tolerance=0.0, max_regression=0.5)
    assert g["passed"] and g["worst_language"] == "de" and g["worst_delta"] == pytest.approx(-0.4)
    assert not gate(before, better, 0.0, 0.3)["passed"]                        # de lost 0.4 points
    worse = {"overall": {"nDCG@10": 0.599}, "per_language": before["per_language"]}
    assert not gate(before, worse, 0.0, 0.5)["passed"] and gate(before, worse, 0.2, 0.5)["passed"]
    rows = [{"passed": False, "ndcg_after": 0.9, "loss_after": 1.0}, {"passed": True, "ndcg_after": 0.6,
                                                                      "loss_after": 1.0},
            {"passed": True, "ndcg_after": 0.7, "loss_after": 1.0}]
    assert choose_run(rows, force=False) == 2 and choose_run(rows[:1], force=False) is None
    assert choose_run(rows[:1], force=True) == 0


def test_training_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    grouped = load_training(_jsonl(tmp_path / "a.jsonl", [{"query": "x y", "positives": ["d1", "d2"]},
                                                           {"id": 7, "text": "z", "doc_id": "d3"},
                                                           {"id": 7, "text": "z", "doc_id": "d4"}]))
    assert [(q.text, q.positives) for q in grouped] == [("x y", ("d1", "d2")), ("z", ("d3", "d4"))]
    assert grouped[1].id == "7"
    pq.write_table(pa.table({"text": ["a", "a"], "doc_id": ["d1", "d2"]}), tmp_path / "p.parquet")
    assert load_training(str(tmp_path / "p.parquet"))[0].positives == ("d1", "d2")
    q = _jsonl(tmp_path / "q.jsonl", [{"id": "q1", "text": "a"}, {"id": "q2", "text": "b"}])
    (tmp_path / "r.tsv").write_text("q1 0 d9 1\nq2 0 d8 0\n")
    assert [(t.id, t.positives) for t in load_training(q, str(tmp_path / "r.tsv"))] == [("q1", ("d9",))]
    with pytest.raises(QueryFileError, match="line 1: no positive"):
        load_training(_jsonl(tmp_path / "b.jsonl", [{"text": "x", "doc_id": []}]))


def test_training_defaults_are_train_configs():
    """One source of the training defaults (lr, temperature, ...): embedding.tuning_config.TrainConfig."""
    from embedding.tuning_config import TrainConfig

    ours = RetuneConfig.__dataclass_fields__
    for name, f in TrainConfig.__dataclass_fields__.items():
        assert ours[name].default == f.default, name


def test_training_file_errors_name_the_file_and_line(tmp_path):
    """Invalid UTF-8 or JSON in a training file is a QueryFileError naming the file and line, not a bare
    UnicodeDecodeError (the JSONL reader of storage.input_files, shared with corpus and query files)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok", "doc_id": "d1"}\n{"text": "caf\xe9", "doc_id": "d2"}\n')
    with pytest.raises(QueryFileError, match=r"bad\.jsonl: line 2: not valid UTF-8 \(byte 13"):
        load_training(str(bad))
    bad.write_bytes(b'{"text": "ok", "doc_id": "d1"}\n\n{"text": "x", "doc_id": \n')
    with pytest.raises(QueryFileError, match=r"bad\.jsonl: line 3: invalid JSON: Expecting value at column"):
        load_training(str(bad))
    with pytest.raises(QueryFileError, match=r"nope\.jsonl: no such file"):
        load_training(str(tmp_path / "nope.jsonl"))
    with pytest.raises(QueryFileError, match=r"pairs\.csv: training pairs must be Parquet or JSONL"):
        load_training(str(tmp_path / "pairs.csv"))


# ---- the job ---------------------------------------------------------------------------------
def test_harmless_version_is_published_and_used_by_search(store, tmp_path):
    before = _tree_digest(Path(store["root"]) / "sets") | _tree_digest(Path(store["root"]) / "indexes")
    m = run(_cfg(store, name="t-harmless"))   # the adiabatic default learning rate
    assert _tree_digest(Path(store["root"]) / "sets") | _tree_digest(Path(store["root"]) / "indexes") == before
    set_fp = Artifact(Location(store["root"]), "sets", "t").manifest()["model"]["fingerprint"]
    assert m["compatible_with"] == {"set": "t", "version": "v000001", "fingerprint": set_fp} == m["source"]
    assert m["base_fingerprint"] == set_fp != m["fingerprint"] and not m["forced"]
    assert m["immutability"]["unchanged"] and m["immutability"]["files"] > 10
    assert set(m["immutability"]["before"]) == set(m["immutability"]["after"])
    assert m["training"]["lr"] == 5e-8 and m["training"]["parameter_changes"]["tensors_changed"] > 0
    assert 0 < m["training"]["parameter_changes"]["max_abs_change"] < 1e-6
    neg = m["negatives"]
    assert neg["queries"] == 12 and neg["mined_min"] == 3 and neg["skip_top"] == 1
    ev = m["evaluation"]
    assert ev["gate"]["passed"] and set(ev["before"]["per_language"]) == set(LANGS)
    assert abs(ev["delta_points"]["overall"]) < 0.5 and ev["before"]["overall"]["nDCG@10"] > 0.3
    assert Artifact(Location(store["root"]), "encoders", "t-harmless").current() == m["version"]
    # the version is a Hugging Face folder, reloadable as is, and search uses it
    searcher = Searcher.open(store["root"], "t-flat", query_encoder="t-harmless")
    assert searcher.encoder.registered and searcher.encoder.fingerprint == m["fingerprint"]
    from transformers import AutoModel

    assert AutoModel.from_pretrained(str(searcher.encoder.path), local_files_only=True).config.hidden_size == 32
    hits = searcher.search([store["docs"][0]["text"]], k=3)[0]
    assert hits[0][0] == store["docs"][0]["id"]
    # tessera eval with it scores what the gate measured (flat index = exact search)
    result = evaluate_run(EvalConfig(index="t-flat", queries=store["dev_queries"], qrels=store["dev_qrels"],
                                     root=store["root"], query_encoder=f"t-harmless@{m['version']}",
                                     out=str(tmp_path / "rep")))
    got = result["results"]["t-flat"]
    assert got["overall"]["nDCG@10"] == pytest.approx(ev["after"]["overall"]["nDCG@10"], abs=1e-6)
    con = catalog.connect(store["root"])
    row = con.execute("select set_name, set_version from encoders where name = 't-harmless'").fetchone()
    assert row == ("t", "v000001")
    # a registered version can be the base of the next one: still registered for the set, not for its base
    chained = run(_cfg(store, name="t-chain", base="t-harmless", steps=1))
    assert chained["base_fingerprint"] == m["fingerprint"] and chained["compatible_with"] == m["compatible_with"]
    assert chained["base"]["registered"] and chained["evaluation"]["before"] == ev["after"]


def test_gate_refuses_a_regressing_version(store):
    with pytest.raises(GateRefused, match="REFUSED") as err:
        run(_cfg(store, name="t-wrecked", lr=0.05, steps=20, warmup_ratio=0.0))
    report = err.value.report
    assert report["chosen"] is None and not report["runs"][0]["passed"]
    assert report["runs"][0]["loss_after"] != report["runs"][0]["loss_before"]
    assert any("max regression" in r for r in report["runs"][0]["reasons"])
    assert "per language" in str(err.value)
    art = Artifact(Location(store["root"]), "encoders", "t-wrecked")
    assert art.versions() == [] and art.current() is None


def test_sweep_publishes_the_best_run_that_passes(store):
    m = run(_cfg(store, name="t-sweep", sweep_lr=(5e-8, 0.05), sweep_freeze=((), ("*output.dense.weight",)),
                 steps=20, warmup_ratio=0.0))
    runs = m["runs"]
    assert [(r["lr"], r["freeze"]) for r in runs] == [(5e-8, []), (5e-8, ["*output.dense.weight"]),
                                                    (0.05, []), (0.05, ["*output.dense.weight"])]
    assert runs[1]["tensors_changed"] < runs[0]["tensors_changed"]
    passing = [i for i, r in enumerate(runs) if r["passed"]]
    assert passing and m["chosen_run"] - 1 == max(passing, key=lambda i: runs[i]["ndcg_after"])
    assert "table" not in m and m["training"]["lr"] == runs[m["chosen_run"] - 1]["lr"]


def test_colbert_retune_on_plaid_without_dev_is_forced(store, tiny_model_dir):
    from safetensors.numpy import load_file

    m = run(_cfg(store, name="t-colbert", index="t-plaid", dev_queries=None, dev_qrels=None, force=True,
                 lr=1e-3, steps=6, freeze=("*attention.self.*",)))
    assert m["vectors"]["kind"] == "colbert" and m["evaluation"] is None and m["forced"]
    assert m["training"]["stats"]["loss_after"] < m["training"]["stats"]["loss_before"]
    # the stored weights: the frozen tensors bit for bit the base's, every other used one moved
    tuned = load_file(str(Path(store["root"]) / "encoders" / "t-colbert" / m["version"] / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    frozen = {k for k in base if ".attention.self." in k}
    assert len(frozen) == 12 and set(m["training"]["stats"]["frozen"]) == frozen
    moved = {k for k in base if not np.array_equal(base[k], tuned[k])}
    assert moved.isdisjoint(frozen) and moved == set(base) - frozen - {k for k in base if k.startswith("pooler.")}
    searcher = Searcher.open(store["root"], "t-plaid", query_encoder="t-colbert")
    assert len(searcher.search(["quick brown fox"], k=4)[0]) == 4


def test_other_sets_index_refuses_the_encoder(store):
    if not Artifact(Location(store["root"]), "encoders", "t-colbert").exists():
        pytest.skip("needs the encoder of test_colbert_retune_on_plaid_without_dev_is_forced")
    with pytest.raises(IncompatibleEncoderError, match="registered for set 't'"):
        Searcher.open(store["root"], "d-flat", query_encoder="t-colbert")


def test_bad_input_fails_before_training(store, tmp_path, monkeypatch):
    def no_training(plan):
        raise AssertionError("training started")

    monkeypatch.setattr(retune_mod, "remote_tune", no_training)
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        _cfg(store, lr=0.0)
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        _cfg(store, sweep_lr=(5e-8, -1.0))
    with pytest.raises(ValueError, match="dev queries and dev qrels go together"):
        _cfg(store, dev_qrels=None)
    with pytest.raises(ValueError, match="no dev set"):
        _cfg(store, dev_queries=None, dev_qrels=None)
    with pytest.raises(ValueError, match=r"match no parameter \(likely a typo\)"):
        run(_cfg(store, freeze=("*ouptut.dense.weight",)))
    absent = _jsonl(tmp_path / "t.jsonl", [{"text": "x", "doc_id": "en-0"}, {"text": "y", "doc_id": "nope-1"}])
    with pytest.raises(ValueError, match=r"1 training positive id\(s\) are not documents of set t.*nope-1"):
        run(_cfg(store, train=absent))
    (tmp_path / "none.tsv").write_text("other 0 en-0 1\n")
    with pytest.raises(QueryFileError, match="judges none of the"):
        run(_cfg(store, dev_qrels=str(tmp_path / "none.tsv")))
    with pytest.raises(ValueError, match="was built from set 'd'"):
        run(_cfg(store, index="d-flat"))
    # a plaid index over a set without ColBERT vectors (written by hand: the index job refuses to build one)
    root = Location(store["root"])
    d = Artifact(root, "sets", "d").manifest()
    art = Artifact(root, "indexes", "d-plaid")
    if not art.versions():
        art.commit("v000001", {"index_kind": "plaid", "dim": 32, "files": [], "source": {
            "set": "d", "version": d["version"], "fingerprint": d["model"]["fingerprint"]}})
        art.publish("v000001")
    with pytest.raises(NotFoundError, match="no stored tokens vectors"):
        run(_cfg(store, set_name="d", index="d-plaid"))
    assert not Artifact(root, "encoders", "t-query").exists()   # nothing was claimed


def test_a_changed_set_file_fails_the_job(store, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "store"
    shutil.copytree(store["root"], root)
    real = retune_mod.remote_tune

    def tamper(plan):
        out = real(plan)
        ids = next((root / "indexes" / "t-flat").rglob("ids.parquet"))
        ids.write_bytes(ids.read_bytes() + b"\0")
        return out

    monkeypatch.setattr(retune_mod, "remote_tune", tamper)
    with pytest.raises(RuntimeError, match="changed while re-tuning"):
        run(_cfg(store, root=str(root), name="t-tamper", steps=1))
    assert Artifact(Location(str(root)), "encoders", "t-tamper").versions() == []


def test_registered_encoder_from_an_s3_root(store, s3_bucket):
    if not Artifact(Location(store["root"]), "encoders", "t-harmless").exists():
        pytest.skip("needs the encoder of test_harmless_version_is_published_and_used_by_search")
    root = Location(f"{s3_bucket}/store")
    root.fs.put(str(Path(store["root"])) + "/", root.path, recursive=True)
    searcher = Searcher.open(root, "t-flat", query_encoder="t-harmless:1")
    assert searcher.encoder.registered and Path(os.environ["TESSERA_CACHE_DIR"]) in searcher.encoder.path.parents


# ---- the command line ------------------------------------------------------------------------
def _tessera(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "TESSERA_CACHE_DIR": str(cache)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _cli(argv: list[str]) -> int:
    """The CLI's parser and command in this process (its Ray is already up); the exit status."""
    from jobs import cli

    args = cli.build_parser().parse_args(argv)
    return cli.COMMANDS[args.command](args)


def test_cli_retune_sweep_refusal_and_encoders(store, tmp_path, capsys):
    common = ["--set", "t", "--index", "t-flat", "--root", store["root"], "--train", store["train"],
              "--dev-queries", store["dev_queries"], "--dev-qrels", store["dev_qrels"], "--steps", "20",
              "--batch-size", "8", "--negatives", "3", "--mine-k", "20", "--skip-top", "1", "--warmup-ratio", "0",
              "--threads", "1"]
    assert _cli(["retune", *common, "--name", "t-cli", "--sweep-lr", "5e-8,5e-2",
                 "--sweep-freeze", "none,*output.dense.weight"]) == 0
    out = capsys.readouterr().out
    assert "REFUSED" in out and "pass" in out and "published t-cli v000001" in out
    assert _cli(["retune", *common, "--name", "t-cli-bad", "--lr", "5e-2"]) == 3
    bad = capsys.readouterr()
    assert "REFUSED" in bad.out and "nothing was published" in bad.err
    typo = _tessera("retune", *common, "--freeze", "*nope*", cwd=tmp_path, cache=tmp_path / "c")
    assert typo.returncode == 2 and "typo" in typo.stderr
    listing = _tessera("encoders", "--root", store["root"], "--json", cwd=tmp_path, cache=tmp_path / "c")
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["t-cli"]["set"] == "t" and rows["t-cli"]["is_current"] and "t-cli-bad" not in rows
    found = _tessera("search", "--index", "t-flat", "--root", store["root"], "--query-encoder", "t-cli@v1",
                     "--json", "-k", "2", store["docs"][3]["text"], cwd=tmp_path, cache=tmp_path / "c")
    assert found.returncode == 0, found.stderr[-2000:]
    assert json.loads(found.stdout)[0]["results"][0]["id"] == store["docs"][3]["id"]
    wrong = _tessera("search", "--index", "d-flat", "--root", store["root"], "--query-encoder", "t-cli",
                     "x", cwd=tmp_path, cache=tmp_path / "c")
    assert wrong.returncode == 2 and "refusing" in wrong.stderr
