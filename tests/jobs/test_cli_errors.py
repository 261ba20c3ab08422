"""Failures as the user meets them (issue 14, items 3, 4, 6): one line on stderr naming the file,
row or URL, the exit code keeping its meaning (2 bad input, 1 failed), bad input refused before
Ray starts or a model loads, and nothing left behind by a refused run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import RAY_STATE, cli, free_port

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "jobs" / "data" / "sample_corpus.jsonl"
GOOD = '{"id": "a", "text": "a river"}'


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tessera:")]


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """Exactly one error line, the last one, naming every needle; no traceback, no Ray frames."""
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-4000:]
    assert stderr.strip().splitlines()[-1] == lines[0], stderr[-4000:]
    for bad in ("Traceback", "ray::", "\x1b[", "Exception occurred in", "An exception was raised from a task"):
        assert bad not in stderr, stderr[-4000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tessera(*args: str, cwd: Path, env: "dict | None" = None, timeout: float = 600):
    full = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    full.pop("TESSERA_FAILPOINTS", None)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def _fake_store(root: Path, model: Path) -> None:
    """A set ``t`` and an index ``t-flat`` as far as the early checks read them."""
    for kind, name, body in (("sets", "t", {"config": {"id_column": "id", "text_column": "text"},
                                            "model": {"path": str(model)}}),
                             ("indexes", "t-flat", {"source": {"set": "t", "version": "v000001"}})):
        d = root / kind / name
        (d / "v000001").mkdir(parents=True)
        (d / "v000001" / "manifest.json").write_text(json.dumps(body))
        (d / "CURRENT").write_text(json.dumps({"version": "v000001"}))


# ---- item 4: bad input is refused before Ray starts or a model loads ---------------------------
def test_bad_input_fails_in_a_second_without_importing_ray_or_torch(tiny_model_dir, tmp_path):
    """Every case runs in one fresh interpreter that must end without having imported ray or
    torch: the check comes before Ray's start-up and the model (15-23 s before the fix). A
    refused re-index is still recorded in the runs view."""
    root = tmp_path / "store"
    _fake_store(root, tiny_model_dir)
    (tmp_path / "c.csv").write_text("id,text\na,b\n")
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "part-0.csv").write_text("id,text\na,b\n")
    (tmp_path / "notext.jsonl").write_text('{"id": "a", "body": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "good.jsonl").write_text(GOOD + "\n")
    (tmp_path / "noconfig").mkdir()
    q, m, r = str(tmp_path / "good.jsonl"), str(tiny_model_dir), str(root)
    cases = [
        (["embed", "--corpus", str(tmp_path / "nope.jsonl"), "--model", m, "--root", r],
         "nope.jsonl: no such file or directory"),
        (["embed", "--corpus", str(tmp_path / "c.csv"), "--model", m, "--root", r], "c.csv: unsupported format .csv"),
        (["embed", "--corpus", str(tmp_path / "csvs"), "--model", m, "--root", r],
         "csvs: unsupported format .csv: no Parquet or JSONL files found"),
        (["embed", "--corpus", str(tmp_path / "notext.jsonl"), "--model", m, "--root", r],
         "notext.jsonl: line 1: missing text column 'text'"),
        (["embed", "--corpus", str(tmp_path / "empty.jsonl"), "--model", m, "--root", r], "empty.jsonl: empty file"),
        (["embed", "--corpus", q, "--model", str(tmp_path / "nomodel"), "--root", r], "nomodel"),
        (["embed", "--corpus", q, "--model", str(tmp_path / "noconfig"), "--root", r], "has no config.json"),
        (["embed", "--corpus", q, "--model", m, "--root", r, "--set", "../up"], "invalid set name '../up'"),
        (["index", "--set", "nope", "--kind", "flat", "--root", r], "no published set 'nope'"),
        (["index", "--set", "t", "--kind", "flat", "--root", r, "--name", "a b"], "invalid index name 'a b'"),
        (["reindex", "--set", "nope", "--corpus", q, "--root", r], "no embedding set 'nope'"),
        (["reindex", "--set", "t", "--corpus", str(tmp_path / "c.csv"), "--root", r], "unsupported format .csv"),
        (["reindex", "--set", "t", "--corpus", q, "--model", str(tmp_path / "noconfig"), "--root", r],
         "has no config.json"),
        (["eval", "--index", "nope", "--queries", q, "--qrels", q, "--root", r], "no published index 'nope'"),
        (["eval", "--index", "t-flat", "--queries", str(tmp_path / "q.jsonl"), "--qrels", q, "--root", r],
         "queries file"),
        (["retune", "--set", "t", "--index", "t-flat", "--train", str(tmp_path / "pairs.jsonl"), "--root", r],
         "training file"),
        (["retune", "--set", "t", "--index", "nope", "--train", q, "--root", r], "no published index 'nope'"),
        (["search", "--index", "t-flat", "--param", "nprobe=abc", "--root", r, "q"],
         "--param nprobe: expected a number, got 'abc'"),
        (["sets", "--root", str(tmp_path / "typo")], "no store at"),
    ]
    script = textwrap.dedent("""
        import contextlib, io, json, sys, time
        from jobs.cli import main
        out = []
        for argv, _ in json.loads(sys.argv[1]):
            err = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            out.append({"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - start})
        print(json.dumps({"runs": out, "ray": "ray" in sys.modules, "torch": "torch" in sys.modules}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    for (argv, needle), run in zip(cases, result["runs"]):
        assert run["code"] == 2, (argv, run)
        if argv[0] != "reindex":                                        # it logs its lease and run report
            assert run["stderr"].count("\n") == 1, (argv, run)        # stderr is that one line
        assert_one_line_error(run["stderr"], "tessera: error: ", needle)
        assert run["seconds"] < 5, (argv, run)                          # ~0.1 s on a quiet machine
    assert not result["ray"] and not result["torch"], result           # neither started nor imported
    reports = [json.loads(p.read_text()) for p in (root / "runs").glob("*.json")]
    assert sorted(r["status"] for r in reports) == ["bad_input"] * 3, reports


def test_missing_corpus_through_the_cli_starts_no_ray(tiny_model_dir, tmp_path):
    ray_dir = tmp_path / "raytmp"
    ray_dir.mkdir()
    start = time.monotonic()
    out = tessera("embed", "--corpus", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir), cwd=tmp_path,
                  env={"RAY_TMPDIR": str(ray_dir), "RAY_ADDRESS": None})
    elapsed = time.monotonic() - start
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert_one_line_error(out.stderr, "nope.jsonl: no such file or directory")
    assert list(ray_dir.iterdir()) == []                                # no Ray session was started
    assert elapsed < 10, elapsed                                        # was 15-23 s


# ---- item 3: errors raised inside Ray are one line --------------------------------------------
@pytest.mark.parametrize("lines, needles", [
    ([GOOD, '{"id": "b", "text": "x"', GOOD], ["bad.jsonl: line 2: invalid JSON: "]),
    ([GOOD, "", b'{"id": "b", "text": "caf\xe9"}', GOOD], ["bad.jsonl: line 3: not valid UTF-8 (byte "]),
    ([GOOD, '{"id": null, "text": "x"}'], ["bad.jsonl: line 2: null or empty id"]),
    ([GOOD, '{"id": "b", "body": "x"}'], ["bad.jsonl: line 2: missing text column 'text'"]),
    ([GOOD, '{"text": "x"}'], ["bad.jsonl: line 2: missing id column 'id'"]),
    ([GOOD, "", '{"id": "b", "text": "x"}', GOOD.replace("a river", "again")],
     ["1 duplicate id(s) in the corpus, first: 'a' (", "bad.jsonl line 1; ", "bad.jsonl line 4)"]),
], ids=["json", "utf8", "null-id", "no-text", "no-id", "duplicate"])
def test_corpus_errors_found_by_ray_tasks_are_one_line(ray_local, tiny_model_dir, tmp_path, capsys, lines, needles):
    """Past the first line the corpus is checked by Ray tasks; their errors used to print 17-35
    lines starting ``ray::scan_file() (pid=...)`` with ANSI codes. JSONL lines are 1-based."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    code, _, err = cli(capsys, "embed", "--corpus", str(path), "--model", str(tiny_model_dir), "--set", "t",
                       "--root", str(tmp_path / "store"), "--mode", "dense")
    assert code == 2
    assert_one_line_error(err, "tessera: error: ", *needles)
    assert not (tmp_path / "store" / "sets").exists()


def test_traceback_flag_after_the_subcommand(ray_local, tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + '\n{"id": null, "text": "x"}\n')
    code, _, err = cli(capsys, "embed", "--corpus", str(path), "--model", str(tiny_model_dir), "--root",
                       str(tmp_path / "s"), "--mode", "dense", "--traceback")
    assert code == 2 and "Traceback (most recent call last)" in err
    assert error_lines(err) == [f"tessera: error: {path}: line 2: null or empty id"]


@pytest.mark.parametrize("mode", ["dense", "both"])
def test_all_empty_texts_are_refused_and_leave_nothing(ray_local, tiny_model_dir, tmp_path, capsys, mode):
    """The run claimed a version first: its ``_claim.json`` folder stayed and the set showed in
    every "known:" list."""
    path = tmp_path / "empty-texts.jsonl"
    path.write_text('{"id": "a", "text": ""}\n{"id": "b", "text": "   "}\n{"id": "c", "text": null}\n')
    code, _, err = cli(capsys, "embed", "--corpus", str(path), "--model", str(tiny_model_dir), "--set", "e",
                       "--root", str(tmp_path / "store"), "--mode", mode, "--n-centroids", "4")
    assert code == 2
    assert_one_line_error(err, "tessera: error: every text in the corpus is empty (3 rows in 1 file(s)")
    assert not (tmp_path / "store" / "sets" / "e").exists()
    code, _, err = cli(capsys, "index", "--set", "x", "--kind", "flat", "--root", str(tmp_path / "store"))
    assert code == 2 and "(known: none)" in err


@pytest.mark.parametrize("mode", ["dense", "both"])
def test_worker_failure_through_the_cli_is_one_line_naming_shard_file_and_records(ray_local, tiny_model_dir,
                                                                                 tmp_path, mode):
    """A failure inside a Ray Data actor (dense) or a pass-2 task (both: the small corpus is all
    in the codec sample), through a real ``tessera`` process (joined to the session's Ray):
    exit 1, the last line names the shard, the file and its records."""
    out = tessera("embed", "--model", str(tiny_model_dir), "--set", "f", "--root", str(tmp_path / "s"),
                  "--mode", mode, "--rows-per-shard", "24", "--n-centroids", "16", cwd=tmp_path,
                  env={"TESSERA_FAILPOINTS": "embed.shard=1", "RAY_ADDRESS": RAY_STATE["local_address"]})
    assert out.returncode == 1, out.stderr[-4000:]
    assert_one_line_error(out.stderr, f"tessera: failed: ShardError: shard 1 ({SAMPLE}, records 25-48): "
                                      "RuntimeError: failpoint embed.shard=1 triggered")


def test_bad_json_inside_ray_through_the_cli(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace('"a"', '"b"') + "\n{oops\n")
    out = tessera("embed", "--corpus", str(path), "--model", str(tiny_model_dir), "--root", str(tmp_path / "s"),
                  "--mode", "dense", cwd=tmp_path, env={"RAY_ADDRESS": RAY_STATE["local_address"]})
    assert out.returncode == 2
    assert_one_line_error(out.stderr, f"tessera: error: {path}: line 3: invalid JSON: Expecting property name "
                                      "enclosed in double quotes at column 2")


# ---- S3: a missing bucket, an unreachable endpoint ------------------------------------------------
def test_sets_on_a_missing_bucket_is_an_error(s3_bucket, capsys):
    """It printed "(0 rows)" and exited 0."""
    code, out, err = cli(capsys, "sets", "--root", f"{s3_bucket}-missing/store")
    assert code == 2 and out == ""
    assert_one_line_error(err, f"tessera: error: {s3_bucket}-missing/store: no such bucket")
    code, out, err = cli(capsys, "sets", "--root", f"{s3_bucket}/store")    # the bucket exists: nothing in it yet
    assert code == 0 and err == "" and out.strip().endswith("(0 rows)")


def test_s3_outage_is_one_line_with_the_url_and_the_reason(s3_bucket, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    out = tessera("sets", "--root", f"{s3_bucket}/store", cwd=tmp_path,
                  env={"AWS_ENDPOINT_URL": dead, "AWS_MAX_ATTEMPTS": "1"}, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert_one_line_error(out.stderr, f"tessera: failed: StorageUnavailable: check {s3_bucket}: gave up after 5 "
                                      "attempts: EndpointConnectionError: Could not connect to the endpoint URL",
                          dead)
