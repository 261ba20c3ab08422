"""Sanity checks for the shared fixtures in conftest.py / fixtures_models.py."""

from __future__ import annotations

import json
import os

import pytest

from conftest import start_two_node_cluster, stop_cluster
from fixtures_models import ALL_TEXTS, build_tiny_model

# --------------------------------------------------------------------------- models


def _load(model_dir):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model, info = AutoModel.from_pretrained(str(model_dir), output_loading_info=True)
    model.eval()
    return tok, model, info


def test_offline_env():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_tiny_model_loads_and_encodes(tiny_model_dir):
    import torch

    tok, model, info = _load(tiny_model_dir)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert (tiny_model_dir / "vocab.txt").is_file()
    assert len(tok) == model.config.vocab_size == 2000
    assert tok.model_max_length == 512
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2

    # Cased, multilingual, no [UNK] on the training sentences.
    assert tok.tokenize("Hello") != tok.tokenize("hello")
    ids = [i for t in ALL_TEXTS for i in tok(t)["input_ids"]]
    assert tok.unk_token_id not in ids

    batch = tok(["Der schnelle braune Fuchs.", "敏捷的棕色狐狸跳过了懒惰的狗。", "Быстрая лиса"],
                padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tok.cls_token_id
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape == (3, batch["input_ids"].shape[1], 32)
    assert torch.isfinite(out).all()


def test_tiny_model_build_is_deterministic(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "vocab.txt", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_tiny_colbert_layout(tiny_colbert_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_colbert_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        linear = f.get_tensor("linear.weight")
        word_emb = f.get_tensor("bert.embeddings.word_embeddings.weight")
    assert linear.shape == (16, 32)
    assert all(k.startswith("bert.") for k in keys - {"linear.weight"})

    tok, model, info = _load(tiny_colbert_dir)
    # The "bert." prefix is stripped by transformers (base_model_prefix); only the
    # projection is left over.
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert set(info["unexpected_keys"]) == {"linear.weight"}
    assert (model.embeddings.word_embeddings.weight == word_emb).all()
    assert json.loads((tiny_colbert_dir / "config.json").read_text())["architectures"] == ["HF_ColBERT"]

    meta = json.loads((tiny_colbert_dir / "artifact.metadata").read_text())
    assert meta == {"query_token_id": "[unused0]", "doc_token_id": "[unused1]", "dim": 16,
                    "query_maxlen": 32, "doc_maxlen": 180}
    q_id, d_id = tok.convert_tokens_to_ids(["[unused0]", "[unused1]"])
    assert (q_id, d_id) == (5, 6)
    assert tok.tokenize("[unused0] hi")[0] == "[unused0]"
    assert "[unused0]" in (tiny_colbert_dir / "vocab.txt").read_text().splitlines()


def test_tiny_pylate_layout(tiny_pylate_dir):
    from safetensors import safe_open

    modules = json.loads((tiny_pylate_dir / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "sentence_transformers.models.Transformer", "pylate.models.Dense.Dense"]
    dense_cfg = json.loads((tiny_pylate_dir / "1_Dense" / "config.json").read_text())
    assert dense_cfg == {"in_features": 32, "out_features": 16, "bias": False,
                         "activation_function": "torch.nn.modules.linear.Identity"}
    with safe_open(str(tiny_pylate_dir / "1_Dense" / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"linear.weight"}
        assert f.get_tensor("linear.weight").shape == (16, 32)
    st_cfg = json.loads((tiny_pylate_dir / "config_sentence_transformers.json").read_text())
    assert (st_cfg["query_prefix"], st_cfg["document_prefix"]) == ("[Q] ", "[D] ")

    tok, model, info = _load(tiny_pylate_dir)
    assert not any(info.values()), info
    q_id, d_id = tok.convert_tokens_to_ids(["[Q] ", "[D] "])
    assert (q_id, d_id) == (2000, 2001)
    assert len(tok) == model.config.vocab_size == 2002
    assert tok.tokenize("[Q] hello")[0] == "[Q] "


def test_tiny_model_no_weights(tiny_model_no_weights_dir):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    assert AutoConfig.from_pretrained(str(tiny_model_no_weights_dir)).hidden_size == 32
    assert len(AutoTokenizer.from_pretrained(str(tiny_model_no_weights_dir))) == 2000
    assert not list(tiny_model_no_weights_dir.glob("*.safetensors"))
    with pytest.raises(OSError):
        AutoModel.from_pretrained(str(tiny_model_no_weights_dir))


# --------------------------------------------------------------------------- S3


def test_s3_env(s3_server):
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"


def test_s3fs_round_trip(s3_bucket):
    import s3fs

    assert s3_bucket.startswith("s3://tessera-")
    # No arguments: botocore takes the endpoint from AWS_ENDPOINT_URL.
    fs = s3fs.S3FileSystem()
    path = f"{s3_bucket}/dir/hello.txt"
    fs.pipe(path, "grüß dich 你好".encode())
    assert fs.cat(path).decode() == "grüß dich 你好"
    assert fs.ls(f"{s3_bucket}/dir") == [path.removeprefix("s3://")]

    explicit = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], key="testing",
                                 secret="testing", skip_instance_cache=True)
    assert explicit.cat(path) == fs.cat(path)


def test_s3_bucket_is_fresh(s3_bucket):
    import s3fs

    assert s3fs.S3FileSystem().ls(s3_bucket) == []


def test_parquet_round_trip_via_s3fs_and_arrow(s3_bucket):
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import s3fs

    table = pa.table({"id": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]})
    fs = s3fs.S3FileSystem()
    key = f"{s3_bucket.removeprefix('s3://')}/t/part-0.parquet"
    pq.write_table(table, key, filesystem=fs)
    assert pq.read_table(key, filesystem=fs).equals(table)
    # pyarrow's own S3 client: from_uri honours AWS_ENDPOINT_URL (a bare
    # pyarrow.fs.S3FileSystem() does not; pass endpoint_override there).
    arrow_fs, arrow_path = pafs.FileSystem.from_uri(f"s3://{key}")
    assert arrow_path == key
    assert pq.read_table(arrow_path, filesystem=arrow_fs).equals(table)


# --------------------------------------------------------------------------- Ray


def test_ray_local_map_batches(ray_local):
    ray = ray_local
    import ray.data  # noqa: F811 - the fixture's module, with its data package loaded

    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 2
    assert ray.data.DataContext.get_current().enable_progress_bars is False
    ds = ray.data.range(100, override_num_blocks=4).map_batches(
        lambda b: {"id": b["id"], "sq": b["id"] ** 2}, batch_size=16)
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["sq"] for r in rows] == [i * i for i in range(100)]


def test_ray_workers_reach_s3(ray_local, s3_bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    ray = ray_local
    import ray.data  # noqa: F811 - the fixture's module, with its data package loaded

    @ray.remote
    def worker_env():
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray.get(worker_env.remote()) == os.environ["AWS_ENDPOINT_URL"]
    table = pa.table({"id": list(range(10))})
    pq.write_table(table, f"{s3_bucket.removeprefix('s3://')}/in/p.parquet", filesystem=s3fs.S3FileSystem())
    ds = ray.data.read_parquet(f"{s3_bucket}/in/")
    assert sorted(r["id"] for r in ds.take_all()) == list(range(10))


def test_two_node_cluster(ray_session_tmp, s3_server, tmp_path):
    import ray

    cluster = start_two_node_cluster(tmp_path)
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2
        assert ray.cluster_resources()["CPU"] == 2

        @ray.remote(num_cpus=1)
        def where():
            import time

            time.sleep(0.5)
            return ray.get_runtime_context().get_node_id()

        assert len(set(ray.get([where.remote() for _ in range(4)]))) == 2
    finally:
        stop_cluster(cluster)
    assert not ray.is_initialized()


def test_ray_local_restarts_after_cluster(ray_local):
    ray = ray_local
    assert ray.is_initialized()
    assert len(ray.nodes()) == 1 and ray.cluster_resources()["CPU"] == 2
    assert ray.get(ray.put(41)) + 1 == 42


# --------------------------------------------------------------------------- data


def test_shared_data_dir(shared_data_dir):
    assert shared_data_dir.is_dir()
    assert shared_data_dir.name == "data" and shared_data_dir.parent.name == "shared"


def test_me5_small_dir(me5_small_dir):
    assert (me5_small_dir / "model.safetensors").is_file()
    assert (me5_small_dir / "config.json").is_file()
