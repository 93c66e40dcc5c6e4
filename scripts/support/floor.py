"""The GEMM floor of a benchmark job: its GEMM FLOPs and this machine's measured sgemm rate.

Benchmarks on a shared machine are only comparable as ratios measured in one run. Dividing a
job's time by ``FLOPs / sgemm rate`` (the time its matrix products alone would take at the rate
numpy's BLAS reaches on a large square float32 product) gives such a ratio.

* :func:`forward_flops` counts, per layer with a GEMM (Convolution and its depthwise fork types,
  Deconvolution, InnerProduct), ``2*M*N*K`` for the forward over the net's current batch: for a
  convolution ``2 * weights * output pixels``, for a deconvolution ``2 * weights * input pixels``,
  for an inner product ``2 * weights * rows``. A backward (data and weight gradients) counts as
  twice its forward: :data:`BACKWARD_FACTOR`.
* :func:`sgemm_rate` measures the rate in GFLOP/s.
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional, Tuple

import numpy as np

#: the layer types whose forward is a matrix product with the layer's weights
GEMM_TYPES = ("Convolution", "DepthwiseConvolution", "ConvolutionDepthwise", "Deconvolution", "InnerProduct")
#: a backward computes the data gradient and the weight gradient: two products the size of the forward
BACKWARD_FACTOR = 2

#: how the floor counts passes, for the benchmarks' output
COUNTING = ("GEMM FLOPs: forward 2*M*N*K per conv/deconv/InnerProduct layer times the batch; "
            f"a backward (data + weight gradients) counted as {BACKWARD_FACTOR}x its forward")


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def forward_flops(net) -> List[Tuple[str, str, int]]:
    """``(layer, type, FLOPs)`` of each GEMM layer's forward over ``net``'s current blob shapes.

    ``net`` is an engine net (:func:`caffe_utils.engine.open_net`); only its shapes are read."""
    out = []
    for lp in net.net_param.layer:
        if lp.type not in GEMM_TYPES or lp.name not in net.params:
            continue
        weights = int(net.params[lp.name][0].data.size)
        if lp.type == "InnerProduct":
            shape = net.blobs[lp.bottom[0]].data.shape
            axis = lp.inner_product_param.axis % len(shape)
            flops = 2 * weights * _count(shape[:axis])
        elif lp.type == "Deconvolution":
            flops = sum(2 * weights * _count(net.blobs[b].data.shape[:1] + net.blobs[b].data.shape[2:])
                        for b in lp.bottom)
        else:
            flops = sum(2 * weights * _count(net.blobs[t].data.shape[:1] + net.blobs[t].data.shape[2:])
                        for t in lp.top)
        out.append((lp.name, lp.type, flops))
    return out


def _one_image_net(prototxt: str):
    """``prototxt`` built at batch 1 on the numpy engine (neither pycaffe nor the job's batch
    is needed to count FLOPs)."""
    from caffe_utils import netio
    from caffe_utils.engine import open_net
    param = netio.read_net(prototxt)
    shapes = {}
    for lp in param.layer:
        if lp.type == "Input":
            for top, shape in zip(lp.top, lp.input_param.shape):
                shapes[top] = (1,) + tuple(shape.dim[1:])
    return open_net(param, engine="numpy", input_shapes=shapes)


def prototxt_forward_flops(prototxt: str) -> int:
    """GEMM FLOPs of one image's forward through ``prototxt``."""
    return sum(f for _, _, f in forward_flops(_one_image_net(prototxt)))


def sgemm_rate(n: int = 1024, seconds: float = 0.5) -> float:
    """This machine's float32 matrix-product rate in GFLOP/s: the best of repeated ``n x n``
    products through numpy's BLAS, measured for about ``seconds`` after one warm-up."""
    rng = np.random.RandomState(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    best = float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def report_floor(prototxt: str, images: int, job: str) -> Optional[float]:
    """Print the GEMM FLOPs of one forward and one backward of ``images`` images through
    ``prototxt`` and the sgemm rate measured now; return that floor in seconds, or None when the
    net cannot be built (the benchmark's workers then fail and say why)."""
    try:
        fwd = prototxt_forward_flops(prototxt) * images
    except Exception as exc:  # reported by the workers, which fail the run
        print(f"GEMM FLOPs: not counted ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    flops = (1 + BACKWARD_FACTOR) * fwd
    rate = sgemm_rate()
    print(f"{job}: {flops / 1e9:.4g} GFLOP (forward {fwd / 1e9:.4g}); {COUNTING}")
    print(f"sgemm: {rate:.1f} GFLOP/s measured now (numpy float32 1024x1024 matmul, best of repeats); "
          f"GEMM floor {floor_seconds(flops, rate):.4g} s")
    return floor_seconds(flops, rate)


def report_rate_again() -> None:
    """Print the sgemm rate measured again after the jobs: on a shared machine the two differ by
    what other load came and went, which is how far the floor multiples can be trusted."""
    print(f"sgemm again after the jobs: {sgemm_rate():.1f} GFLOP/s (the floor multiples use the first rate)")


def floor_seconds(flops: float, rate_gflops: float) -> float:
    """The time ``flops`` take at ``rate_gflops``: the job's GEMM floor."""
    return flops / (rate_gflops * 1e9)


def numerics_flops(kind: str, m: int, d: int, k: int) -> int:
    """FLOPs of stage 1's data-driven numerics on one convolution group of ``m`` patches of size
    ``d`` for ``k`` filters, counted as :mod:`caffe_utils.magic.weights` computes them: the
    covariance, a symmetric rank-m product (``m d^2``); for ``kmeans`` the Cholesky factor
    (``d^3/3``), the whitening triangular solve (``m d^2``) and each round's dots (``2 m d k``);
    for ``pca`` and ``zca`` the eigendecomposition, counted as its tridiagonal reduction
    (``4 d^3/3``); ``rand`` and the other inits: none."""
    from caffe_utils.magic.weights import KMEANS_ITERATIONS
    if kind == "kmeans":
        return m * d * d + d ** 3 // 3 + m * d * d + KMEANS_ITERATIONS * 2 * m * d * k
    if kind in ("pca", "zca"):
        return m * d * d + 4 * d ** 3 // 3
    return 0


def init_flops(prototxt: str, images: int, kind: str, options=None) -> Tuple[int, int, int]:
    """The GEMM FLOPs no initialization of ``prototxt`` from ``images`` images with ``kind``
    can avoid, as ``(within, numerics, calibration)``: one forward of every image (stage 2
    normalizes every layer on all of them), stage 1's numerics (:func:`numerics_flops`, with
    the patch counts of :mod:`caffe_utils.magic.weights`) and one forward and backward of
    stage 3's calibration images (``options``: an InitOptions, the defaults when None)."""
    from caffe_utils import layout
    from caffe_utils.magic import InitOptions
    from caffe_utils.magic.weights import patch_plan, patches_needed
    opts = options or InitOptions()
    net = _one_image_net(prototxt)
    fwd = sum(f for _, _, f in forward_flops(net))
    numerics = 0
    for lp in net.net_param.layer:
        if lp.type not in layout.CONVOLUTION_TYPES or lp.name not in net.params:
            continue
        plan = patch_plan(lp, net.blobs[lp.bottom[0]].data.shape, images, opts.mem_limit)
        m = plan.per_image * images
        if m >= patches_needed(kind, plan.d, plan.k):
            numerics += plan.groups * numerics_flops(kind, m, plan.d, plan.k)
    calibration = (1 + BACKWARD_FACTOR) * fwd * min(images, max(opts.rate_images, opts.batch_size))
    return fwd * images, numerics, calibration
