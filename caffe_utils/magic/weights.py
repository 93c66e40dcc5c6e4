"""Stage 1: the weights of each affine layer, before any scaling (paper §3.1 and §3.3).

* ``gaussian``: N(0, 0.01^2); ``xavier``/``msra``: Caffe's fillers; ``orthogonal``: Saxe et al.;
* data-driven, on the layer's real input patches (Convolution only; other layers fall back to
  Gaussian): ``pca`` (whitened principal directions), ``zca`` (rows of the ZCA whitening
  matrix), ``kmeans`` (spherical k-means on ZCA-whitened, unit-length patches, Coates & Ng
  2012) and ``rand`` (random patches).

Patches are subsampled per image: enough for a regularised covariance (2 per dimension) and for
k-means (10 per centre: an initialization needs directions, not a converged dictionary),
bounded by ``mem_limit``. Biases start at zero; stage 2 sets them.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import scipy.linalg
import scipy.sparse

from caffe_utils import layout
from caffe_utils.fillers import fill
from caffe_utils.layers.im2col import im2col_batch, out_shape
from caffe_utils.layers.vision import conv_geometry
from caffe_utils.magic.context import InitContext
from caffe_utils.magic.options import DATA_DRIVEN
from caffe_utils.magic.report import Fallback, LayerReport
from caffe_utils.schema import caffe_pb2


def initialize_weights(ctx: InitContext, lp, idx: int) -> None:
    """Fill affine layer ``lp`` (at position ``idx``) with ``ctx.opts.init``'s weights, zero bias."""
    blobs = ctx.net.params[lp.name]
    rep = ctx.layers[lp.name]
    kind = ctx.opts.init
    if kind in DATA_DRIVEN and lp.type not in layout.CONVOLUTION_TYPES:
        kind, rep.fallback = "gaussian", Fallback.NOT_CONVOLUTION
    if kind in DATA_DRIVEN:
        rows = _data_driven(ctx, lp, idx, kind, rep)
        if rows is not None:
            layout.set_rows(lp, blobs[0], rows)
            _zero_bias(blobs)
            rep.init = kind
            return
        kind = "gaussian"
    w = blobs[0].data
    if kind == "gaussian":
        w[...] = gaussian(w.shape, ctx.rng)
    elif kind == "orthogonal":
        n = layout.num_output(lp)
        rows = orthogonal((n, w.size // n), ctx.rng)
        w[...] = 0
        layout.set_rows(lp, blobs[0], rows)
    else:
        w[...] = fill(caffe_pb2().FillerParameter(type=kind), w.shape, ctx.rng)
    _zero_bias(blobs)
    rep.init = kind


def _zero_bias(blobs) -> None:
    if len(blobs) > 1:
        blobs[1].data[...] = 0


def gaussian(shape, rng: np.random.RandomState, std: float = 0.01) -> np.ndarray:
    """N(0, std^2) float32 weights, drawn in float32 by a PCG64 generator seeded from ``rng``
    (no float64 copy of a large FC blob)."""
    gen = np.random.Generator(np.random.PCG64(rng.randint(0, 2 ** 31)))
    w = gen.standard_normal(shape, dtype=np.float32)
    w *= np.float32(std)
    return w


def orthogonal(shape, rng: np.random.RandomState) -> np.ndarray:
    """Rows (or columns, whichever are fewer) orthonormal: the Q of a Gaussian matrix's QR."""
    rows = shape[0]
    cols = int(np.prod(shape[1:]))
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    w = q if rows >= cols else q.T
    return w[:rows, :cols].reshape(shape).astype(np.float32)


def _data_driven(ctx: InitContext, lp, idx: int, kind: str, rep: LayerReport) -> Optional[np.ndarray]:
    """Convolution ``lp``'s (num_output, fan) rows from its input patches, or None (and a
    warning) when the sample has too few patches for ``kind``."""
    groups = layout.conv_group(lp)
    patches, m, d = _patches(ctx, lp, idx)
    k = lp.convolution_param.num_output // groups
    need = max(d + 1, 4 * k) if kind in ("kmeans", "pca", "zca") else k
    if m < need:
        ctx.warn(f"layer '{lp.name}': only {m} input patches for {kind} with {k} filters of size {d} "
                 f"(need {need}); using gaussian weights: give more images (-n) to use {kind}")
        rep.fallback, rep.requested = Fallback.TOO_FEW_PATCHES, kind
        return None
    rows = [data_driven_weights(kind, patches[g, :, :m], k, ctx.rng, overwrite=True) for g in range(groups)]
    del patches
    return np.vstack(rows).astype(np.float32)


def _patches(ctx: InitContext, lp, idx: int) -> Tuple[np.ndarray, int, int]:
    """(groups, D, M) random input patches of convolution ``lp``, a few from every image; the
    count M filled; the patch size D per group."""
    cp = lp.convolution_param
    kernel, pad, stride, dilation = conv_geometry(cp)
    groups = layout.conv_group(lp)
    net, batches = ctx.net, ctx.batches
    shape = net.blobs[lp.bottom[0]].data.shape
    d = shape[1] // groups * kernel[0] * kernel[1]
    k = cp.num_output // groups
    oh, ow = out_shape(shape[2:], kernel, pad, stride, dilation)
    cap = max(1, min(2 * d + 10 * k, 100_000, int(ctx.opts.mem_limit // (4 * d * groups * 3))))
    per_image = min(int(math.ceil(min(batches.n * oh * ow, cap) / batches.n)), oh * ow)
    patches = np.empty((groups, d, per_image * batches.n), np.float32)
    m = 0
    for valid in batches.through(idx - 1):
        x = net.blobs[lp.bottom[0]].data[:valid]
        for i in range(x.shape[0]):
            cols = im2col_batch(x[i:i + 1], kernel, pad, stride, dilation)  # (C*kh*kw, oh*ow)
            pick = ctx.rng.choice(cols.shape[1], per_image, replace=False)
            patches[:, :, m:m + per_image] = cols[:, pick].reshape(groups, d, per_image)
            m += per_image
    return patches, m, d


def whitening(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigen-decomposition of the patch covariance: (eigvals desc (float64), eigvecs (D,D) (float32),
    1/sqrt(l+eps) (float64)). Computed in float32 (divide and conquer): its error, ~1e-7 of the
    largest eigenvalue, is far below the eps that regularises the small ones."""
    cov = (x @ x.T) / np.float32(x.shape[1])
    try:
        lam, u = scipy.linalg.eigh(cov, driver="evd", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        lam, u = np.linalg.eigh(cov.astype(np.float64))
    lam = lam.astype(np.float64)
    lam, u = lam[::-1].clip(min=0), u[:, ::-1]
    eps = 1e-2 * float(lam.mean()) + 1e-12
    return lam, u, 1.0 / np.sqrt(lam + eps)


def data_driven_weights(kind: str, patches: np.ndarray, k: int, rng: np.random.RandomState,
                        kmeans_iters: int = 10, overwrite: bool = False) -> np.ndarray:
    """``k`` filters (k, D) from patches (D, M), centred, by ``pca``/``zca``/``kmeans``/``rand``.

    With ``overwrite`` a float32 ``patches`` array is centred in place (saves a copy of it)."""
    d, m = patches.shape
    x = patches if overwrite and patches.dtype == np.float32 else patches.astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    if kind == "rand":
        idx = rng.choice(m, k, replace=m < k)
        w = x[:, idx].T
        return w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-12)
    lam, u, inv = whitening(x)
    if kind == "pca":
        n = min(k, d)
        w = (u[:, :n] * inv[:n]).T
        if k > d:
            extra = rng.standard_normal((k - d, d)) @ (u * inv).T
            w = np.vstack([w, extra / np.sqrt(d)])
        return w
    zca = (u * inv.astype(u.dtype)) @ u.T
    if kind == "zca":
        rows = rng.choice(d, min(k, d), replace=False)
        w = zca[rows]
        if k > d:
            w = np.vstack([w, rng.standard_normal((k - d, d)) @ zca / np.sqrt(d)])
        return w
    # spherical k-means on whitened, unit-length patches (Coates & Ng 2012)
    zca = zca.astype(np.float32)
    xw = x.T @ zca                          # (m, d): a whitened patch per row (zca is symmetric)
    del x
    xw /= np.linalg.norm(xw, axis=1, keepdims=True) + 1e-8
    centers = rng.standard_normal((d, k)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=0, keepdims=True)
    centers = spherical_kmeans(xw, centers, kmeans_iters, rng)
    return centers.T @ zca


def spherical_kmeans(xw: np.ndarray, centers: np.ndarray, iters: int, rng: np.random.RandomState) -> np.ndarray:
    """``iters`` rounds of spherical k-means (Coates & Ng 2012) from unit ``centers`` (d, k) on
    unit patches ``xw`` (m, d): each patch joins the centre with the largest ``|dot|``, each centre
    becomes its old self plus the sum of its members weighted by their dots, renormalised. A
    centre without members is re-seeded with a random patch. Returns the centres (d, k).

    The members' weighted sums are one sparse (k, m) by dense (m, d) product (m*d work) rather
    than a product with a dense (m, k) assignment matrix (m*d*k)."""
    m = xw.shape[0]
    k = centers.shape[1]
    rows = np.arange(m)
    for _ in range(iters):
        s = xw @ centers                          # (m, k)
        best = np.argmax(np.abs(s), axis=1)
        coef = s[rows, best]
        assign = scipy.sparse.csr_matrix((coef, (best, rows)), shape=(k, m))
        new = np.asarray(assign @ xw, dtype=np.float32)   # (k, d)
        norms = np.linalg.norm(new, axis=1)
        empty = norms < 1e-12
        if np.any(empty):  # re-seed empty clusters with random patches
            new[empty] = xw[rng.choice(m, int(empty.sum()), replace=m < empty.sum())]
        centers = new.T + centers
        centers /= np.linalg.norm(centers, axis=0, keepdims=True) + 1e-12
    return centers
