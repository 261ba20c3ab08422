"""Round-trip, property and quality tests for the PLAID-style residual codec."""

from __future__ import annotations

import io
import json
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from embedding.codec import (
    AUTO_BF16_MIN_FLOPS,
    KMEANS_KINDS,
    PROGRESSIVE_MIN_ROWS_PER_CENTROID,
    ResidualCodec,
    bf16_products,
    code_dtype,
    content_keys,
    cpu_flags,
    default_n_centroids,
    kmeans_flops,
    native_bf16,
    pack_bits,
    progressive_rows,
    resolve_kmeans,
    unpack_bits,
)

DIM = 64
N_FIT = 3000
N_EVAL = 500
N_CENTROIDS = 32
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


def _clustered(n: int, dim: int, n_clusters: int, noise: float, seed: int) -> np.ndarray:
    """(n, dim) float32 unit vectors scattered around random cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise_vectors = noise * rng.normal(size=(n, dim)) / math.sqrt(dim)
    points = centres[rng.integers(0, n_clusters, n)] + noise_vectors
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    """(fit sample, evaluation vectors) drawn from the same clustered distribution."""
    data = _clustered(N_FIT + N_EVAL, DIM, n_clusters=24, noise=0.6, seed=7)
    return data[:N_FIT], data[N_FIT:]


@pytest.fixture(scope="module")
def codecs(vectors) -> dict[int, ResidualCodec]:
    sample, _ = vectors
    return {nbits: ResidualCodec.fit(sample, nbits, N_CENTROIDS, seed=3) for nbits in (1, 2, 4)}


@st.composite
def buckets_and_nbits(draw):
    nbits = draw(st.sampled_from([1, 2, 4, 8]))
    dim = draw(st.integers(1, 6)) * (8 // nbits)
    n = draw(st.integers(0, 12))
    buckets = draw(
        hnp.arrays(np.uint8, (n, dim), elements=st.integers(0, (1 << nbits) - 1))
    )
    return buckets, nbits


# --- bit packing -------------------------------------------------------------


@PROPERTY_SETTINGS
@given(buckets_and_nbits())
def test_pack_unpack_round_trip(case):
    buckets, nbits = case
    packed = pack_bits(buckets, nbits)
    assert packed.dtype == np.uint8
    assert packed.shape == (buckets.shape[0], buckets.shape[1] * nbits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, nbits, buckets.shape[1]), buckets)


def _reference_pack(buckets: np.ndarray, nbits: int) -> np.ndarray:
    """Bit-by-bit definition of the layout: each value's low nbits, MSB first, in order."""
    bits = np.unpackbits(buckets.astype(np.uint8)[:, :, None], axis=2)[:, :, 8 - nbits :]
    return np.packbits(bits.reshape(len(buckets), buckets.shape[1] * nbits), axis=1)


@PROPERTY_SETTINGS
@given(buckets_and_nbits())
def test_pack_bits_matches_bitwise_reference(case):
    buckets, nbits = case
    np.testing.assert_array_equal(pack_bits(buckets, nbits), _reference_pack(buckets, nbits))


@PROPERTY_SETTINGS
@given(buckets_and_nbits(), st.data())
def test_prefix_of_dimensions_is_prefix_of_bytes(case, data):
    buckets, nbits = case
    step = 8 // nbits
    d = data.draw(st.integers(1, buckets.shape[1] // step)) * step
    full = pack_bits(buckets, nbits)
    np.testing.assert_array_equal(full[:, : d * nbits // 8], pack_bits(buckets[:, :d], nbits))


@pytest.mark.parametrize(
    ("buckets", "nbits", "expected"),
    [
        ([[1, 0, 1, 1, 0, 0, 0, 1]], 1, [0b10110001]),
        ([[0, 1, 2, 3]], 2, [0b00011011]),
        ([[1, 2, 15, 0]], 4, [0x12, 0xF0]),
    ],
)
def test_pack_bits_layout_is_dimension_major_msb_first(buckets, nbits, expected):
    packed = pack_bits(np.array(buckets, dtype=np.uint8), nbits)
    np.testing.assert_array_equal(packed, np.array([expected], dtype=np.uint8))


def test_pack_bits_rejects_bad_input():
    with pytest.raises(ValueError, match="dim=3"):
        pack_bits(np.zeros((2, 3), np.uint8), 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(np.full((1, 4), 4, np.uint8), 2)
    with pytest.raises(ValueError, match="nbits"):
        pack_bits(np.zeros((1, 8), np.uint8), 3)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_bits(np.zeros((1, 3), np.uint8), 2, 8)


# --- sizing helpers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("n_centroids", "dtype"),
    [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)],
)
def test_code_dtype_boundaries(n_centroids, dtype):
    assert code_dtype(n_centroids) == np.dtype(dtype)


def test_code_dtype_rejects_zero():
    with pytest.raises(ValueError):
        code_dtype(0)


@pytest.mark.parametrize(
    ("n_tokens", "expected"),
    [(1, 16), (3, 16), (4, 32), (100, 128), (10_000, 1024), (1_000_000, 8192), (2**20, 16384)],
)
def test_default_n_centroids_values(n_tokens, expected):
    assert default_n_centroids(n_tokens) == expected


@PROPERTY_SETTINGS
@given(st.integers(1, 10**12))
def test_default_n_centroids_is_largest_power_of_two_below_bound(n_tokens):
    k = default_n_centroids(n_tokens)
    bound = 16 * math.sqrt(n_tokens)
    assert k & (k - 1) == 0
    # k <= bound < 2k, compared in squares to stay exact in integers
    assert k * k <= 256 * n_tokens < 4 * k * k
    assert k <= bound * (1 + 1e-12)


@pytest.mark.parametrize("n_tokens", [0, -5])
def test_default_n_centroids_rejects_non_positive(n_tokens):
    with pytest.raises(ValueError):
        default_n_centroids(n_tokens)


# --- compress / decompress ---------------------------------------------------


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_compress_shapes_and_dtypes(codecs, vectors, nbits):
    codec = codecs[nbits]
    codes, residuals = codec.compress(vectors[1])
    assert codes.shape == (N_EVAL,) and codes.dtype == np.uint8
    assert residuals.shape == (N_EVAL, DIM * nbits // 8) and residuals.dtype == np.uint8
    assert codec.bytes_per_token() == 1 + DIM * nbits // 8
    assert codec.bucket_cutoffs.shape == ((1 << nbits) - 1,)
    assert codec.bucket_weights.shape == (1 << nbits,)
    assert np.all(np.diff(codec.bucket_cutoffs) >= 0)
    np.testing.assert_allclose(np.linalg.norm(codec.centroids, axis=1), 1.0, atol=1e-5)


def test_assign_is_max_inner_product(codecs, vectors):
    codec = codecs[2]
    codes = codec.assign(vectors[1])
    expected = np.argmax(vectors[1] @ codec.centroids.T, axis=1)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(codec.compress(vectors[1])[0], codes)


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_compress_on_a_torch_device_matches_numpy(codecs, vectors, nbits):
    """The GPU encoders' path (run here on torch's CPU): same codes and residual bytes."""
    codec = codecs[nbits]
    codes, residuals = codec.compress(vectors[1])
    t_codes, t_residuals = codec.compress(vectors[1], device="cpu")
    assert t_codes.dtype == codes.dtype and t_residuals.shape == residuals.shape
    same = t_codes == codes                      # a float tie may go either way; none expected here
    assert same.mean() > 0.99
    np.testing.assert_array_equal(t_residuals[same], residuals[same])


@pytest.mark.parametrize("device", [None, "cpu"])
def test_compress_with_residual_sum_sums_every_residual_value(codecs, vectors, device):
    """The drift statistic an embed shard records, summed while compressing: the same
    codes and bytes as compress, and the sum of |unit vector - its centroid|."""
    codec = codecs[2]
    x = vectors[1] * 3.0  # not unit: the residuals are of the normalised vectors
    codes, residuals, abs_sum = codec.compress_with_residual_sum(x, device=device)
    plain = codec.compress(x, device=device)
    np.testing.assert_array_equal(codes, plain[0])
    np.testing.assert_array_equal(residuals, plain[1])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.abs(unit - codec.centroids[codes.astype(np.int64)]).sum(dtype=np.float64)
    assert abs_sum == pytest.approx(expected, rel=1e-5)
    assert codec.compress_with_residual_sum(np.zeros((0, DIM), np.float32))[2] == 0.0


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_decompress_without_normalize_is_exact(codecs, vectors, nbits):
    codec = codecs[nbits]
    codes, residuals = codec.compress(vectors[1])
    buckets = unpack_bits(residuals, nbits, DIM)
    expected = codec.centroids[codes] + codec.bucket_weights[buckets]
    out = codec.decompress(codes, residuals, normalize=False)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("d", [1, 5, 16, 33, DIM])
def test_prefix_decompress_is_renormalised_prefix(codecs, vectors, nbits, d):
    codec = codecs[nbits]
    codes, residuals = codec.compress(vectors[1])
    full = codec.decompress(codes, residuals, normalize=False)
    prefix = full[:, :d] / np.linalg.norm(full[:, :d], axis=1, keepdims=True)
    out = codec.decompress(codes, residuals, dim=d)
    assert out.shape == (N_EVAL, d)
    np.testing.assert_allclose(out, prefix, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        codec.decompress(codes, residuals, dim=d, normalize=False), full[:, :d]
    )


def test_reconstruction_improves_with_nbits(codecs, vectors):
    _, held = vectors
    cosines = {}
    for nbits, codec in codecs.items():
        recon = codec.decompress(*codec.compress(held))
        cosines[nbits] = float(np.mean(np.sum(recon * held, axis=1)))
    assert cosines[1] < cosines[2] < cosines[4], cosines
    assert cosines[4] > 0.9, cosines


def test_compress_handles_empty_batch(codecs):
    codec = codecs[2]
    codes, residuals = codec.compress(np.zeros((0, DIM), np.float32))
    assert codes.shape == (0,) and residuals.shape == (0, DIM // 4)
    assert codec.decompress(codes, residuals).shape == (0, DIM)


@pytest.mark.parametrize("d", [0, DIM + 1, -1])
def test_decompress_rejects_bad_prefix_dim(codecs, vectors, d):
    codec = codecs[2]
    codes, residuals = codec.compress(vectors[1][:4])
    with pytest.raises(ValueError, match="dim must be"):
        codec.decompress(codes, residuals, dim=d)


def test_decompress_rejects_mismatched_inputs(codecs, vectors):
    codec = codecs[2]
    codes, residuals = codec.compress(vectors[1][:4])
    with pytest.raises(ValueError, match="residuals"):
        codec.decompress(codes, residuals[:, :-1])
    with pytest.raises(ValueError, match="codes"):
        codec.decompress(np.full(4, N_CENTROIDS), residuals)


def test_compress_rejects_wrong_dim(codecs):
    with pytest.raises(ValueError, match="dim"):
        codecs[2].compress(np.ones((3, DIM + 8), np.float32))


# --- fit ---------------------------------------------------------------------


def test_fit_is_deterministic_for_a_seed(vectors):
    sample = vectors[0][:1000]
    first = ResidualCodec.fit(sample, 2, 16, seed=11, niter=5)
    again = ResidualCodec.fit(sample, 2, 16, seed=11, niter=5)
    assert first == again
    assert first.to_bytes() == again.to_bytes()


def test_fit_depends_on_the_rows_not_their_order(vectors):
    sample = vectors[0][:1500]
    perm = np.random.default_rng(0).permutation(len(sample))
    assert ResidualCodec.fit(sample[perm], 2, 16, seed=11, niter=5) == ResidualCodec.fit(sample, 2, 16, seed=11,
                                                                                          niter=5)


def test_fit_barely_moves_when_one_percent_of_the_sample_changes(vectors):
    """A nightly full rebuild must not reshuffle the codec: 1% of the rows replaced
    leaves nearly every vector on the same centroid (a seeded positional draw does not)."""
    sample, evaluation = vectors
    rng = np.random.default_rng(5)
    changed = sample.copy()
    swap = rng.choice(len(sample), size=len(sample) // 100, replace=False)
    changed[swap] = _clustered(len(swap), DIM, 24, 0.6, seed=99)
    changed = changed[rng.permutation(len(changed))]   # rows also arrive in another order
    a = ResidualCodec.fit(sample, 2, N_CENTROIDS, seed=3, niter=4)
    b = ResidualCodec.fit(changed, 2, N_CENTROIDS, seed=3, niter=4)
    # Centroid numbers may shift; what matters is that a vector lands on the same point.
    same = np.sum(a.centroids[a.assign(evaluation)] * b.centroids[b.assign(evaluation)], axis=1) > 0.99
    assert same.mean() >= 0.95, same.mean()
    np.testing.assert_allclose(a.bucket_cutoffs, b.bucket_cutoffs, atol=0.02)
    assert ResidualCodec.fit(sample, 2, N_CENTROIDS, seed=4, niter=4) != a   # the seed still matters
    # ... as it did before: a positional draw (a shuffled start) moves many vectors.
    c = ResidualCodec.fit(sample, 2, N_CENTROIDS, seed=4, niter=4)
    moved = np.sum(a.centroids[a.assign(evaluation)] * c.centroids[c.assign(evaluation)], axis=1) <= 0.99
    assert moved.mean() > 4 * (1 - same.mean())


def test_content_keys_follow_content_and_seed(vectors):
    x = vectors[0][:50]
    k = content_keys(x, 0)
    assert k.dtype == np.uint64 and len(np.unique(k)) == 50
    np.testing.assert_array_equal(content_keys(x[::-1], 0), k[::-1])
    np.testing.assert_array_equal(content_keys(x.astype(np.float16), 0), k)   # hashed at float16 precision
    assert not np.array_equal(content_keys(x, 1), k)
    assert len(content_keys(np.zeros((0, 8), np.float32))) == 0


def test_fit_default_n_centroids_is_capped_by_sample(vectors):
    sample = vectors[0][:200]
    codec = ResidualCodec.fit(sample, 1, niter=2, heldout_fraction=0.1)
    # default_n_centroids(200) == 128 fits into the 180 training rows
    assert codec.n_centroids == default_n_centroids(200) == 128
    tiny = ResidualCodec.fit(sample[:10], 1, niter=2, heldout_fraction=0.0)
    assert tiny.n_centroids == 10
    assert math.isfinite(tiny.avg_residual) and tiny.avg_residual >= 0


def test_fit_normalises_sample(vectors):
    sample = vectors[0][:500]
    scaled = sample * np.linspace(0.5, 3.0, len(sample), dtype=np.float32)[:, None]
    from_scaled = ResidualCodec.fit(scaled, 2, 8, seed=1, niter=3)
    from_unit = ResidualCodec.fit(sample, 2, 8, seed=1, niter=3)
    np.testing.assert_allclose(from_scaled.centroids, from_unit.centroids, atol=1e-5)
    np.testing.assert_allclose(from_scaled.bucket_weights, from_unit.bucket_weights, atol=1e-5)


@pytest.mark.parametrize("nbits", [0, 3, 8, True])
def test_fit_rejects_bad_nbits(vectors, nbits):
    with pytest.raises(ValueError, match="nbits"):
        ResidualCodec.fit(vectors[0][:100], nbits, 4)


@pytest.mark.parametrize(("dim", "nbits"), [(36, 1), (6, 2), (3, 4)])
def test_fit_rejects_non_divisible_dim(dim, nbits):
    sample = _clustered(100, dim, 4, 0.5, seed=0)
    with pytest.raises(ValueError, match=f"dim={dim}, nbits={nbits}"):
        ResidualCodec.fit(sample, nbits, 4)


def test_fit_accepts_dim_whose_bits_fill_bytes():
    sample = _clustered(100, 36, 4, 0.5, seed=0)
    assert ResidualCodec.fit(sample, 2, 4, niter=2).bytes_per_token() == 1 + 9
    assert ResidualCodec.fit(sample, 4, 4, niter=2).bytes_per_token() == 1 + 18


def test_fit_rejects_empty_and_nan_samples():
    with pytest.raises(ValueError, match="non-empty"):
        ResidualCodec.fit(np.zeros((0, 16), np.float32), 2)
    sample = _clustered(50, 16, 4, 0.5, seed=0)
    sample[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ResidualCodec.fit(sample, 2, 4)
    for bad in (np.nan, np.inf, -np.inf):  # float16 (the sample cache's type) is checked as it is
        half = _clustered(50, 16, 4, 0.5, seed=0).astype(np.float16)
        half[20, 3] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            ResidualCodec.fit(half, 2, 4)


def test_a_float16_sample_fits_as_its_float32_copy():
    """float16 rows are converted exactly (through torch where the process has it): the same
    codec as from their float32 copy, and the same compression."""
    import torch  # noqa: F401  (the fast conversion's condition)

    half = _clustered(3000, 16, 40, 0.5, seed=3).astype(np.float16)
    a = ResidualCodec.fit(half, 2, 32, niter=3)
    b = ResidualCodec.fit(half.astype(np.float32), 2, 32, niter=3)
    assert a.to_bytes() == b.to_bytes()
    for x, y in zip(a.compress_with_residual_sum(half), b.compress_with_residual_sum(half.astype(np.float32))):
        assert np.array_equal(x, y)


def _in_fresh_python(tmp_path, script: str, *flags: str):
    """``(sample, process)``: ``script`` run by a fresh interpreter (``flags`` first) from the
    repository's root, ``sys.argv[1]`` the path of ``sample``, 3,000 clustered float16 rows."""
    import subprocess
    from pathlib import Path

    half = _clustered(3000, 16, 40, 0.5, seed=3).astype(np.float16)
    np.save(tmp_path / "x.npy", half)
    return half, subprocess.run([sys.executable, *flags, "-c", script, str(tmp_path / "x.npy")], capture_output=True,
                                cwd=Path(__file__).resolve().parents[2], timeout=120)


def test_a_fit_is_the_same_with_and_without_torch(tmp_path):
    """The held-out split's content keys and normalised rows go through torch where the
    process has imported it and numpy elsewhere (a faiss fit need not import torch): the
    same codec, bit for bit, either way."""
    import torch  # noqa: F401  (this process's fit takes torch's paths)

    half, out = _in_fresh_python(tmp_path, "import sys, numpy as np\n"
                                 "from embedding.codec import ResidualCodec\n"
                                 "x = np.load(sys.argv[1])\n"
                                 "codec = ResidualCodec.fit(x, 2, 32, seed=5, niter=3, kmeans='flat')\n"
                                 "assert 'torch' not in sys.modules\n"
                                 "sys.stdout.buffer.write(codec.to_bytes())\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ResidualCodec.fit(half, 2, 32, seed=5, niter=3, kmeans="flat").to_bytes() == out.stdout


def test_read_only_float16_rows_pass_through_torch_without_a_warning(tmp_path):
    """Pass 2 compresses memory-mapped (read-only) float16 caches, converted through torch:
    torch's warning about non-writable arrays reached the job's console. In a fresh process
    (torch warns once a process) with warnings as errors: a fit and a compression of
    read-only float16 rows, through torch's paths."""
    _, out = _in_fresh_python(tmp_path, "import sys, numpy as np, torch\n"
                              "from embedding.codec import ResidualCodec\n"
                              "x = np.load(sys.argv[1], mmap_mode='r')\n"
                              "assert not x.flags.writeable\n"
                              "codec = ResidualCodec.fit(x, 2, 32, seed=5, niter=3)\n"
                              "codec.compress_with_residual_sum([x[:1000], x[1000:]])\n"
                              "codec.compress_with_residual_sum(x[:5])\n", "-W", "error")
    assert out.returncode == 0 and not out.stderr, out.stderr[-3000:]


def test_fit_rejects_too_many_centroids():
    with pytest.raises(ValueError, match="n_centroids"):
        ResidualCodec.fit(_clustered(20, 16, 2, 0.5, seed=0), 2, 50)


@pytest.mark.parametrize("kmeans", ["flat", "progressive"])
def test_a_float16_sample_fits_as_its_float32_copy_and_is_left_alone(vectors, kmeans):
    """The embed job hands the fit its float16 cache: converted a block at a time, it
    must give the codec of the float32 copy, bit for bit, and not change the input."""
    half = (vectors[0] * np.linspace(0.5, 2.0, len(vectors[0]), dtype=np.float32)[:, None]).astype(np.float16)
    before = half.copy()
    from_half = ResidualCodec.fit(half, 2, N_CENTROIDS, seed=2, niter=3, kmeans=kmeans)
    from_float = ResidualCodec.fit(half.astype(np.float32), 2, N_CENTROIDS, seed=2, niter=3, kmeans=kmeans)
    assert from_half.to_bytes() == from_float.to_bytes()
    np.testing.assert_array_equal(half, before)


def test_compress_of_float16_rows_equals_that_of_their_float32_copy(codecs, vectors):
    """Pass 2 compresses the cached float16 tokens without a float32 copy of the shard."""
    half = np.concatenate([vectors[1]] * 40).astype(np.float16)  # 20k rows: several batches
    codes16, packed16, sum16 = codecs[2].compress_with_residual_sum(half)
    codes32, packed32, sum32 = codecs[2].compress_with_residual_sum(half.astype(np.float32))
    np.testing.assert_array_equal(codes16, codes32)
    np.testing.assert_array_equal(packed16, packed32)
    assert sum16 == pytest.approx(sum32, rel=1e-12)


def test_compress_of_a_list_of_arrays_equals_that_of_their_concatenation(codecs, vectors):
    """Pass 2 hands the codec a shard's documents as they are (float16 from the sample cache,
    float32 from the model, some empty): the batches gather their rows across the arrays."""
    rng = np.random.default_rng(4)
    rows = np.concatenate([vectors[1]] * 40)  # 20k rows: several batches, documents across their edges
    cuts = np.sort(rng.choice(len(rows), 600, replace=False))
    parts = [p.astype(np.float16) if i % 3 == 0 else p for i, p in enumerate(np.split(rows, cuts))]
    parts.insert(5, np.zeros((0, DIM), np.float32))
    whole = np.concatenate([p.astype(np.float32) for p in parts])
    got = codecs[4].compress_with_residual_sum(parts)
    want = codecs[4].compress_with_residual_sum(whole)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == pytest.approx(want[2], rel=1e-12)
    codes, packed = codecs[4].compress([])
    assert codes.shape == (0,) and packed.shape == (0, codecs[4].residual_bytes)


def test_compress_of_a_list_names_a_bad_array(codecs, vectors):
    good = vectors[1][:10]
    with pytest.raises(ValueError, match=r"vectors\[1\] has dim 5"):
        codecs[2].compress([good, np.zeros((3, 5), np.float32)])
    bad = good.copy()
    bad[4, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        codecs[2].compress([good, bad])


def test_float64_values_past_float32_range_are_rejected():
    sample = _clustered(50, 16, 4, 0.5, seed=0).astype(np.float64)
    sample[7, 2] = 1e300  # finite as float64, infinite as the float32 the codec computes in
    with pytest.raises(ValueError, match="NaN or infinite"):
        ResidualCodec.fit(sample, 2, 4)


def test_fit_allocates_one_normalised_copy_of_the_sample():
    """The split gathers, converts and normalises each part a block at a time: the fit's
    numpy arrays peak near one float32 copy of the sample (train + held-out), not the
    three (a float32 copy, its normalised copy, the split) it took before."""
    import tracemalloc

    half = _clustered(100_000, 64, 16, 0.6, seed=5).astype(np.float16)
    copy_bytes = half.size * 4
    tracemalloc.start()
    try:
        ResidualCodec.fit(half, 2, 64, seed=0, niter=1, kmeans="flat")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert copy_bytes <= peak < 1.6 * copy_bytes


# --- construction and serialisation -----------------------------------------


def test_constructor_validates_shapes(codecs):
    codec = codecs[2]
    with pytest.raises(ValueError, match="bucket_cutoffs"):
        ResidualCodec(codec.centroids, 2, codec.bucket_cutoffs[:2], codec.bucket_weights, 0.1)
    with pytest.raises(ValueError, match="bucket_weights"):
        ResidualCodec(codec.centroids, 2, codec.bucket_cutoffs, codec.bucket_weights[:3], 0.1)
    with pytest.raises(ValueError, match="nbits"):
        ResidualCodec(codec.centroids, 3, codec.bucket_cutoffs, codec.bucket_weights, 0.1)
    narrow = codec.centroids[:, :6] / np.linalg.norm(codec.centroids[:, :6], axis=1, keepdims=True)
    with pytest.raises(ValueError, match="dim=6, nbits=2"):
        ResidualCodec(narrow, 2, codec.bucket_cutoffs, codec.bucket_weights, 0.1)
    with pytest.raises(ValueError, match="L2-normalised"):
        ResidualCodec(2 * codec.centroids, 2, codec.bucket_cutoffs, codec.bucket_weights, 0.1)
    with pytest.raises(ValueError, match="non-decreasing"):
        ResidualCodec(codec.centroids, 2, codec.bucket_cutoffs[::-1], codec.bucket_weights, 0.1)
    with pytest.raises(ValueError, match="avg_residual"):
        ResidualCodec(codec.centroids, 2, codec.bucket_cutoffs, codec.bucket_weights, float("nan"))


def test_codec_arrays_are_read_only(codecs):
    with pytest.raises(ValueError):
        codecs[2].centroids[0, 0] = 1.0


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_bytes_round_trip(codecs, vectors, nbits):
    codec = codecs[nbits]
    loaded = ResidualCodec.from_bytes(codec.to_bytes())
    assert loaded == codec
    assert loaded.params() == codec.params()
    codes, residuals = codec.compress(vectors[1])
    np.testing.assert_array_equal(
        loaded.decompress(codes, residuals), codec.decompress(codes, residuals)
    )


def test_from_bytes_rejects_corrupt_data(codecs):
    data = codecs[2].to_bytes()
    for bad in (b"", b"not a codec", data[: len(data) // 2]):
        with pytest.raises(ValueError, match="corrupt|misses"):
            ResidualCodec.from_bytes(bad)


def test_from_bytes_rejects_missing_keys(codecs):
    buffer = io.BytesIO()
    np.savez(buffer, centroids=codecs[2].centroids)
    with pytest.raises(ValueError, match="misses keys"):
        ResidualCodec.from_bytes(buffer.getvalue())


def test_from_bytes_rejects_plain_npy():
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    with pytest.raises(ValueError, match="not an .npz"):
        ResidualCodec.from_bytes(buffer.getvalue())


def test_params_is_json_able(codecs):
    params = codecs[4].params()
    assert json.loads(json.dumps(params)) == params
    assert params["nbits"] == 4 and params["dim"] == DIM and params["n_centroids"] == N_CENTROIDS
    assert params["bytes_per_token"] == 1 + DIM // 2
    assert len(params["bucket_cutoffs"]) == 15 and len(params["bucket_weights"]) == 16


def test_with_nbits_keeps_centroids_and_improves_with_bits():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(16, 32)).astype(np.float32)
    x = centers[rng.integers(0, 16, 2000)] + 0.3 * rng.normal(size=(2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    base = ResidualCodec.fit(x, 2, 16, seed=0)
    cos = {}
    for nbits in (1, 2, 4):
        c = base.with_nbits(nbits, x)
        np.testing.assert_array_equal(c.centroids, base.centroids)
        assert c.nbits == nbits
        recon = c.decompress(*c.compress(x))
        cos[nbits] = float(np.mean(np.sum(recon * x, axis=1)))
    assert cos[1] < cos[2] < cos[4]
    with pytest.raises(ValueError):
        base.with_nbits(3, x)


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_residual_vectors_equal_the_bucket_weights_of_the_unpacked_bits(codecs, nbits):
    codec = codecs[nbits]
    rng = np.random.default_rng(nbits)
    packed = rng.integers(0, 256, (37, codec.residual_bytes)).astype(np.uint8)
    expected = codec.bucket_weights[unpack_bits(packed, nbits, codec.dim)].astype(np.float32)
    np.testing.assert_array_equal(codec.residual_vectors(packed), expected)
    np.testing.assert_array_equal(codec.residual_vectors(packed, small_table=True), expected)  # the byte table
    for dim in (1, codec.dim // 2 + 1, codec.dim - 1):  # odd byte counts take the byte-wise path
        np.testing.assert_array_equal(codec.residual_vectors(packed, dim), expected[:, :dim])
    assert codec.residual_vectors(packed[:0]).shape == (0, codec.dim)


# ---- two-level k-means -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_sample():
    """Enough rows for 256 centroids (two-level's smallest k), unevenly spread over clusters."""
    a = _clustered(6000, DIM, 40, noise=0.6, seed=11)
    b = _clustered(1500, DIM, 3, noise=0.3, seed=12)           # a few dense clusters: uneven cells
    return np.concatenate([a, b])


def _mean_residual(codec: ResidualCodec, x: np.ndarray) -> float:
    return float(np.abs(x - codec.centroids[codec.assign(x).astype(np.int64)]).mean())


def test_two_level_kmeans_gives_k_distinct_unit_centroids_close_to_flat_quality(big_sample):
    flat = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4)
    two = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="two-level")
    assert two.centroids.shape == flat.centroids.shape == (256, DIM)
    np.testing.assert_allclose(np.linalg.norm(two.centroids, axis=1), 1.0, atol=1e-5)
    assert len(np.unique(two.centroids.round(5), axis=0)) == 256
    assert not np.array_equal(two.centroids, flat.centroids)      # not silently the flat fit
    held = _clustered(1000, DIM, 40, noise=0.6, seed=13)
    assert _mean_residual(two, held) < 1.1 * _mean_residual(flat, held)
    assert len(np.unique(two.assign(big_sample))) > 0.9 * 256   # the centroids are used


def test_two_level_kmeans_is_deterministic_and_order_free(big_sample):
    a = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="two-level")
    b = ResidualCodec.fit(big_sample[::-1].copy(), 2, 256, seed=0, niter=4, kmeans="two-level")
    np.testing.assert_array_equal(np.sort(a.centroids, axis=0), np.sort(b.centroids, axis=0))
    assert a == ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="two-level")


def test_two_level_kmeans_uses_every_row_budget_when_k_nears_the_sample():
    """k close to the training rows: every cell's share is capped by its rows, the total still k."""
    x = _clustered(300, DIM, 5, noise=0.5, seed=14)
    codec = ResidualCodec.fit(x, 2, 280, seed=0, niter=2, kmeans="two-level", heldout_fraction=0.05)
    assert codec.n_centroids == 280
    assert np.isfinite(codec.centroids).all()


def test_two_level_below_its_minimum_k_is_the_flat_fit(vectors):
    sample, _ = vectors
    assert ResidualCodec.fit(sample, 2, N_CENTROIDS, seed=0, niter=4, kmeans="two-level") == \
        ResidualCodec.fit(sample, 2, N_CENTROIDS, seed=0, niter=4)


def test_fit_rejects_an_unknown_kmeans(vectors):
    with pytest.raises(ValueError, match="kmeans must be one of"):
        ResidualCodec.fit(vectors[0], 2, N_CENTROIDS, kmeans="fast")


# ---- progressive k-means: warm-up iterations on a share of the rows, the last on all ------------
def test_progressive_rows_is_a_quarter_but_enough_per_centroid():
    assert progressive_rows(480_000, 8192) == 8192 * PROGRESSIVE_MIN_ROWS_PER_CENTROID   # 131k > 120k
    assert progressive_rows(4_000_000, 8192) == 1_000_000
    assert progressive_rows(2_000, 256) == 2_000                                        # too few: every row


def test_progressive_kmeans_is_deterministic_order_free_and_close_to_flat_quality(big_sample):
    flat = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4)
    prog = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="progressive")
    assert progressive_rows(int(len(big_sample) * 0.95), 256) < len(big_sample) * 0.95   # a warm-up share
    assert not np.array_equal(prog.centroids, flat.centroids)      # not silently the flat fit
    np.testing.assert_allclose(np.linalg.norm(prog.centroids, axis=1), 1.0, atol=1e-5)
    held = _clustered(1000, DIM, 40, noise=0.6, seed=13)
    assert _mean_residual(prog, held) < 1.05 * _mean_residual(flat, held)
    assert prog == ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="progressive")
    again = ResidualCodec.fit(big_sample[::-1].copy(), 2, 256, seed=0, niter=4, kmeans="progressive")
    np.testing.assert_array_equal(np.sort(again.centroids, axis=0), np.sort(prog.centroids, axis=0))


def test_progressive_kmeans_with_one_iteration_is_the_flat_fit(big_sample):
    assert ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=1, kmeans="progressive") == \
        ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=1)


def test_progressive_kmeans_last_iteration_sees_every_row(big_sample, monkeypatch):
    """With the warm-up cut to the first k rows, k-means on k rows keeps them as they are: the
    codec then equals one flat iteration on every row (which starts from those same rows)."""
    from embedding import codec as codec_mod

    monkeypatch.setattr(codec_mod, "PROGRESSIVE_SHARE", 10 ** 9)
    monkeypatch.setattr(codec_mod, "PROGRESSIVE_MIN_ROWS_PER_CENTROID", 1)
    prog = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=3, kmeans="progressive", device="cpu")
    one = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=1, device="cpu")
    np.testing.assert_allclose(prog.centroids, one.centroids, atol=1e-5)


@pytest.mark.skipif(not native_bf16(), reason="bfloat16 products need AVX-512 BF16 or AMX")
def test_progressive_kmeans_runs_in_bf16_where_auto_would(big_sample, monkeypatch):
    from embedding import codec as codec_mod

    fp32 = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="progressive")
    monkeypatch.setattr(codec_mod, "AUTO_BF16_MIN_FLOPS", 0.0)          # auto: flat-bf16 at any size
    bf = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="progressive")
    assert not np.array_equal(bf.centroids, fp32.centroids)                 # really the bfloat16 path
    assert bf == ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="progressive")
    held = _clustered(1000, DIM, 40, noise=0.6, seed=13)
    assert _mean_residual(bf, held) < 1.02 * _mean_residual(fp32, held)


# ---- k-means in torch (a GPU worker without faiss-gpu) ------------------------------------
@pytest.mark.parametrize("kmeans", ["flat", "two-level", "progressive"])
def test_torch_kmeans_is_faiss_kmeans(big_sample, kmeans, monkeypatch):
    """fit(device=...) runs faiss's spherical k-means in torch: the same start, steps and
    result (here on torch's CPU device; tests/jobs/test_gpu.py does it on CUDA). Where a
    cluster empties, faiss and torch split a cluster drawn by their own generators, so the
    comparison needs a fit where none does (seed 1 here; at seed 0 progressive's warm-up
    empties one): the spy on the clusters' sizes makes sure of it."""
    import torch

    bincount, empties = torch.bincount, []

    def spy(assign, *args, **kwargs):
        counts = bincount(assign, *args, **kwargs)
        empties.append(int((counts == 0).sum()))
        return counts

    monkeypatch.setattr(torch, "bincount", spy)
    a = ResidualCodec.fit(big_sample, 2, 256, seed=1, niter=4, kmeans=kmeans)
    b = ResidualCodec.fit(big_sample, 2, 256, seed=1, niter=4, kmeans=kmeans, device="cpu")
    assert empties and not any(empties), f"a cluster emptied in torch's k-means: {empties}"
    np.testing.assert_allclose(b.centroids, a.centroids, atol=1e-5)
    np.testing.assert_allclose(b.bucket_cutoffs, a.bucket_cutoffs, atol=1e-5)
    assert np.array_equal(a.assign(big_sample), b.assign(big_sample))
    assert b == ResidualCodec.fit(big_sample, 2, 256, seed=1, niter=4, kmeans=kmeans, device="cpu")


def test_torch_kmeans_refills_empty_clusters_like_faiss():
    """Duplicate rows at the start give duplicate starting centroids, so clusters go empty:
    each is refilled by splitting a populated one, and k distinct centroids come out."""
    x = _clustered(4000, DIM, 30, noise=0.6, seed=5)
    x[1:40] = x[0]
    a = ResidualCodec.fit(x, 2, 128, seed=0, niter=6, heldout_fraction=0.0)
    b = ResidualCodec.fit(x, 2, 128, seed=0, niter=6, heldout_fraction=0.0, device="cpu")
    assert len(np.unique(b.centroids.round(5), axis=0)) == 128
    np.testing.assert_allclose(np.linalg.norm(b.centroids, axis=1), 1.0, atol=1e-5)
    fit_a = np.mean(np.max(x @ a.centroids.T, axis=1))
    fit_b = np.mean(np.max(x @ b.centroids.T, axis=1))
    assert fit_b > fit_a - 0.01  # as good a clustering as faiss's (the split draws differ)


# ---- k-means with bfloat16 assignments (kind flat-bf16) ---------------------------------
def test_bf16_kmeans_is_deterministic_and_close_to_flat_quality(big_sample):
    """Overlapping clusters: near-tied rows may join the other centroid, so the centroids
    differ from the flat fit's, but not the quality of the clustering; the same input gives
    the same codec, and compression stays float32 (the exact nearest of its centroids)."""
    flat = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4)
    bf = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="flat-bf16")
    assert bf == ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=4, kmeans="flat-bf16")
    assert not np.array_equal(bf.centroids, flat.centroids)        # really the bfloat16 path
    np.testing.assert_allclose(np.linalg.norm(bf.centroids, axis=1), 1.0, atol=1e-5)
    held = _clustered(1000, DIM, 40, noise=0.6, seed=13)
    assert _mean_residual(bf, held) < 1.02 * _mean_residual(flat, held)
    codes = bf.assign(held).astype(np.int64)
    unit = held / np.linalg.norm(held, axis=1, keepdims=True)
    assert np.array_equal(codes, np.argmax(unit @ bf.centroids.T, axis=1))


def test_auto_kmeans_is_bf16_only_on_a_cpu_that_multiplies_bf16_natively(monkeypatch):
    from embedding import codec as codec_mod

    assert resolve_kmeans("auto") == ("flat-bf16" if native_bf16() else "flat")
    assert resolve_kmeans("auto", device="cuda") == "flat"          # a GPU fit: fp32 takes < 1 s there
    monkeypatch.setattr(codec_mod, "native_bf16", lambda: False)     # emulated bf16 is slower than fp32
    assert resolve_kmeans("auto") == "flat"
    monkeypatch.setattr(codec_mod, "native_bf16", lambda: True)
    assert resolve_kmeans("auto") == "flat-bf16"
    # a small fit: torch's import in the fit task would cost more than bfloat16 saves
    small = kmeans_flops(30_000, 2048, 384, 4)
    assert small < AUTO_BF16_MIN_FLOPS <= kmeans_flops(137_000, 4096, 384, 4)
    assert resolve_kmeans("auto", flops=small) == "flat"
    assert resolve_kmeans("auto", flops=kmeans_flops(137_000, 4096, 384, 4)) == "flat-bf16"
    assert resolve_kmeans("flat-bf16", flops=small) == "flat-bf16"   # an explicit kind is kept
    for kind in KMEANS_KINDS:
        assert resolve_kmeans(kind) == kind
    with pytest.raises(ValueError,
                       match="kmeans must be one of auto, flat, two-level, flat-bf16, progressive, got 'fast'"):
        resolve_kmeans("fast")


def test_bf16_products_says_which_fits_multiply_in_bfloat16(monkeypatch):
    """What the fit task gives torch its threads on: flat-bf16 always, progressive where auto
    would be flat-bf16 (a CPU with native bfloat16, a large enough fit, no GPU)."""
    from embedding import codec as codec_mod

    big = kmeans_flops(500_000, 8192, 384, 4)
    monkeypatch.setattr(codec_mod, "native_bf16", lambda: True)
    assert bf16_products("flat-bf16") and bf16_products("progressive", flops=big)
    assert bf16_products("auto", flops=big)
    assert not bf16_products("flat", flops=big) and not bf16_products("two-level", flops=big)
    assert not bf16_products("progressive", flops=kmeans_flops(30_000, 2048, 384, 4))   # torch's import costs more
    assert not bf16_products("progressive", device="cuda", flops=big)                    # torch float32 on the GPU
    monkeypatch.setattr(codec_mod, "native_bf16", lambda: False)
    assert not bf16_products("progressive", flops=big) and bf16_products("flat-bf16")


def test_native_bf16_asks_the_cpu_flags_first(monkeypatch):
    """A CPU whose flags lack bfloat16 products is answered from them, without torch."""
    from embedding import codec as codec_mod

    monkeypatch.setattr(codec_mod, "cpu_flags", lambda: frozenset({"sse2", "avx2", "avx512f"}))
    monkeypatch.setitem(sys.modules, "torch", None)          # importing torch would raise ImportError
    assert native_bf16() is False
    monkeypatch.setattr(codec_mod, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert native_bf16() is False                           # the flags say yes, but without torch: no
    monkeypatch.undo()
    flags = cpu_flags()
    if flags is not None:                                    # Linux: the flags and torch agree here
        assert native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_auto_kmeans_fit_is_the_fit_of_the_kind_it_resolves_to(big_sample, monkeypatch):
    from embedding import codec as codec_mod

    auto = ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=2, kmeans="auto")
    assert auto == ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=2, kmeans="flat")   # small: flat
    monkeypatch.setattr(codec_mod, "AUTO_BF16_MIN_FLOPS", 0)
    assert ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=2, kmeans="auto") == \
        ResidualCodec.fit(big_sample, 2, 256, seed=0, niter=2, kmeans=resolve_kmeans("auto"))


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_compress_buckets_are_searchsorted_of_the_residuals(vectors, nbits):
    """The packed buckets are ``searchsorted(cutoffs, residual)`` (side left)."""
    sample, held = vectors
    codec = ResidualCodec.fit(sample, nbits, N_CENTROIDS, seed=0, niter=4)
    unit = held / np.linalg.norm(held, axis=1, keepdims=True)
    codes, packed = codec.compress(held)
    residual = unit - codec.centroids[codes.astype(np.int64)]
    expected = np.searchsorted(codec.bucket_cutoffs, residual).astype(np.uint8)
    assert np.array_equal(unpack_bits(packed, nbits, DIM), expected)


def _bf16_search_on(monkeypatch) -> None:
    """Route this process's codec searches through the bfloat16 search whatever their size
    and CPU (torch emulates bfloat16 where the CPU lacks it: slower, the same answers)."""
    import torch  # noqa: F401  (the search uses torch only where a process already has it)

    from embedding import codec as codec_mod

    monkeypatch.setattr(codec_mod, "native_bf16", lambda: True)
    monkeypatch.setattr(codec_mod, "BF16_SEARCH_MIN_FLOPS", 0.0)


def _near_ties(centroids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Rows whose best two centroids score 1e-4..1e-2 apart: inside bfloat16's rounding,
    far outside float32's, so only a search that rescores them gets float32's answer."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(centroids), n), rng.integers(0, len(centroids), n)
    b = np.where(a == b, (b + 1) % len(centroids), b)
    mix = 0.5 + rng.uniform(1e-4, 1e-2, n)[:, None] * rng.choice([-1.0, 1.0], (n, 1))
    rows = mix * centroids[a] + (1 - mix) * centroids[b]
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_bf16_search_gives_float32_nearest_centroids(monkeypatch):
    """The bfloat16 product with float32 rescoring of near ties assigns exactly what a
    float32 search does: on clustered rows, near ties, rows scoring below zero
    everywhere, a zero row, duplicated centroids, and a vector that is not unit length."""
    import torch

    centroids = _clustered(300, DIM, 40, noise=0.8, seed=21)
    centroids[7] = centroids[3]                                # equal scores: the first wins
    codec = ResidualCodec(centroids, 2, np.array([-0.1, 0.0, 0.1], np.float32),
                          np.array([-0.15, -0.05, 0.05, 0.15], np.float32), 0.1)
    ties = _near_ties(centroids, 3000, seed=5)
    rows = np.concatenate([
        _clustered(2000, DIM, 40, noise=0.8, seed=22), ties,
        -centroids[:50],                                        # every score below zero but one near it
        np.zeros((1, DIM), np.float32), centroids[3:4], 7.5 * centroids[10:11],
    ])
    expected = np.argmax(rows @ centroids.T, axis=1)
    assert codec.assign(rows).astype(np.int64).tolist() == expected.tolist()   # numpy here: torch's search is off
    _bf16_search_on(monkeypatch)
    got = codec.assign(rows).astype(np.int64)
    assert got.tolist() == expected.tolist()
    assert got[-3] == 0 and got[-2] == 3
    # the test has teeth: a plain bfloat16 product gets many of the near ties wrong
    plain = (torch.from_numpy(ties).bfloat16() @ torch.from_numpy(centroids).bfloat16().T).float()
    plain = plain.numpy().argmax(axis=1)
    assert (plain != np.argmax(ties @ centroids.T, axis=1)).sum() > 50     # 99 of 3,000 here


def test_bf16_search_in_column_groups_gives_float32_nearest_centroids(monkeypatch):
    """With 1,024 centroids (4 groups of ``ARGMAX_GROUP``) the search reduces column groups
    first: the same answers, equal scores inside one group and across two groups included."""
    from embedding.codec import ARGMAX_GROUP

    k = 4 * ARGMAX_GROUP
    centroids = _clustered(k, DIM, 60, noise=0.8, seed=23)
    centroids[7] = centroids[3]                                 # a tie inside the first group
    centroids[k - 5] = centroids[ARGMAX_GROUP + 9]              # a tie across two groups
    codec = ResidualCodec(centroids, 2, np.array([-0.1, 0.0, 0.1], np.float32),
                          np.array([-0.15, -0.05, 0.05, 0.15], np.float32), 0.1)
    rows = np.concatenate([
        _clustered(2000, DIM, 60, noise=0.8, seed=24), _near_ties(centroids, 3000, seed=6),
        -centroids[:50], np.zeros((1, DIM), np.float32),
        centroids[3:4], centroids[k - 5:k - 4], 3.0 * centroids[ARGMAX_GROUP + 9:ARGMAX_GROUP + 10],
    ])
    expected = np.argmax(rows @ centroids.T, axis=1)
    _bf16_search_on(monkeypatch)
    got = codec.assign(rows).astype(np.int64)
    assert got.tolist() == expected.tolist()
    assert got[-3:].tolist() == [3, ARGMAX_GROUP + 9, ARGMAX_GROUP + 9]   # the first of equal scores
    assert got[-4] == 0                                                  # a zero row: every score 0


@pytest.mark.parametrize("k", [256, 1024, 1000, 4096])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_block_argmax_is_the_first_maximum(k, dtype):
    """``block_argmax`` (column groups where k allows, else ``max``) answers as numpy's argmax:
    the first column of the row's maximum, ties inside and across groups and whole-row ties,
    rows whose maximum is negative, zero (-0 and +0 equal) or a tiny positive score."""
    import torch

    from embedding.codec import block_argmax

    rng = np.random.default_rng(k)
    scores = torch.from_numpy(rng.integers(-40, 40, (300, k)).astype(np.float32) / 64).to(getattr(torch, dtype))
    scores[0] = 0.25                                           # the whole row equal
    scores[1, [5, 700 % k, k - 1]] = 2.0                       # equal maxima far apart
    scores[2, [k - 2, k - 1]] = 2.0
    scores[3] = -scores[3].abs() - 0.125                       # every score negative
    scores[4] = -scores[4].abs()
    scores[4, [3, k - 3]] = -0.0                               # a maximum of zero: -0 first,
    scores[4, [300 % k, k - 1]] = 0.0                          # then +0 (equal values)
    scores[5] = -0.0                                           # the whole row -0
    scores[6] = -scores[6].abs() - 0.5
    scores[6, k - 1] = 2.0 ** -20                              # one tiny positive score, last
    expected = scores.float().numpy().argmax(axis=1)
    assert block_argmax(scores).tolist() == expected.tolist()
    assert block_argmax(scores[:0]).tolist() == []


def test_grouped_top2_is_the_two_best_and_the_first_maximum():
    """``grouped_top2`` (the bfloat16 search's reduction): each row's best and second best
    scores and the first column of the best, as numpy finds them, for rows of either sign,
    equal maxima inside and across groups, maxima of zero (-0 before +0) and whole-row ties;
    the groups' maxima are the groups' own."""
    import torch

    from embedding.codec import ARGMAX_GROUP, grouped_top2

    k = 8 * ARGMAX_GROUP
    rng = np.random.default_rng(5)
    scores = torch.from_numpy(rng.integers(-90, 40, (400, k)).astype(np.float32) / 128).bfloat16()
    scores[0] = 0.25
    scores[1, [5, 700, k - 1]] = 2.0
    scores[2] = -scores[2].abs() - 0.125
    scores[3] = -scores[3].abs()
    scores[3, [3, k - 3]] = -0.0
    scores[3, [300, k - 1]] = 0.0
    scores[4] = -0.0
    scores[6] = -scores[6].abs() - 0.125
    scores[6, [3, 10]] = torch.tensor([-0.0, 0.0]).bfloat16()   # -0 then +0 inside one group
    scores[5] = -scores[5].abs() - 0.25
    scores[5, [ARGMAX_GROUP + 1, 7 * ARGMAX_GROUP]] = -0.125   # a negative maximum twice
    values = scores.float().numpy()
    top, best, maxima = grouped_top2(scores.clone())
    ordered = np.sort(values, axis=1)
    assert best.tolist() == values.argmax(axis=1).tolist()
    assert np.array_equal(top.numpy(), ordered[:, ::-1][:, :2])
    assert np.array_equal(maxima.float().numpy(), values.reshape(len(values), -1, ARGMAX_GROUP).max(axis=2))


def test_bf16_search_compresses_exactly_as_float32(monkeypatch, vectors, codecs):
    """compress on the bfloat16 search: the same codes, residual bytes and |residual| sum."""
    _, held = vectors
    rows = np.concatenate([held, _near_ties(np.asarray(codecs[2].centroids), 500, seed=9)])
    for nbits, codec in codecs.items():
        codes, packed, abs_sum = codec.compress_with_residual_sum(rows)
        _bf16_search_on(monkeypatch)
        codes2, packed2, abs_sum2 = ResidualCodec.from_bytes(codec.to_bytes()).compress_with_residual_sum(rows)
        monkeypatch.undo()
        assert np.array_equal(codes, codes2) and np.array_equal(packed, packed2), nbits
        assert abs_sum2 == abs_sum


def test_bf16_search_is_used_only_where_it_pays(monkeypatch):
    import torch  # noqa: F401

    from embedding import codec as codec_mod
    from embedding.codec import BF16_SEARCH_MIN_FLOPS, use_bf16_search

    monkeypatch.setattr(codec_mod, "native_bf16", lambda: True)
    big = int(BF16_SEARCH_MIN_FLOPS / (2 * 4096 * 384)) + 1
    assert use_bf16_search(big, 4096, 384)
    assert not use_bf16_search(big // 4, 4096, 384)            # too small to repay the setup
    assert not use_bf16_search(big, 1 << 17, 384)              # codes past 16 bits: numpy
    monkeypatch.setattr(codec_mod, "native_bf16", lambda: False)
    assert not use_bf16_search(big, 4096, 384)                 # emulated bfloat16: slower than float32
    monkeypatch.setattr(codec_mod, "native_bf16", lambda: True)
    monkeypatch.delitem(sys.modules, "torch")                  # a process without torch never imports it
    assert not use_bf16_search(big, 4096, 384)


def test_ready_bf16_search_sets_threads_and_imports_torch_only_where_it_pays(monkeypatch):
    import torch

    from embedding import codec as codec_mod
    from embedding.codec import TORCH_SEARCH_MIN_CENTROIDS, ready_bf16_search

    before = torch.get_num_threads()
    monkeypatch.setattr(codec_mod, "native_bf16", lambda: True)
    try:
        ready_bf16_search(1024, 1)                     # torch already there: its threads are set
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.delitem(sys.modules, "torch")
    ready_bf16_search(TORCH_SEARCH_MIN_CENTROIDS // 2, 1)    # a small codec: no 1.3 s import
    assert "torch" not in sys.modules
    monkeypatch.setattr(codec_mod, "native_bf16", lambda: False)
    ready_bf16_search(TORCH_SEARCH_MIN_CENTROIDS, 1)         # no native bfloat16: nothing to ready
    assert "torch" not in sys.modules


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_bucket_cutoffs_and_weights_are_the_residual_quantiles(vectors, nbits):
    # heldout_fraction=0: the bucket statistics come from the training rows' own residuals
    sample, _ = vectors
    codec = ResidualCodec.fit(sample, nbits, N_CENTROIDS, seed=3, heldout_fraction=0.0)
    x = sample / np.linalg.norm(sample, axis=1, keepdims=True)
    residuals = (x - codec.centroids[np.argmax(x @ codec.centroids.T, axis=1)]).astype(np.float64).ravel()
    n = 1 << nbits
    np.testing.assert_array_equal(codec.bucket_cutoffs,
                                  np.quantile(residuals, np.arange(1, n) / n).astype(np.float32))
    np.testing.assert_allclose(codec.bucket_weights,
                               np.quantile(residuals, (np.arange(n) + 0.5) / n).astype(np.float32), rtol=0, atol=1e-7)
