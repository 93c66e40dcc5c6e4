"""Stage 1: the weights of each affine layer, before any scaling (paper §3.1 and §3.3).

* ``gaussian``: N(0, 0.01^2); ``xavier``/``msra``: Caffe's fillers; ``orthogonal``: Saxe et al.;
* data-driven, on the layer's real input patches (Convolution only; other layers fall back to
  Gaussian): ``pca`` (whitened principal directions), ``zca`` (rows of the ZCA whitening
  matrix), ``kmeans`` (spherical k-means on whitened, unit-length patches, Coates & Ng 2012;
  whitened by a Cholesky factor, which is ZCA up to a rotation k-means does not see) and
  ``rand`` (random patches).

Patches are subsampled per image (the rule is in :mod:`~caffe_utils.magic.patches`): enough for
a regularised covariance (2 per dimension) and for k-means (10 per centre: an initialization
needs directions, not a converged dictionary), bounded by ``mem_limit``. A patch is a row of one
float32 matrix that is centred and whitened in place. PCA computes only the eigenpairs it uses.
Every random draw for a layer comes from a generator seeded by the run's seed and the layer's
position (:func:`layer_rng`). Biases start at zero; stage 2 sets them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional, Tuple

import numpy as np
import scipy.linalg
import scipy.sparse

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it LAPACK uses the BLAS's own thread count
    threadpool_limits = None

from caffe_utils import layout
from caffe_utils.fillers import fill, gaussian32
from caffe_utils.layers.im2col import out_shape
from caffe_utils.layers.vision import conv_geometry
from caffe_utils.magic.context import InitContext
from caffe_utils.magic.options import DATA_DRIVEN
from caffe_utils.magic.patches import gather_patches, patch_positions, per_image_count
from caffe_utils.magic.report import Fallback, LayerReport
from caffe_utils.schema import caffe_pb2


#: rounds of spherical k-means: an initialization needs directions, not a converged dictionary
KMEANS_ITERATIONS = 10


def layer_rng(seed: int, idx: int) -> np.random.Generator:
    """The generator of every stage-1 draw of the layer at net position ``idx``: seeded by the
    run's seed and the position only, so a layer's weights do not depend on which other layers
    were (re-)initialized before it."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0, int(idx)])))


def initialize_weights(ctx: InitContext, lp, idx: int) -> None:
    """Fill affine layer ``lp`` (at position ``idx``) with ``ctx.opts.init``'s weights, zero bias."""
    blobs = ctx.net.params[lp.name]
    rep = ctx.layers[lp.name]
    kind = ctx.opts.init
    rng = layer_rng(ctx.opts.seed, idx)
    if kind in DATA_DRIVEN and lp.type not in layout.CONVOLUTION_TYPES:
        kind, rep.fallback = "gaussian", Fallback.NOT_CONVOLUTION
    if kind in DATA_DRIVEN:
        rows = _data_driven(ctx, lp, idx, kind, rep, rng)
        if rows is not None:
            layout.set_rows(lp, blobs[0], rows)
            _zero_bias(blobs)
            rep.init = kind
            return
        kind = "gaussian"
    w = blobs[0].data
    if kind == "gaussian":
        gaussian(w.shape, rng, out=w)
    elif kind == "orthogonal":
        n = layout.num_output(lp)
        rows = orthogonal((n, w.size // n), rng)
        w[...] = 0
        layout.set_rows(lp, blobs[0], rows)
    else:
        fill(caffe_pb2().FillerParameter(type=kind), w.shape, rng, out=w)
    _zero_bias(blobs)
    rep.init = kind


def _zero_bias(blobs) -> None:
    if len(blobs) > 1:
        blobs[1].data[...] = 0


def gaussian(shape, rng, std: float = 0.01, out: Optional[np.ndarray] = None) -> np.ndarray:
    """N(0, std^2) float32 weights of ``shape``, drawn in float32 straight into ``out`` when it is
    a contiguous float32 array (a large FC blob then needs no temporary of its size; it is drawn
    in parts, :func:`~caffe_utils.fillers.gaussian32`). ``rng`` is a Generator, or a RandomState
    that seeds one."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.Generator(np.random.PCG64(rng.randint(0, 2 ** 31)))
    direct = out is not None and out.dtype == np.float32 and out.flags.c_contiguous
    w = gaussian32(tuple(shape), rng, 0.0, std, out if direct else None)
    if out is not None and not direct:
        out[...] = w
    return w if out is None else out


def orthogonal(shape, rng: np.random.RandomState) -> np.ndarray:
    """Rows (or columns, whichever are fewer) orthonormal: the Q of a Gaussian matrix's QR."""
    rows = shape[0]
    cols = int(np.prod(shape[1:]))
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    w = q if rows >= cols else q.T
    return w[:rows, :cols].reshape(shape).astype(np.float32)


def _data_driven(ctx: InitContext, lp, idx: int, kind: str, rep: LayerReport,
                 rng: np.random.Generator) -> Optional[np.ndarray]:
    """Convolution ``lp``'s (num_output, fan) rows from its input patches, or None (and a
    warning) when the sample has too few patches for ``kind``."""
    groups = layout.conv_group(lp)
    patches, m, d = _patches(ctx, lp, idx)
    k = lp.convolution_param.num_output // groups
    need = patches_needed(kind, d, k)
    if m < need:
        ctx.warn(f"layer '{lp.name}': only {m} input patches for {kind} with {k} filters of size {d} "
                 f"(need {need}); using gaussian weights: give more images (-n) to use {kind}")
        rep.fallback, rep.requested = Fallback.TOO_FEW_PATCHES, kind
        return None
    rows = [data_driven_weights(kind, patches[g, :m].T, k, rng, overwrite=True) for g in range(groups)]
    del patches
    return np.vstack(rows).astype(np.float32)


class PatchPlan(NamedTuple):
    """What stage 1 samples from a convolution's input: its geometry, the groups, the patch size
    ``d`` and the filters ``k`` per group, the output positions of an image (``out_w`` wide) and
    the patches taken from each image (the rule of :mod:`~caffe_utils.magic.patches`)."""
    kernel: Tuple[int, int]
    pad: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    d: int
    k: int
    out_w: int
    positions: int
    per_image: int


def patch_plan(lp, bottom_shape, images: int, mem_limit: int) -> PatchPlan:
    """The :class:`PatchPlan` of convolution ``lp`` on an input of ``bottom_shape`` (N, C, H, W)
    for a sample of ``images``: per group 2 patches per dimension (a regularised covariance) and
    10 per centre (k-means), at most 100,000 and what fits in ``mem_limit`` three times over."""
    kernel, pad, stride, dilation = conv_geometry(lp.convolution_param)
    groups = layout.conv_group(lp)
    d = bottom_shape[1] // groups * kernel[0] * kernel[1]
    k = lp.convolution_param.num_output // groups
    oh, ow = out_shape(bottom_shape[2:], kernel, pad, stride, dilation)
    budget = max(1, min(2 * d + 10 * k, 100_000, int(mem_limit // (4 * d * groups * 3))))
    return PatchPlan(kernel, pad, stride, dilation, groups, d, k, ow, oh * ow,
                     per_image_count(images, oh * ow, budget))


def _patches(ctx: InitContext, lp, idx: int) -> Tuple[np.ndarray, int, int]:
    """(groups, M, D) input patches of convolution ``lp``, a patch per row, a few from every
    image by :func:`patch_plan`; the count M filled; the patch size D per group."""
    net, batches = ctx.net, ctx.batches
    plan = patch_plan(lp, net.blobs[lp.bottom[0]].data.shape, batches.n, ctx.opts.mem_limit)
    groups, d, per_image = plan.groups, plan.d, plan.per_image
    patches = np.empty((groups, per_image * batches.n, d), np.float32)
    m = 0
    for b, valid in enumerate(batches.through(idx - 1)):
        x = net.blobs[lp.bottom[0]].data
        for i in range(valid):  # each image's rows (p, groups*d), split by group
            pos = patch_positions(ctx.opts.seed, idx, b * batches.batch + i, plan.positions, per_image)
            rows = gather_patches(x[i], pos, plan.kernel, plan.pad, plan.stride, plan.dilation, plan.out_w)
            patches[:, m:m + per_image] = rows.reshape(per_image, groups, d).transpose(1, 0, 2)
            m += per_image
    return patches, m, d


def patches_needed(kind: str, d: int, k: int) -> int:
    """The fewest patches ``kind`` needs for ``k`` filters of size ``d`` (fewer: Gaussian)."""
    return max(d + 1, 4 * k) if kind in ("kmeans", "pca", "zca") else k


def data_driven_weights(kind: str, patches: np.ndarray, k: int, rng, kmeans_iters: int = KMEANS_ITERATIONS,
                        overwrite: bool = False) -> np.ndarray:
    """``k`` filters (k, D) from patches (D, M), centred, by ``pca``/``zca``/``kmeans``/``rand``;
    ``rng`` a Generator or RandomState.

    With ``overwrite``, a float32 ``patches`` whose transpose is C-contiguous (a patch per row in
    memory, as stage 1 gathers them) is centred and whitened in place: no copy of it is made."""
    if overwrite and patches.dtype == np.float32 and patches.T.flags.c_contiguous:
        x = patches.T
    else:
        x = np.array(patches.T, dtype=np.float32, order="C")
    m, d = x.shape
    x -= x.mean(axis=0, dtype=np.float64).astype(np.float32)
    if kind == "rand":
        w = x[rng.choice(m, k, replace=m < k)]
        return w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-12)
    cov, eps = covariance(x)
    if kind == "pca":
        return pca_filters(cov, eps, k, rng)
    if kind == "zca":
        return zca_filters(cov, eps, k, rng)
    return kmeans_filters(x, cov, eps, k, rng, kmeans_iters)


def covariance(x: np.ndarray) -> Tuple[np.ndarray, float]:
    """The float32 covariance (D, D) of centred rows ``x`` (M, D), and the regulariser eps, 1e-2
    of its mean eigenvalue (its trace / D), that whitening adds to every eigenvalue."""
    cov = x.T @ x
    cov *= np.float32(1.0 / x.shape[0])
    eps = 1e-2 * float(np.trace(cov, dtype=np.float64)) / cov.shape[0] + 1e-12
    return cov, eps


@contextlib.contextmanager
def one_lapack_thread() -> Iterator[None]:
    """Within the block, the BLAS runs on one thread. For LAPACK's factorizations
    (eigendecompositions, Cholesky): their many fine-grained synchronizations between BLAS
    threads make several threads much slower than one when the machine's cores are shared,
    while the large GEMMs elsewhere keep every thread."""
    if threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def top_eigh(cov: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The ``n`` largest eigenvalues of symmetric ``cov``, descending, clipped at 0 (float64),
    and their eigenvectors (D, n). Only those ``n`` are computed (LAPACK's bisection and inverse
    iteration) unless they are all of them (divide and conquer); float32, with a float64 retry."""
    d = cov.shape[0]
    sub = None if n >= d else [d - n, d - 1]
    with one_lapack_thread():
        try:
            lam, u = scipy.linalg.eigh(cov, subset_by_index=sub, driver="evd" if sub is None else "evx",
                                       check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            lam, u = np.linalg.eigh(cov.astype(np.float64))
            lam, u = lam[d - n:], u[:, d - n:]
    return lam[::-1].astype(np.float64).clip(min=0), u[:, ::-1]


def pca_filters(cov: np.ndarray, eps: float, k: int, rng) -> np.ndarray:
    """``k`` whitened principal directions (k, D): u_i / sqrt(l_i + eps) for the ``k`` largest
    eigenpairs only; past D, random mixtures of all D (scaled by 1/sqrt(D))."""
    d = cov.shape[0]
    lam, u = top_eigh(cov, min(k, d))
    w = (u * (1.0 / np.sqrt(lam + eps)).astype(u.dtype)).T
    if k > d:
        extra = rng.standard_normal((k - d, d)) @ w
        w = np.vstack([w, extra / np.sqrt(d)])
    return w


def zca_filters(cov: np.ndarray, eps: float, k: int, rng) -> np.ndarray:
    """``k`` rows of the ZCA matrix U diag(1/sqrt(l + eps)) U^T (random distinct rows; past D,
    random mixtures of all rows, scaled by 1/sqrt(D)). Every component is used, so the whole
    eigendecomposition is computed, but only the chosen rows of the product."""
    d = cov.shape[0]
    lam, u = top_eigh(cov, d)
    inv = (1.0 / np.sqrt(lam + eps)).astype(u.dtype)
    rows = rng.choice(d, min(k, d), replace=False)
    w = (u[rows] * inv) @ u.T
    if k > d:
        mix = rng.standard_normal((k - d, d)).astype(u.dtype)
        w = np.vstack([w, ((mix @ u) * inv) @ u.T / np.sqrt(d)])
    return w


def whitening_factor(cov: np.ndarray, eps: float, overwrite: bool = False) -> np.ndarray:
    """L, lower triangular (float32, Fortran order), with L L^T = cov + eps I for symmetric
    ``cov``: ``y = L^-1 x`` whitens a patch. It differs from ZCA's whitening only by a rotation,
    y = Q z with Q orthogonal, and needs a Cholesky factorization instead of an
    eigendecomposition. Float32, with a float64 retry.

    With ``overwrite``, a contiguous float32 ``cov`` is factored in its own memory (a symmetric
    C-order matrix is its own transpose, which is in Fortran order, as LAPACK wants it): no copy of
    it is made, and it is lost."""
    d = cov.shape[0]
    if overwrite and cov.dtype == np.float32 and (cov.flags.f_contiguous or cov.flags.c_contiguous):
        a = cov if cov.flags.f_contiguous else cov.T
    else:
        a = np.array(cov, np.float32, order="F")
    diag = a.diagonal().astype(np.float64)
    a.flat[::d + 1] += np.float32(eps)
    with one_lapack_thread():
        factor, info = scipy.linalg.lapack.spotrf(a, lower=1, clean=0, overwrite_a=1)
    if info == 0:
        for j in range(1, d):  # the strict upper triangle still holds cov's
            factor[:j, j] = 0
        return factor
    # not positive definite in float32: cov is intact in the strict upper triangle
    upper = np.triu(factor.astype(np.float64), 1)
    a64 = upper + upper.T
    a64.flat[::d + 1] = diag + eps
    return scipy.linalg.cholesky(a64, lower=True, check_finite=False).astype(np.float32)


def whiten_rows(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Rows of C-contiguous float32 ``x`` (M, D) replaced in place by ``L^-1 x_i`` (``factor`` L
    lower triangular): one BLAS triangular solve on the memory of ``x``, no copy."""
    xt = scipy.linalg.blas.strsm(1.0, np.asarray(factor, np.float32), x.T, side=0, lower=1, trans_a=0,
                                 overwrite_b=1)
    if not np.shares_memory(xt, x):
        x[...] = xt.T
    return x


def kmeans_filters(x: np.ndarray, cov: np.ndarray, eps: float, k: int, rng, iters: int) -> np.ndarray:
    """``k`` filters (k, D) by spherical k-means (Coates & Ng 2012) on whitened, unit-length
    patches; ``x`` (M, D) is overwritten by them, and ``cov`` by the whitening factor.

    The patches are whitened by a Cholesky factor L (y = L^-1 x) rather than by ZCA: the two
    differ by a rotation, which k-means on the sphere and its Gaussian initial centres do not
    see, so the filters (w with w.x = c.y, i.e. w = L^-T c) have the same distribution."""
    factor = whitening_factor(cov, eps, overwrite=True)
    whiten_rows(x, factor)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms += np.float32(1e-8)
    x /= norms[:, None]
    d = x.shape[1]
    centers = rng.standard_normal((d, k)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=0, keepdims=True)
    centers = spherical_kmeans(x, centers, iters, rng)
    return scipy.linalg.solve_triangular(factor, centers, lower=True, trans="T", check_finite=False).T


def spherical_kmeans(xw: np.ndarray, centers: np.ndarray, iters: int, rng) -> np.ndarray:
    """``iters`` rounds of spherical k-means (Coates & Ng 2012) from unit ``centers`` (d, k) on
    unit patches ``xw`` (m, d): each patch joins the centre with the largest ``|dot|``, each centre
    becomes its old self plus the sum of its members weighted by their dots, renormalised. A
    centre without members is re-seeded with a random patch. Returns the centres (d, k).

    The dots go to one reused (m, k) buffer. The members' weighted sums are one sparse (k, m) by
    dense (m, d) product (m*d work) rather than a product with a dense (m, k) assignment matrix
    (m*d*k); the sparse matrix has one entry per column, so it is built in CSC form directly."""
    m = xw.shape[0]
    k = centers.shape[1]
    rows = np.arange(m)
    s = np.empty((m, k), np.float32)
    mag = np.empty((m, k), np.float32)
    for _ in range(iters):
        np.matmul(xw, centers.astype(np.float32, copy=False), out=s)
        best = np.argmax(np.abs(s, out=mag), axis=1)
        assign = scipy.sparse.csc_matrix((s[rows, best], best, np.arange(m + 1)), shape=(k, m))
        new = np.asarray(assign @ xw, dtype=np.float32)   # (k, d)
        empty = np.linalg.norm(new, axis=1) < 1e-12
        if np.any(empty):  # re-seed empty clusters with random patches
            new[empty] = xw[rng.choice(m, int(empty.sum()), replace=m < empty.sum())]
        centers = new.T + centers
        centers /= np.linalg.norm(centers, axis=0, keepdims=True) + 1e-12
    return centers
