"""Invariants of the pure planners: shards cover every row once; the codec sample."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.plan import build_pieces, id_keys, plan_sample, sample_size

SETTINGS = settings(max_examples=80, deadline=None)


@SETTINGS
@given(st.lists(st.integers(0, 40), min_size=0, max_size=6), st.integers(1, 9))
def test_pieces_cover_every_row_once_in_order(rows_per_file, per_shard):
    pieces = build_pieces(rows_per_file, per_shard)
    assert [p.shard for p in pieces] == list(range(len(pieces)))
    for f, n in enumerate(rows_per_file):
        mine = [p for p in pieces if p.file == f]
        assert [(p.start, p.end) for p in mine] == [(s, min(n, s + per_shard)) for s in range(0, n, per_shard)]


def _global(plan, pieces):
    at = {p.shard: sum(q.rows for q in pieces[:i]) for i, p in enumerate(pieces)}
    return sorted(at[s] + r for s, rows in plan.items() for r in rows)


@SETTINGS
@given(st.lists(st.integers(0, 30), min_size=1, max_size=5), st.integers(1, 8), st.data(), st.booleans())
def test_sample_is_the_asked_size_without_repeats(rows_per_file, per_shard, data, by_id):
    pieces = build_pieces(rows_per_file, per_shard)
    total = sum(rows_per_file)
    n = data.draw(st.integers(0, total))
    keys = [id_keys([f"d{f}-{r}" for r in range(k)], 0) for f, k in enumerate(rows_per_file)] if by_id else None
    plan = plan_sample(pieces, n, 0, keys)
    rows = _global(plan, pieces)
    assert len(rows) == len(set(rows)) == n and all(0 <= r < total for r in rows)
    for shard, offsets in plan.items():
        assert offsets == sorted(offsets) and all(0 <= o < pieces[shard].rows for o in offsets)
    assert plan == plan_sample(pieces, n, 0, keys)


def test_sample_by_id_survives_a_changed_snapshot():
    """1% of the documents deleted and as many added: the sampled ids barely change
    (a positional draw would pick a different half of the corpus)."""
    rng = np.random.default_rng(0)
    ids = [f"doc-{i}" for i in range(100_000)]
    gone = set(rng.choice(len(ids), 1000, replace=False).tolist())
    after = [d for i, d in enumerate(ids) if i not in gone] + [f"new-{i}" for i in range(1000)]
    n = sample_size(len(ids))
    assert n < len(ids) // 2 + 10_000   # a real sample, not the whole corpus

    def sampled(doc_ids, keys):
        plan = plan_sample(build_pieces([len(doc_ids)], 1000), n, 0, keys)
        return {doc_ids[s * 1000 + r] for s, rows in plan.items() for r in rows}

    by_id = sampled(ids, [id_keys(ids, 0)]), sampled(after, [id_keys(after, 0)])
    positional = sampled(ids, None), sampled(after, None)
    assert len(by_id[0] ^ by_id[1]) <= 2 * 1000 + 50   # only the changed documents move (and a few at the cut)
    assert len(positional[0] ^ positional[1]) > 10 * len(by_id[0] ^ by_id[1])
    assert sampled(ids, [id_keys(ids, 1)]) != by_id[0]                  # the seed picks another sample


def test_sample_keys_must_cover_the_pieces():
    with pytest.raises(ValueError, match="keys cover"):
        plan_sample(build_pieces([5], 2), 2, 0, [np.zeros(4, np.uint64)])
    with pytest.raises(ValueError, match="cannot sample"):
        plan_sample(build_pieces([5], 2), 6, 0)


@pytest.mark.parametrize("cpus,threads", [(1, 1), (2, 2), (16, 16)])
def test_cpu_pool_leaves_a_cpu_and_gives_blas_the_actor_threads(cpus, threads):
    """One CPU stays unreserved for Ray Data; OpenMP/BLAS (faiss k-means, numpy's centroid
    search) get the actor's torch threads, not the 1 Ray would set from the reservation."""
    from jobs.runtime import plan_actors, thread_env

    p = plan_actors(cpus, 0)
    assert p.actors == 1 and p.threads == threads and p.device == "cpu"
    assert p.num_cpus * p.actors <= max(cpus - 1, 0.5)
    assert thread_env(p)["OMP_NUM_THREADS"] == str(threads) == thread_env(p)["OPENBLAS_NUM_THREADS"]
    # the fast tokenizer on the same threads (Rayon), off with one
    assert thread_env(p)["RAYON_NUM_THREADS"] == str(threads)
    assert thread_env(p)["TOKENIZERS_PARALLELISM"] == ("true" if threads > 1 else "false")


def test_auto_rows_per_shard_gives_short_texts_larger_shards_within_bounds():
    from jobs.plan import AUTO_ROWS_PER_SHARD, SHARD_TEXT_BYTES, auto_rows_per_shard

    lo, hi = AUTO_ROWS_PER_SHARD
    assert auto_rows_per_shard(34.4) == hi == 4096       # Tatoeba sentences
    assert auto_rows_per_shard(1143.2) == lo == 1024     # XQuAD paragraphs: the old fixed default
    assert auto_rows_per_shard(400) == 2048
    assert auto_rows_per_shard(100_000) == lo and auto_rows_per_shard(0.01) == hi
    assert auto_rows_per_shard(None) == lo and auto_rows_per_shard(0) == lo
    for per_row in (1, 33, 257, 511, 512, 513, 700, 5000):
        rows = auto_rows_per_shard(per_row)
        assert rows & (rows - 1) == 0 and lo <= rows <= hi   # a power of two: multiples of the old stride
        assert rows == lo or rows * per_row <= SHARD_TEXT_BYTES
        assert rows == hi or 2 * rows * per_row > SHARD_TEXT_BYTES   # the largest that fits


def test_arrow_pool_is_the_system_allocator_unless_the_user_names_one(monkeypatch, caplog):
    """A job's processes give Arrow glibc's allocator (mimalloc, pyarrow's default, returns
    freed memory at once, and first touches of fresh pages are slow on some machines);
    ``$ARROW_DEFAULT_MEMORY_POOL`` wins, and a name this pyarrow lacks leaves the pool as it is."""
    import pyarrow as pa

    from jobs.runtime import ARROW_POOL_ENV, arrow_pool

    before = pa.default_memory_pool()
    try:
        pa.set_memory_pool(pa.mimalloc_memory_pool())
        monkeypatch.delenv(ARROW_POOL_ENV, raising=False)
        arrow_pool()
        assert pa.default_memory_pool().backend_name == "system"
        values = pa.array(list(range(1000)), pa.int64())   # allocated by Arrow, in the new pool
        assert pa.system_memory_pool().bytes_allocated() >= values.nbytes == 8000
        arrow_pool()                                    # idempotent
        assert pa.default_memory_pool().backend_name == "system"
        monkeypatch.setenv(ARROW_POOL_ENV, "jemalloc")  # the user's choice, set after the first allocation too
        arrow_pool()
        assert pa.default_memory_pool().backend_name == "jemalloc"
        monkeypatch.setenv(ARROW_POOL_ENV, "no-such-pool")
        with caplog.at_level("WARNING", logger="jobs.runtime"):
            arrow_pool()
        assert pa.default_memory_pool().backend_name == "jemalloc"
        assert "ARROW_DEFAULT_MEMORY_POOL='no-such-pool': no such Arrow memory pool" in caplog.text
    finally:
        pa.set_memory_pool(before)


def test_small_pages_turns_numpy_hugepages_off_inside_unless_the_user_said(monkeypatch):
    """The fit task stops numpy's MADV_HUGEPAGE (synchronous compaction on first touch) while
    it fits, and gives the worker numpy's setting back; ``$NUMPY_MADVISE_HUGEPAGE``, which
    numpy itself read at import, wins."""
    import numpy as np

    from jobs.runtime import NUMPY_HUGEPAGE_ENV, small_pages

    switch = np._core.multiarray._set_madvise_hugepage
    before = switch(True)
    try:
        monkeypatch.delenv(NUMPY_HUGEPAGE_ENV, raising=False)
        with small_pages():
            assert switch(False) is False       # off inside
        assert switch(True) is True             # on again after
        with pytest.raises(RuntimeError), small_pages():
            raise RuntimeError("a failed fit")
        assert switch(True) is True             # also after a failure
        monkeypatch.setenv(NUMPY_HUGEPAGE_ENV, "1")
        with small_pages():
            assert switch(True) is True         # left as the user's setting made it
    finally:
        switch(before)


def test_a_worker_that_started_cuda_fits_only_tasks_given_the_same_gpus(monkeypatch):
    from jobs.runtime import CUDA_AT_START_ENV, cuda_worker_fits, mark_cuda_worker

    monkeypatch.delenv(CUDA_AT_START_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cuda_worker_fits()  # nothing started here yet: any GPUs do
    mark_cuda_worker()
    assert cuda_worker_fits()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # a later task, given another GPU
    assert not cuda_worker_fits()
    mark_cuda_worker()  # the first task's GPUs stay recorded: CUDA starts once per process
    assert not cuda_worker_fits()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cuda_worker_fits()


def test_token_groups_cut_a_shard_into_whole_document_runs():
    """Runs of at least ``target`` tokens (the last may be shorter), documents never split."""
    from jobs.plan import token_groups

    assert token_groups([3, 3, 3, 3, 1], 6) == [0, 2, 4, 5]
    assert token_groups([10, 1, 1], 4) == [0, 1, 3]        # a long document is one run
    assert token_groups([2, 2], 100) == [0, 2]              # below the target: one run
    assert token_groups([], 4) == [0, 0]
    assert token_groups([5, 5], 5) == [0, 1, 2]             # the last document alone is no empty run


def test_pass_two_compression_shared_by_threads_gives_the_same_bytes(monkeypatch):
    """ShardEncoder.compress_tokens on a thread pool (pass 2's tasks): runs of documents compressed
    on any thread give byte for byte the codes and residuals of one call, and the same
    residual sum up to float rounding."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import jobs.embed_worker as worker
    from embedding.codec import ResidualCodec

    rng = np.random.default_rng(0)
    codec = ResidualCodec.fit(rng.standard_normal((2000, 32)).astype(np.float32), 2, 64, seed=0, niter=2)
    docs = [rng.standard_normal((int(n), 32)).astype(np.float16) for n in rng.integers(0, 40, 300)]
    monkeypatch.setattr(worker, "COMPRESS_GROUP_TOKENS", 500)
    whole = codec.compress_with_residual_sum(docs)

    class Counted(ThreadPoolExecutor):
        runs = 0

        def submit(self, fn, *args, **kwargs):
            Counted.runs += 1
            return super().submit(fn, *args, **kwargs)

    with Counted(2) as pool:
        fake = SimpleNamespace(spec=SimpleNamespace(device="cpu"), codec=codec, compress_pool=pool)
        shared = worker.ShardEncoder.compress_tokens(fake, docs)
        alone = worker.ShardEncoder.compress_tokens(SimpleNamespace(spec=fake.spec, codec=codec, compress_pool=None),
                                                    docs)
    assert np.array_equal(shared[0], whole[0]) and np.array_equal(shared[1], whole[1])
    assert shared[2] == pytest.approx(whole[2], rel=1e-12) and alone[2] == whole[2]
    assert Counted.runs == len(worker.token_groups([len(d) for d in docs], 500)) - 1 > 10  # on the pool


def test_ray_init_runs_from_the_code_root_and_the_working_directory_comes_back(tmp_path, monkeypatch):
    """init_ray calls ray.init inside code_root_cwd: Ray's workers then put the folder Tessera is
    imported from, not the user's working directory, first on their sys.path."""
    import jobs
    from jobs.runtime import CODE_ROOT, code_root_cwd

    assert Path(jobs.__file__).resolve().parent.parent == Path(CODE_ROOT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_TMPDIR", "ray-tmp")                 # relative: as Ray would have read it here
    with code_root_cwd():
        assert os.getcwd() == CODE_ROOT
        assert os.environ["RAY_TMPDIR"] == str(tmp_path / "ray-tmp")
    assert os.getcwd() == str(tmp_path)
    with pytest.raises(RuntimeError), code_root_cwd():
        raise RuntimeError("ray.init failed")
    assert os.getcwd() == str(tmp_path)
    monkeypatch.setattr("jobs.runtime.CODE_ROOT", str(tmp_path / "tessera.zip" / "site"))  # not a folder
    with code_root_cwd():
        assert os.getcwd() == str(tmp_path)                   # Ray's default then, not a failed job
    with pytest.raises(RuntimeError) as failed, code_root_cwd():
        raise RuntimeError("ray.init failed")
    assert failed.value.__context__ is None                    # not raised while handling the chdir's OSError
