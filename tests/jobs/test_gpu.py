"""The CUDA paths on a real GPU: skipped where torch sees none (CI); run on a GPU machine.

They use no S3 server and no DuckDB, so that they run where only torch, transformers,
pyarrow, Ray and faiss are installed (``benchmarks/device_gpu.sh`` runs them there).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import ensure_local_ray
from jobs.embed import EmbedConfig, run
from jobs.embed_pool import done_shards
from storage import schemas
from storage.fs import location
from storage.manifest import Artifact
from tests.helpers import sample_docs, write_jsonl

pytestmark = pytest.mark.gpu


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_encoder_on_cuda_runs_in_half_precision_and_matches_cpu(tiny_model_dir):
    import torch

    from embedding.encoder import Encoder
    from embedding.model import load_model

    texts = [r["text"] for r in sample_docs(40)]
    gpu_lm = load_model(tiny_model_dir, device="cuda")
    assert gpu_lm.device.type == "cuda"
    assert next(gpu_lm.model.parameters()).dtype in (torch.bfloat16, torch.float16)
    gpu = Encoder(gpu_lm).encode_documents(texts, dense=True, colbert=True)
    cpu = Encoder(load_model(tiny_model_dir, device="cpu")).encode_documents(texts, dense=True, colbert=True)

    assert gpu.dense.dtype == cpu.dense.dtype and gpu.dense.shape == cpu.dense.shape
    assert np.all(np.isfinite(gpu.dense))
    assert _cos(gpu.dense.astype(np.float32), cpu.dense.astype(np.float32)).min() > 0.99
    assert [len(t) for t in gpu.tokens] == [len(t) for t in cpu.tokens]
    tok_cos = _cos(np.concatenate(gpu.tokens).astype(np.float32), np.concatenate(cpu.tokens).astype(np.float32))
    assert tok_cos.mean() > 0.99 and tok_cos.min() > 0.9


def test_codec_kmeans_and_compression_on_cuda_match_faiss_and_numpy():
    from embedding.codec import ResidualCodec

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(60, 96))
    x = centres[rng.integers(0, 60, 30000)] + 0.5 * rng.normal(size=(30000, 96))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cpu = ResidualCodec.fit(x, 2, 512, seed=0, niter=4)
    gpu = ResidualCodec.fit(x, 2, 512, seed=0, niter=4, device="cuda")
    np.testing.assert_allclose(gpu.centroids, cpu.centroids, atol=1e-4)
    assert np.mean(cpu.assign(x) == gpu.assign(x)) > 0.999
    codes, packed = cpu.compress(x)
    codes_gpu, packed_gpu = cpu.compress(x, device="cuda")
    assert np.mean(codes == codes_gpu) > 0.999 and np.mean(packed == packed_gpu) > 0.999


def _stored_dense(root, manifest) -> dict[str, np.ndarray]:
    vdir = Artifact(location(str(root)), "sets", "g").version_dir(manifest["version"])
    table = pa.concat_tables([schemas.read_table(vdir.join(e["path"]))
                              for e in manifest["files"] if e["kind"] == "dense"])
    return dict(zip(table.column("id").to_pylist(), schemas.dense_matrix(table).astype(np.float32)))


def test_embed_job_encodes_on_the_gpu_and_stores_what_the_cpu_job_stores(ray_session_tmp, tiny_model_dir,
                                                                          tmp_path):
    ray = ensure_local_ray(num_cpus=4)
    assert ray.cluster_resources().get("GPU", 0) >= 1
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(120))
    runs = {}
    for device in ("cuda", "cpu"):
        cfg = EmbedConfig(corpus=(corpus,), model=str(tiny_model_dir), set_name="g", root=str(tmp_path / device),
                          mode="both", nbits=2, rows_per_shard=32, n_centroids=16, max_batch=16, device=device)
        runs[device] = run(cfg)
    gpu, cpu = runs["cuda"], runs["cpu"]
    assert gpu["workers"]["device"] == "cuda" and gpu["workers"]["num_gpus"] == 1.0
    assert cpu["workers"]["device"] == "cpu"
    assert gpu["counts"]["documents"] == cpu["counts"]["documents"] == 120
    assert gpu["counts"]["tokens"] == cpu["counts"]["tokens"]
    a, b = _stored_dense(tmp_path / "cuda", gpu), _stored_dense(tmp_path / "cpu", cpu)
    assert a.keys() == b.keys()
    ids = sorted(a)
    assert _cos(np.stack([a[i] for i in ids]), np.stack([b[i] for i in ids])).min() > 0.99
    # Every shard was in the codec sample: pass 2 compressed them on the GPU in the codec
    # fit's own worker (CUDA started once), not in a new encoder pool.
    markers = done_shards(Artifact(location(str(tmp_path / "cuda")), "sets", "g").version_dir(gpu["version"]))
    assert len(markers) == 4 and all(m["warm_gpu_worker"] for m in markers.values())
