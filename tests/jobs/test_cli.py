"""The CLI as a user types it: one JSON document on stdout, clear errors, exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "jobs" / "data" / "sample_corpus.jsonl"


def tessera(*args: str, cwd: Path, env_extra: "dict | None" = None, block: "str | None" = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m jobs.cli ARGS``; ``block``: a module whose import fails in this process
    (``sys.modules[block] = None``; Ray's workers, separate processes, still import it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    entry = ["-m", "jobs.cli"]
    if block:
        entry = ["-c", f"import sys; sys.modules[{block!r}] = None; from jobs.cli import main; "
                       "sys.exit(main(sys.argv[1:]))"]
    return subprocess.run([sys.executable, *entry, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_embed_sets_sql(tiny_model_dir, tmp_path):
    out = tessera("embed", "--corpus", str(SAMPLE), "--model", str(tiny_model_dir), "--set", "demo",
                  "--mode", "dense", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads(out.stdout)                  # exactly one JSON document
    assert manifest["name"] == "demo" and manifest["counts"]["documents"] == 48
    assert (tmp_path / "tessera-data" / "sets" / "demo" / "CURRENT").exists()   # default root
    assert "rows/s" in out.stderr                      # progress goes to stderr

    sql = tessera("sql", "select lang, count(*) as n from documents group by lang order by lang", "--json",
                  cwd=tmp_path)
    assert sql.returncode == 0, sql.stderr[-2000:]
    rows = json.loads(sql.stdout)
    assert sum(r["n"] for r in rows) == 48 and {"lang", "n"} == set(rows[0])

    sets = tessera("sets", cwd=tmp_path)
    assert sets.returncode == 0 and "demo" in sets.stdout and "v000001" in sets.stdout

    # the same embed again (the README quick start run twice): nothing to do, exit 4, one line,
    # no new version, and the quick start's query counts every document once
    again = tessera("embed", "--corpus", str(SAMPLE), "--model", str(tiny_model_dir), "--set", "demo",
                    "--mode", "dense", "--json", cwd=tmp_path)
    assert again.returncode == 4, again.stderr[-3000:]
    assert again.stderr.strip().splitlines()[-1] == (
        "tessera: nothing to do: set 'demo' v000001 was embedded from the same 1 corpus file (byte for byte), "
        "model and settings: nothing to embed (--force embeds it again)") and again.stdout == ""
    assert "ray" not in again.stderr.lower()            # decided before Ray starts
    assert not (tmp_path / "tessera-data" / "sets" / "demo" / "v000002").exists()
    forced = tessera("embed", "--corpus", str(SAMPLE), "--model", str(tiny_model_dir), "--set", "demo",
                     "--mode", "dense", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and "demo v000002: 48 documents" in forced.stdout, forced.stderr[-3000:]
    assert forced.stdout.splitlines()[-1] == f"encoded in {manifest['workers']['precision']} on cpu"
    assert manifest["workers"]["precision"] in ("bfloat16", "float32")  # auto, resolved by the actors
    sql = tessera("sql", "select lang, count(*) as n from documents group by lang", "--json", cwd=tmp_path)
    assert sum(r["n"] for r in json.loads(sql.stdout)) == 48
    sql = tessera("sql", "select count(*) as n from documents_all", "--json", cwd=tmp_path)
    assert json.loads(sql.stdout) == [{"n": 96}]


def test_cli_bad_input_is_a_clear_error(tiny_model_dir, tmp_path):
    bad = tmp_path / "dup.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    out = tessera("embed", "--corpus", str(bad), "--model", str(tiny_model_dir), "--json", cwd=tmp_path)
    assert out.returncode == 2
    assert "tessera: error:" in out.stderr and "'a'" in out.stderr and "dup.jsonl" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""

    missing = tessera("embed", "--corpus", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir),
                      cwd=tmp_path)
    assert missing.returncode == 2 and "nope.jsonl: no such file" in missing.stderr

    nbits = tessera("embed", "--model", str(tiny_model_dir), "--nbits", "3", cwd=tmp_path)
    assert nbits.returncode == 2 and "nbits must be 1, 2 or 4" in nbits.stderr

    model = tessera("embed", "--model", "me5-large", cwd=tmp_path, env_extra={"TESSERA_MODELS_DIR": str(tmp_path)})
    assert model.returncode == 2 and "me5-large" in model.stderr

    sql = tessera("sql", "select nope from documents", cwd=tmp_path)
    assert sql.returncode == 2 and "SQL error" in sql.stderr


def test_a_working_directory_with_its_own_jobs_or_storage_module_is_not_imported_by_the_workers(
        tiny_colbert_dir, tmp_path):
    """Ray puts the driver's working directory first on its workers' ``sys.path``: run from a
    folder with a ``storage.py`` and a ``jobs`` package of the user's own, the workers imported
    those (the job failed with their ImportError). The driver here as the installed console
    script runs it: Tessera from ``$PYTHONPATH``, not from the working directory."""
    (tmp_path / "storage.py").write_text("raise ImportError('the user s own storage.py was imported')\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__init__.py").write_text("raise ImportError('the user s own jobs package was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    script = "import sys; del sys.path[0]; from jobs.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", script, "embed", "--corpus", str(SAMPLE), "--model",
                          str(tiny_colbert_dir), "--set", "mine", "--root", "data"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "was imported" not in out.stderr
    assert (tmp_path / "data" / "sets" / "mine" / "CURRENT").exists()        # relative to where it ran


#: what a clean run must not print (issue 14, item 8): Ray's and Ray Data's INFO lines, Ray's
#: core_worker.cc error about actor constructor arguments, faiss's training-size warning,
#: setuptools' and Ray's deprecation warnings
NOISE = ("core_worker.cc", "please provide at least", "Progress bars", "Starting execution",
         "Execution plan", "execution finished", "Started a local Ray", "Deprecat")


def test_clean_embed_prints_only_tesseras_progress(tiny_colbert_dir, tmp_path):
    """A clean run's console; its driver never imports torch (only the workers run the model;
    the ColBERT projection's size comes from the weights file's header), so it runs with torch
    blocked in the driver (importing it cost a job ~1.2 s and ~180 MB of the driver)."""
    out = tessera("embed", "--corpus", str(SAMPLE), "--model", str(tiny_colbert_dir), "--set", "quiet",
                  cwd=tmp_path, block="torch")
    assert out.returncode == 0, out.stderr[-3000:]
    for noise in NOISE:
        assert noise not in out.stderr, f"{noise!r} on stderr:\n{out.stderr}"
    # the sample pass says it started and how far it got, then the encode pass
    assert "codec sample: encoding 48 of 48 documents" in out.stderr
    assert "codec sample: 48/48 rows (100%)" in out.stderr and "embed: 48/48 rows (100%)" in out.stderr
    assert "fitted the codec" in out.stderr
    lines = out.stderr.strip().splitlines()
    # every line is Tessera's own ("HH:MM:SS LEVEL logger: message"), none forwarded from a worker
    assert all(line[:8].count(":") == 2 and " INFO " in line[:16] for line in lines), out.stderr


def test_missing_faiss_names_the_extras(tiny_model_dir, tmp_path):
    """``pip install tessera`` without the cpu/gpu extra: one line naming them, exit 2, nothing
    written; a command that needs no faiss is not refused."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return tessera(*args, cwd=tmp_path, block="faiss", timeout=300)

    out = run("embed", "--corpus", str(SAMPLE), "--model", str(tiny_model_dir), "--set", "x")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "tessera: error: faiss is not installed: pip install 'tessera[cpu]' "
        "(or 'tessera[gpu]' on a CUDA machine)"], out.stderr
    assert out.stdout == "" and not (tmp_path / "tessera-data" / "sets" / "x").exists()
    sets = run("sets")                                 # needs no faiss: its own answer (an empty root)
    assert "not installed" not in sets.stderr and "nothing was written there yet" in sets.stderr, sets.stderr


@pytest.mark.slow
def test_real_multilingual_model_on_the_sample(me5_small_dir, tmp_path):
    """multilingual-e5-small through the CLI: counts per language, and cross-language retrieval works."""
    out = tessera("embed", "--model", str(me5_small_dir), "--root", str(tmp_path / "s"), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads(out.stdout)
    assert manifest["dims"] == {"dense": 384, "colbert": 384} and manifest["counts"]["documents"] == 48

    from embedding.encoder import Encoder
    from embedding.model import load_model
    from storage import catalog, schemas
    from storage.fs import location

    con = catalog.connect(str(tmp_path / "s"))
    assert dict(con.execute("select lang, count(*) from documents group by lang").fetchall())["en"] == 8
    # the default codec: 4-bit residuals, 384 * 4 / 8 = 192 packed bytes per token
    assert con.execute("select nbits from embedding_sets").fetchall() == [(4,)]
    token_file = con.execute("select path from shards where kind = 'tokens' limit 1").fetchone()[0]
    first = schemas.read_table(location(token_file)).slice(0, 1).to_pylist()[0]
    assert len(first["residuals"]) == 192 * first["n_vectors"] == 192 * len(first["codes"])
    files = [r[0] for r in con.execute("select path from shards where kind = 'dense'").fetchall()]
    table = pa.concat_tables([schemas.read_table(location(f)) for f in files])
    ids = table.column("id").to_pylist()
    mat = schemas.dense_matrix(table).astype(np.float32)
    q = Encoder(load_model(me5_small_dir, device="cpu")).encode_queries(["Wie entsteht ein Vulkan?"])[0]
    top = [ids[i] for i in np.argsort(-mat @ q)[:5]]
    assert sum("volcano" in t for t in top) >= 4, top


def test_cli_index_search_eval(tiny_model_dir, tmp_path):
    """The issue-3 flow as a user types it: embed → index (dense and PLAID) → search → eval."""
    root = str(tmp_path / "store")
    assert tessera("embed", "--model", str(tiny_model_dir), "--set", "s", "--root", root, "--n-centroids", "32",
                   cwd=tmp_path).returncode == 0
    for kind in ("flat", "plaid"):
        out = tessera("index", "--set", "s", "--kind", kind, "--root", root, "--json", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout)["source"]["set"] == "s"
    text = next(json.loads(line) for line in SAMPLE.read_text().splitlines() if '"ru-volcanoes-1"' in line)["text"]
    out = tessera("search", "--index", "s-flat", "--root", root, "--json", "-k", "3", text, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    hits = json.loads(out.stdout)[0]["results"]
    assert hits[0]["id"] == "ru-volcanoes-1" and len(hits) == 3
    out = tessera("search", "--index", "s-plaid", "--root", root, "--json", "--lang", "fr", text, cwd=tmp_path)
    assert out.returncode == 0 and all(h["id"].startswith("fr-") for h in json.loads(out.stdout)[0]["results"])
    out = tessera("eval", "--index", "s-flat", "s-plaid", "--root", root, "--json",
                  "--queries", str(REPO / "jobs" / "data" / "sample_queries.jsonl"),
                  "--qrels", str(REPO / "jobs" / "data" / "sample_qrels.tsv"), "--out", str(tmp_path / "rep"),
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)["results"]
    for label in ("s-flat", "s-plaid"):
        assert 0.0 <= results[label]["overall"]["nDCG@10"] <= 1.0
        assert results[label]["overall"]["queries"] == 16
    assert (tmp_path / "rep" / "report.md").exists()
    same = tessera("eval", "--index", "s-flat", "--root", root, "--json", "--same-language",
                   "--queries", str(REPO / "jobs" / "data" / "sample_queries.jsonl"),
                   "--qrels", str(REPO / "jobs" / "data" / "sample_qrels.tsv"), "--out", str(tmp_path / "rep2"),
                   cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-2000:]
    # every query now only sees its own language's documents: fewer relevant ones reachable
    assert json.loads(same.stdout)["results"]["s-flat"]["overall"]["R@100"] < 1.0
    bad = tessera("search", "--index", "nope", "--root", root, "x", cwd=tmp_path)
    assert bad.returncode == 2 and "nope" in bad.stderr
    empty = tessera("search", "--index", "s-flat", "--root", root, " ", cwd=tmp_path)
    assert empty.returncode == 2 and "empty" in empty.stderr

    # issue 14 item 2: a --where filter is one expression over the documents columns; the two
    # attacks and more are refused before anything runs: exit 2, one line naming the part, no file content
    hostname = Path("/etc/hostname").read_text().strip()
    for where, named in (("cast((select content from read_text('/etc/hostname')) as int) = 1",
                          "a subquery is not allowed"),
                         ("1=1) union select 1 --", 'syntax error at or near ")"'),
                         ("lang = 'de'; select 1", "';'"),
                         ("nope > 1", "unknown column 'nope'")):
        out = tessera("-q", "search", "--index", "s-flat", "--root", root, "--where", where, "q", cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and named in lines[0], (where, out.stderr[-2000:])
        assert hostname not in out.stderr.replace("/etc/hostname", "") and out.stdout == ""
    out = tessera("search", "--index", "s-flat", "--root", root, "--json", "--where", "lang = 'de' and n_chars > 0",
                  text, cwd=tmp_path)
    assert out.returncode == 0 and all(h["id"].startswith("de-") for h in json.loads(out.stdout)[0]["results"])


# ---- options, defaults and choices: one home each ----------------------------------------------
def _parse(*argv: str):
    from jobs.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_left_out_options_take_the_job_configs_defaults(tmp_path):
    """An option left out is not passed: the config dataclass's own default applies (lr 5e-8,
    temperature 0.05, nbits, ... are written only there); a given option is passed as given."""
    from jobs.build_index import IndexConfig
    from jobs.commands import embed, evaluate, index, reindex, retune
    from jobs.embed import EmbedConfig
    from jobs.evaluate import EvalConfig
    from jobs.reindex import ReindexConfig
    from jobs.retune import RetuneConfig

    assert embed.to_config(_parse("embed"), tmp_path) == EmbedConfig(
        corpus=(str(SAMPLE),), model=str(tmp_path), set_name="sample")
    assert index.to_config(_parse("index", "--set", "s", "--kind", "hnsw")) == IndexConfig(set_name="s", kind="hnsw")
    assert evaluate.to_config(_parse("eval", "--index", "a", "b", "--queries", "q", "--qrels", "r")) == \
        EvalConfig(index=("a", "b"), queries="q", qrels="r")
    assert retune.to_config(_parse("retune", "--set", "s", "--index", "i", "--train", "t", "--force")) == \
        RetuneConfig(set_name="s", index="i", train="t", force=True)
    assert reindex.to_config(_parse("reindex", "--set", "s", "--corpus", "c")) == \
        ReindexConfig(set_name="s", corpus=("c",))

    given = embed.to_config(_parse("embed", "--nbits", "2", "--no-publish", "--id-column", "key", "--force",
                                   "--batch-size", "8", "--calls-per-actor", "2"), tmp_path)
    assert (given.nbits, given.publish, given.id_column, given.force, given.max_batch, given.calls_per_actor) == \
        (2, False, "key", True, 8, 2)
    tuned = retune.to_config(_parse("retune", "--set", "s", "--index", "i", "--train", "t", "--force",
                                    "--lr", "1e-7", "--no-in-batch", "--freeze", "a*", "--sweep-freeze", "none,b+c"))
    assert (tuned.lr, tuned.in_batch, tuned.freeze, tuned.sweep_freeze) == (1e-7, False, ("a*",), ((), ("b", "c")))


def test_kmeans_choices_are_the_codecs_and_reach_the_config(tmp_path):
    from embedding.codec import KMEANS_CHOICES
    from jobs.commands import embed
    from jobs.embed import EmbedConfig

    assert embed.KMEANS == KMEANS_CHOICES
    assert embed.to_config(_parse("embed"), tmp_path).kmeans == "auto"
    assert embed.to_config(_parse("embed", "--kmeans", "flat"), tmp_path).to_dict()["kmeans"] == "flat"
    assert embed.to_config(_parse("embed", "--kmeans", "two-level"), tmp_path).kmeans == "two-level"
    assert embed.to_config(_parse("embed", "--kmeans", "flat-bf16"), tmp_path).kmeans == "flat-bf16"
    assert embed.to_config(_parse("embed", "--kmeans", "progressive"), tmp_path).kmeans == "progressive"
    assert EmbedConfig(corpus=("c",), model="m", set_name="s").to_dict().get("kmeans") is None  # keys of old sets
    with pytest.raises(SystemExit):
        _parse("embed", "--kmeans", "fast")
    with pytest.raises(ValueError,
                       match="kmeans must be one of auto, flat, two-level, flat-bf16, progressive, got 'fast'"):
        EmbedConfig(corpus=("c",), model="m", set_name="s", kmeans="fast")


def test_help_quotes_the_configs_defaults(capsys):
    import dataclasses

    from jobs.cli import main
    from jobs.commands.common import plain
    from jobs.embed import DEFAULT_NBITS
    from jobs.retune import RetuneConfig

    lr = next(f.default for f in dataclasses.fields(RetuneConfig) if f.name == "lr")
    for argv, quoted in ((["retune", "--help"], f"(default {plain(lr)}, adiabatic)"),
                         (["embed", "--help"], f"1, 2 or 4 (default {DEFAULT_NBITS}: jobs.embed.DEFAULT_NBITS)")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        assert quoted in " ".join(capsys.readouterr().out.split())
    assert plain(5e-8) == "5e-8" and plain(0.05) == "0.05" and plain(4) == "4"


def test_choices_come_from_their_one_home():
    """The CLI's choice lists are the definitions themselves, not copies."""
    from embedding import model
    from indexing import dense, index_files, kinds
    from jobs import embed, evaluate, runtime
    from jobs.commands import common

    assert common.MODES is model.MODES is embed.MODES
    assert common.POOLINGS is model.POOLINGS
    assert common.INDEX_KINDS is kinds.INDEX_KINDS is index_files.INDEX_KINDS
    assert dense.KINDS is kinds.DENSE_KINDS and kinds.INDEX_KINDS == kinds.DENSE_KINDS + (kinds.PLAID,)
    assert common.DEVICES is runtime.DEVICES and common.EVAL_DEVICES == evaluate.DEVICES == ("cpu", "cuda")
    for pooling in common.POOLINGS:
        model.EncoderSettings(pooling=pooling)
    with pytest.raises(ValueError, match="pooling"):
        model.EncoderSettings(pooling="max")


def test_parsing_imports_no_job():
    """Parsing any command's options (and building its parser) imports neither numpy, faiss,
    torch, Ray nor a job module: ``--help`` and bad-input errors stay fast, and work without faiss."""
    script = (
        "import sys; sys.modules['faiss'] = None\n"
        "from jobs.cli import build_parser\n"
        "p = build_parser()\n"
        "for argv in (['embed', '--mode', 'dense', '--nbits', '2'], ['index', '--set', 's', '--kind', 'plaid'],\n"
        "             ['search', '--index', 'i', 'q'], ['eval', '--index', 'i', '--queries', 'q', '--qrels', 'r'],\n"
        "             ['retune', '--set', 's', '--index', 'i', '--train', 't'],\n"
        "             ['reindex', '--set', 's', '--corpus', 'c'],\n"
        "             ['gc'], ['rollback', '--set', 's', '--to', 'v000001'], ['model', 'fetch', 'me5-small']):\n"
        "    p.parse_args(argv)\n"
        "heavy = ('numpy', 'torch', 'ray', 'pyarrow', 'jobs.embed', 'jobs.retune', 'jobs.reindex', 'jobs.evaluate')\n"
        "print([m for m in heavy if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
