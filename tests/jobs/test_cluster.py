"""Multi-node behaviour: a two-node Ray cluster on this machine, corpus and store on s3://."""
from __future__ import annotations

import json

import pytest

from conftest import start_two_node_cluster, stop_cluster
from jobs.embed import EmbedConfig, run
from storage import catalog
from storage.fs import location


@pytest.fixture
def two_nodes(ray_session_tmp, s3_server, tmp_path):
    cluster = start_two_node_cluster(tmp_path)
    yield cluster
    stop_cluster(cluster)


def test_two_node_cluster_writes_to_s3(two_nodes, tiny_model_dir, s3_bucket):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    rows = [{"id": f"n{i:03d}", "text": f"document number {i} about rivers and bread", "lang": "en"}
            for i in range(60)]
    location(f"{s3_bucket}/in/c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = f"{s3_bucket}/store"
    manifest = run(EmbedConfig(corpus=(f"{s3_bucket}/in/c.jsonl",), model=str(tiny_model_dir), set_name="multi",
                               root=root, rows_per_shard=10, n_centroids=16, mode="both"))
    assert manifest["counts"]["documents"] == 60 and manifest["counts"]["shards"] == 6
    assert catalog.query(root, "select count(distinct id), count(*) from documents")[1] == [(60, 60)]
    assert catalog.query(root, "select count(*) from shards where kind = 'tokens'")[1] == [(6,)]
