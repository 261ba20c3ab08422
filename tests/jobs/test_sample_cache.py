"""The embed job's codec-sample cache: what pass 1 writes, pass 2 and the fit read back."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import jobs.sample_cache as sc
from embedding.vectors import DocumentVectors
from jobs.sample_cache import cache_table, read_cache, read_cache_tokens, read_sample_tokens, sample_cache
from storage import schemas
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
    schemas.write_scratch_table(loc, cache_table(offsets, enc))
    assert schemas.read_table(loc).schema.field("tokens").type == (pa.large_binary() if large else pa.binary())
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
    schemas.write_scratch_table(sample_cache(vdir, 0), cache_table([0, 1], _encodings([2, 3], True), "bfloat16"))
    schemas.write_scratch_table(sample_cache(vdir, 1), cache_table([], None, "float32"))
    schemas.write_scratch_table(sample_cache(vdir, 2), cache_table([0], _encodings([1], True)))  # an older cache
    assert [sc.read_cache_and_precision(sample_cache(vdir, s), DIM)[1] for s in range(3)] == [
        "bfloat16", "float32", None]
    rows, _ = sc.read_cache_and_precision(sample_cache(vdir, 0), DIM)
    assert rows.keys() == read_cache(sample_cache(vdir, 0), DIM).keys() == {0, 1}


def test_empty_cache_reads_empty(tmp_path):
    loc = sample_cache(Location(str(tmp_path / "v1")), 0)
    schemas.write_table(loc, cache_table([], None))
    assert read_cache(loc, DIM) == {}
    assert read_cache_tokens(loc, DIM).shape == (0, DIM)


def _write_caches(vdir: Location, shards: dict) -> list:
    locs = []
    for shard, lengths in shards.items():
        loc = sample_cache(vdir, shard)
        enc = _encodings(lengths, seed=shard) if lengths else None
        schemas.write_scratch_table(loc, cache_table(list(range(len(lengths))), enc))
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
    old = schemas.read_table(locs[1])  # as an older version wrote it: no count in the footer
    schemas.write_scratch_table(locs[1], old.replace_schema_metadata(None))
    expected = np.concatenate([read_cache_tokens(loc, DIM) for loc in locs])
    np.testing.assert_array_equal(read_sample_tokens(locs, DIM), expected)


def test_a_cache_whose_count_is_wrong_is_named(tmp_path):
    vdir = Location(str(tmp_path / "v1"))
    locs = _write_caches(vdir, {0: [2, 3], 5: [4]})
    table = schemas.read_table(locs[1])
    schemas.write_scratch_table(locs[1], table.replace_schema_metadata({sc.TOKEN_COUNT_KEY: b"9"}))
    with pytest.raises(ValueError, match=r"00005.*says 9 token vectors, it holds 4"):
        read_sample_tokens(locs, DIM)
