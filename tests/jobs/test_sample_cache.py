"""The embed job's codec-sample cache: what pass 1 writes, pass 2 and the fit read back."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import jobs.sample_cache as sc
from embedding.vectors import DocumentVectors
from jobs.sample_cache import (
    cache_table,
    cached_names,
    read_cache,
    read_cache_table,
    read_cache_tokens,
    read_sample_tokens,
    sample_cache,
    write_cache,
)
from storage.fs import Location

DIM = 8


def _encodings(lengths, dense=True, seed=0):
    rng = np.random.default_rng(seed)
    tokens = [rng.standard_normal((n, DIM)).astype(np.float32) for n in lengths]
    return DocumentVectors(rng.standard_normal((len(lengths), 5)).astype(np.float32) if dense else None,
                           tokens, np.array([n + 2 for n in lengths], np.int32),
                           np.array([i % 2 == 0 for i in range(len(lengths))]))


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("dense", [True, False])
def test_cache_round_trip_row_by_row(tmp_path, monkeypatch, dense, large):
    if large:  # past int32 offsets the columns are large_binary: pretend the limit is tiny
        monkeypatch.setattr(sc, "BINARY_MAX_BYTES", 16)
    lengths = [3, 1, 0, 7, 2]
    enc = _encodings(lengths, dense)
    offsets = [4, 9, 10, 17, 30]
    loc = sample_cache(Location(str(tmp_path / "v1")), 3)
    write_cache(loc, cache_table(offsets, enc))
    assert read_cache_table(loc).schema.field("tokens").type == (pa.large_binary() if large else pa.binary())
    out = read_cache(loc, DIM)
    assert sorted(out) == offsets
    for i, o in enumerate(offsets):
        dense_vec, tokens, n_tokens, truncated = out[o]
        assert tokens.dtype == np.float16 and tokens.shape == (lengths[i], DIM)  # as stored: compress converts
        np.testing.assert_array_equal(tokens, enc.tokens[i].astype(np.float16))
        assert n_tokens == lengths[i] + 2 and truncated == (i % 2 == 0)
        if dense:
            np.testing.assert_array_equal(dense_vec, enc.dense[i])
        else:
            assert dense_vec is None
    all_tokens = read_cache_tokens(loc, DIM)
    assert all_tokens.dtype == np.float16
    np.testing.assert_array_equal(all_tokens, np.concatenate(enc.tokens).astype(np.float16))


def test_cache_records_the_encoder_s_precision(tmp_path):
    vdir = Location(str(tmp_path / "v1"))
    write_cache(sample_cache(vdir, 0), cache_table([0, 1], _encodings([2, 3], True), "bfloat16"))
    write_cache(sample_cache(vdir, 1), cache_table([], None, "float32"))
    write_cache(sample_cache(vdir, 2), cache_table([0], _encodings([1], True)))  # none recorded
    assert [sc.read_cache_and_precision(sample_cache(vdir, s), DIM)[1] for s in range(3)] == [
        "bfloat16", "float32", None]
    rows, _ = sc.read_cache_and_precision(sample_cache(vdir, 0), DIM)
    assert rows.keys() == read_cache(sample_cache(vdir, 0), DIM).keys() == {0, 1}


def test_empty_cache_reads_empty(tmp_path):
    loc = sample_cache(Location(str(tmp_path / "v1")), 0)
    write_cache(loc, cache_table([], None))
    assert read_cache(loc, DIM) == {}
    assert read_cache_tokens(loc, DIM).shape == (0, DIM)


def _write_caches(vdir: Location, shards: dict) -> list:
    locs = []
    for shard, lengths in shards.items():
        loc = sample_cache(vdir, shard)
        enc = _encodings(lengths, seed=shard) if lengths else None
        write_cache(loc, cache_table(list(range(len(lengths))), enc))
        locs.append(loc)
    return locs


def test_the_fit_reads_every_shard_into_one_array_in_order(tmp_path):
    vdir = Location(str(tmp_path / "v1"))
    shards = {0: [3, 5], 1: [], 2: [4], 3: [1, 1, 6]}
    locs = _write_caches(vdir, shards)
    out = read_sample_tokens(locs, DIM)
    expected = np.concatenate([np.concatenate(_encodings(n, seed=s).tokens) for s, n in shards.items() if n])
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, expected.astype(np.float16))
    assert read_sample_tokens([], DIM).shape == (0, DIM)


def test_a_cache_without_its_count_is_read_and_concatenated(tmp_path):
    vdir = Location(str(tmp_path / "v1"))
    locs = _write_caches(vdir, {0: [2, 3], 1: [4]})
    old = read_cache_table(locs[1])  # a file without the count in its footer
    write_cache(locs[1], old.replace_schema_metadata(None))
    expected = np.concatenate([read_cache_tokens(loc, DIM) for loc in locs])
    np.testing.assert_array_equal(read_sample_tokens(locs, DIM), expected)


def test_a_cache_whose_count_is_wrong_is_named(tmp_path):
    vdir = Location(str(tmp_path / "v1"))
    locs = _write_caches(vdir, {0: [2, 3], 5: [4]})
    table = read_cache_table(locs[1])
    write_cache(locs[1], table.replace_schema_metadata({sc.TOKEN_COUNT_KEY: b"9"}))
    with pytest.raises(ValueError, match=r"00005.*says 9 token vectors, it holds 4"):
        read_sample_tokens(locs, DIM)


def test_a_mapped_cache_outlives_its_file(tmp_path):
    """A local cache is read in place (memory-mapped, the file closed again): the arrays stay
    valid after the reader is gone and the file removed, as pass 2 uses them."""
    import gc
    import os

    loc = sample_cache(Location(str(tmp_path / "v1")), 0)
    enc = _encodings([4, 2, 5])
    write_cache(loc, cache_table([0, 1, 2], enc))
    rows = read_cache(loc, DIM)
    tokens = read_cache_tokens(loc, DIM)
    assert not tokens.flags.writeable  # the file's pages, not a copy
    gc.collect()
    os.remove(loc.path)
    np.testing.assert_array_equal(tokens, np.concatenate(enc.tokens).astype(np.float16))
    np.testing.assert_array_equal(rows[2][1], enc.tokens[2].astype(np.float16))
    np.testing.assert_array_equal(rows[1][0], enc.dense[1])


def test_only_whole_caches_of_this_format_mark_a_shard_done(tmp_path):
    """A resumed run reuses the shards whose cache file is whole; an older version's Parquet
    cache and a write's temporary sibling do not count (that shard is encoded again)."""
    vdir = Location(str(tmp_path / "v1"))
    _write_caches(vdir, {0: [2], 3: []})
    folder = tmp_path / "v1" / "_sample"
    (folder / "part-00001.parquet").write_bytes(b"PAR1")
    (folder / "part-00002.arrow.tmp-0123abcd").write_bytes(b"ARROW1")
    assert cached_names(vdir) == {sample_cache(vdir, 0).name, sample_cache(vdir, 3).name} == {
        "part-00000.arrow", "part-00003.arrow"}
    assert cached_names(Location(str(tmp_path / "v2"))) == set()


@pytest.mark.parametrize("damage", ["truncated", "not arrow"])
def test_a_damaged_cache_is_named(tmp_path, damage):
    vdir = Location(str(tmp_path / "v1"))
    locs = _write_caches(vdir, {0: [2, 3], 7: [4]})
    data = open(locs[1].path, "rb").read()
    with open(locs[1].path, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncated" else b"not a cache" * 20)
    for read in (lambda: read_sample_tokens(locs, DIM), lambda: read_cache(locs[1], DIM)):
        with pytest.raises(ValueError, match=r"part-00007\.arrow: not a readable codec-sample cache"):
            read()


def test_caches_on_s3_round_trip(s3_bucket):
    vdir = Location(f"{s3_bucket}/sets/s/v000001")
    shards = {0: [3, 5], 1: [], 2: [4]}
    locs = _write_caches(vdir, shards)
    assert cached_names(vdir) == {loc.name for loc in locs}
    expected = np.concatenate([np.concatenate(_encodings(n, seed=s).tokens) for s, n in shards.items() if n])
    np.testing.assert_array_equal(read_sample_tokens(locs, DIM), expected.astype(np.float16))
    rows, precision = sc.read_cache_and_precision(locs[2], DIM)
    np.testing.assert_array_equal(rows[0][1], _encodings([4], seed=2).tokens[0].astype(np.float16))
    assert precision is None


def test_the_fit_downloads_no_dense_vectors_from_s3(s3_bucket, monkeypatch):
    """On s3 the fit's read takes the token vectors' buffers only (ranged reads of the
    columns it names), not the dense vectors beside them: here 40 wide dense vectors a
    document against its few tokens, so a read of the whole file would be ~5x larger."""
    vdir = Location(f"{s3_bucket}/sets/s/v000001")
    rng = np.random.default_rng(0)
    lengths = [2, 3, 1, 4] * 10
    enc = DocumentVectors(rng.standard_normal((len(lengths), 400)).astype(np.float32),
                          [rng.standard_normal((n, DIM)).astype(np.float32) for n in lengths],
                          np.array(lengths, np.int32), np.zeros(len(lengths), bool))
    loc = sample_cache(vdir, 0)
    write_cache(loc, cache_table(list(range(len(lengths))), enc))
    downloaded = []
    opened = Location.open

    def counting(self, mode="rb"):
        f = opened(self, mode)
        read = f.read
        f.read = lambda *a: downloaded.append(len(data := read(*a))) or data
        return f

    monkeypatch.setattr(Location, "open", counting)
    np.testing.assert_array_equal(read_sample_tokens([loc], DIM), np.concatenate(enc.tokens).astype(np.float16))
    dense_bytes, token_bytes = enc.dense.nbytes, sum(t.size for t in enc.tokens) * 2
    assert token_bytes <= sum(downloaded) < dense_bytes / 2, (sum(downloaded), dense_bytes, loc.size())
    downloaded.clear()
    rows = read_cache(loc, DIM)                    # pass 2 reads the whole file, dense vectors too
    np.testing.assert_array_equal(rows[5][0], enc.dense[5])
    assert sum(downloaded) > dense_bytes
