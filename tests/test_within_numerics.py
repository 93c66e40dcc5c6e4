"""Stage 1's numerical kernels against plain oracles: patch gathering and its sampling rule,
the partial eigendecomposition, Cholesky whitening against ZCA, k-means filters, the float32
Gaussian draws, stage 2's moments."""
from __future__ import annotations

import numpy as np
import scipy.linalg
import pytest

from caffe_utils import fillers
from caffe_utils.fillers import fill
from caffe_utils.layers.im2col import im2col_batch, out_shape
from caffe_utils.magic import patches as pmod
from caffe_utils.magic import weights, within
from caffe_utils.measure import channel_stats
from caffe_utils.schema import caffe_pb2


@pytest.mark.parametrize("kernel,pad,stride,dilation", [((3, 3), (1, 1), (2, 2), (1, 1)),
                                                        ((5, 3), (0, 2), (1, 3), (2, 1)),
                                                        ((11, 11), (0, 0), (4, 4), (1, 1))])
def test_gather_patches_are_im2col_columns(kernel, pad, stride, dilation):
    x = np.random.RandomState(0).standard_normal((4, 31, 29)).astype(np.float32)
    oh, ow = out_shape(x.shape[1:], kernel, pad, stride, dilation)
    cols = im2col_batch(x[None], kernel, pad, stride, dilation)     # (C*kh*kw, oh*ow)
    pos = pmod.patch_positions(3, 5, 7, oh * ow, min(17, oh * ow))
    got = pmod.gather_patches(x, pos, kernel, pad, stride, dilation, ow)
    np.testing.assert_array_equal(got, cols[:, pos].T)


def test_patch_positions_follow_the_rule():
    a = pmod.patch_positions(1, 4, 9, 3025, 40)
    assert len(set(a.tolist())) == 40 and a.max() < 3025
    np.testing.assert_array_equal(pmod.patch_positions(1, 4, 9, 3025, 40), a)     # the same seed, layer, image
    np.testing.assert_array_equal(pmod.patch_positions(1, 4, 9, 3025, 11), a[:11])  # a smaller count: a prefix
    assert not np.array_equal(pmod.patch_positions(1, 4, 10, 3025, 40), a)        # another image
    assert not np.array_equal(pmod.patch_positions(2, 4, 9, 3025, 40), a)         # another seed
    assert pmod.per_image_count(160, 3025, 1686) == 11 and pmod.per_image_count(4, 9, 100) == 9


def _spd(d, m, seed=0):
    rng = np.random.RandomState(seed)
    x = (rng.standard_normal((m, d)) @ rng.standard_normal((d, d)) * np.linspace(3, 0.1, d)).astype(np.float32)
    x -= x.mean(axis=0)
    return x


def test_top_eigh_matches_full_eigh_on_the_used_components():
    x = _spd(60, 400)
    cov, _ = weights.covariance(x)
    lam, u = weights.top_eigh(cov, 12)
    ref_lam, ref_u = np.linalg.eigh(cov.astype(np.float64))
    ref_lam, ref_u = ref_lam[::-1][:12], ref_u[:, ::-1][:, :12]
    np.testing.assert_allclose(lam, ref_lam, rtol=1e-5)
    assert u.shape == (60, 12)
    np.testing.assert_allclose(np.abs(np.sum(u * ref_u, axis=0)), 1.0, atol=1e-4)  # the same vectors up to sign
    full, _ = weights.top_eigh(cov, 60)
    np.testing.assert_allclose(full, np.clip(np.linalg.eigvalsh(cov.astype(np.float64))[::-1], 0, None),
                               rtol=1e-4, atol=1e-5 * ref_lam[0])


def test_covariance_and_eps():
    x = _spd(20, 300)
    cov, eps = weights.covariance(x)
    ref = x.astype(np.float64).T @ x / 300
    np.testing.assert_allclose(cov, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert eps == pytest.approx(1e-2 * np.linalg.eigvalsh(ref).mean(), rel=1e-5)


def _zca64(x, eps):
    lam, u = np.linalg.eigh(x.astype(np.float64).T @ x / x.shape[0])
    return (u / np.sqrt(lam + eps)) @ u.T


def test_cholesky_whitening_is_zca_up_to_a_rotation():
    x = _spd(30, 500)
    cov, eps = weights.covariance(x)
    y = x.copy()
    weights.whiten_rows(y, weights.whitening_factor(cov, eps))
    z = x.astype(np.float64) @ _zca64(x, eps)
    # the Gram matrix of the whitened patches does not see a rotation of them
    np.testing.assert_allclose(y @ y.T, z @ z.T, rtol=0, atol=2e-4 * np.abs(z @ z.T).max())


@pytest.mark.parametrize("overwrite", [False, True])
def test_whitening_factor_in_place_and_its_float64_retry(overwrite):
    """The factor is L with L L^T = cov + eps I, lower triangular; with ``overwrite`` it is made
    in cov's own memory. A cov that float32 cannot factor (rank 3, tiny eps) is factored again
    in float64 from what the float32 attempt left of it."""
    x = _spd(30, 500)
    cov, eps = weights.covariance(x)
    want = np.linalg.cholesky(cov.astype(np.float64) + eps * np.eye(30))
    given = cov.copy()
    factor = weights.whitening_factor(given, eps, overwrite=overwrite)
    assert np.shares_memory(factor, given) == overwrite
    np.testing.assert_allclose(factor, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert not np.triu(factor, 1).any()
    u = np.random.default_rng(1).standard_normal((50, 3))
    low_rank = (u @ u.T).astype(np.float32)
    want = scipy.linalg.cholesky(low_rank.astype(np.float64) + 1e-6 * np.eye(50), lower=True).astype(np.float32)
    with pytest.raises(np.linalg.LinAlgError):
        scipy.linalg.cholesky(low_rank + np.float32(1e-6) * np.eye(50, dtype=np.float32), lower=True)
    np.testing.assert_array_equal(weights.whitening_factor(low_rank.copy(), 1e-6, overwrite=overwrite), want)


def _kmeans_zca_naive(x, k, iters, rng):
    """k-means filters as the paper's recipe says: ZCA-whiten (float64), normalise, cluster by a
    plain loop from the centres kmeans_filters would start from, rotated into ZCA space."""
    cov, eps = weights.covariance(x)
    zca = _zca64(x, eps)
    factor = weights.whitening_factor(cov, eps).astype(np.float64)
    q = np.linalg.solve(factor, np.linalg.inv(zca))          # y = q z, q orthogonal
    z = x.astype(np.float64) @ zca
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-8
    c = rng.standard_normal((x.shape[1], k)).astype(np.float32).astype(np.float64)
    c = q.T @ (c / np.linalg.norm(c, axis=0, keepdims=True))
    for _ in range(iters):
        new = np.zeros_like(c)
        for i in range(z.shape[0]):
            dots = z[i] @ c
            j = int(np.argmax(np.abs(dots)))
            new[:, j] += dots[j] * z[i]
        c = new + c
        c /= np.linalg.norm(c, axis=0, keepdims=True)
    return (zca @ c).T


def test_kmeans_filters_match_zca_kmeans():
    rng = np.random.RandomState(2)
    centres = rng.standard_normal((4, 8)) * 4
    x = (centres[rng.randint(0, 4, 600)] + rng.standard_normal((600, 8))).astype(np.float32)
    x -= x.mean(axis=0)
    cov, eps = weights.covariance(x)
    fast = weights.kmeans_filters(x.copy(), cov, eps, 4, np.random.RandomState(7), 5)
    slow = _kmeans_zca_naive(x, 4, 5, np.random.RandomState(7))
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-3 * np.abs(slow).max())


def test_data_driven_weights_overwrite_uses_the_rows_in_place():
    rows = _spd(12, 300)
    keep = rows.copy()
    w = weights.data_driven_weights("kmeans", rows.T, 5, np.random.default_rng(0), overwrite=True)
    assert w.shape == (5, 12) and np.all(np.isfinite(w))
    assert not np.array_equal(rows, keep)                                          # centred/whitened in place
    w2 = weights.data_driven_weights("kmeans", keep.T, 5, np.random.default_rng(0))
    np.testing.assert_allclose(w, w2, rtol=1e-5, atol=1e-6 * np.abs(w2).max())
    assert weights.data_driven_weights("pca", keep.T, 20, np.random.default_rng(0)).shape == (20, 12)
    assert weights.data_driven_weights("zca", keep.T, 20, np.random.default_rng(0)).shape == (20, 12)


def test_gaussian_written_into_the_blob():
    out = np.empty((300, 200), np.float32)
    got = weights.gaussian(out.shape, np.random.default_rng(4), std=0.5, out=out)
    assert got is out
    ref = np.random.default_rng(4).standard_normal(out.shape, dtype=np.float32) * np.float32(0.5)
    np.testing.assert_array_equal(out, ref)
    assert weights.gaussian((7,), np.random.RandomState(0)).dtype == np.float32
    seq = weights.layer_rng(3, 5).standard_normal(4)
    np.testing.assert_array_equal(weights.layer_rng(3, 5).standard_normal(4), seq)


@pytest.mark.parametrize("kind", ["gaussian", "msra", "xavier", "uniform"])
def test_fill_with_a_generator_into_out(kind):
    f = caffe_pb2().FillerParameter(type=kind, std=0.2, mean=0.1, min=-2, max=3)
    out = np.empty((500, 40, 3, 3), np.float32)
    assert fill(f, out.shape, np.random.default_rng(1), out=out) is out
    old = fill(f, out.shape, np.random.RandomState(1))          # the RandomState stream, same distribution
    assert out.mean() == pytest.approx(old.mean(), abs=0.01 * max(old.std(), 1))
    assert out.std() == pytest.approx(old.std(), rel=0.01)
    if kind == "uniform":
        assert out.min() >= -2 and out.max() <= 3


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_a_large_blob_is_drawn_in_parts_by_seeded_generators(monkeypatch, kind):
    """Past fillers.PART values each part has its own generator, seeded by the caller's: the
    threaded fill equals a plain loop over the parts, and the parts are independent streams."""
    monkeypatch.setattr(fillers, "PART", 1000)
    f = caffe_pb2().FillerParameter(type=kind, std=0.2, mean=0.1, min=-2, max=3)
    got = fill(f, (7, 500), np.random.default_rng(3))
    seeds = np.random.default_rng(3).integers(0, 2 ** 63, size=4, dtype=np.uint64)
    ref = np.empty(3500, np.float32)
    for i, s in enumerate(seeds):                                    # the oracle: one part after another
        g = np.random.Generator(np.random.SFC64(int(s)))
        part = ref[i * 1000:(i + 1) * 1000]
        if kind == "gaussian":
            part[...] = g.standard_normal(part.size, dtype=np.float32) * np.float32(0.2) + np.float32(0.1)
        else:
            part[...] = g.random(part.size, dtype=np.float32) * np.float32(5) + np.float32(-2)
    np.testing.assert_array_equal(got.reshape(-1), ref)
    assert not np.array_equal(got.reshape(-1)[:1000], got.reshape(-1)[1000:2000])
    small = fill(f, (7, 100), np.random.default_rng(3))              # up to PART: the caller's stream
    if kind == "gaussian":
        plain = np.random.default_rng(3).standard_normal(700, dtype=np.float32) * np.float32(0.2) + np.float32(0.1)
        np.testing.assert_array_equal(small.reshape(-1), plain)
    w = weights.gaussian((4, 1000), np.random.default_rng(5), std=0.5)
    assert w.dtype == np.float32 and w.std() == pytest.approx(0.5, rel=0.05)
    np.testing.assert_array_equal(w, weights.gaussian((4, 1000), np.random.default_rng(5), std=0.5))


def test_image_moments_match_channel_stats():
    top = np.random.RandomState(0).standard_normal((5, 3, 4, 6)).astype(np.float32) + 2
    for got, ref in zip(within.image_moments(top, 4), channel_stats(top, 4)):
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    for got, ref in zip(within.image_moments(top[:, :, 0, 0], 3), channel_stats(top[:, :, 0, 0], 3)):
        np.testing.assert_allclose(got, ref, rtol=1e-12)
