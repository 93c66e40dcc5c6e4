"""Stage 2: within-layer normalization (the paper's Algorithm 1), and BatchNorm statistics.

Output channel i of an affine layer is scaled by 1/sigma_i and its bias set so that the channel
has mean beta and unit variance over the sample's images and positions. A channel that is
constant on the sample (dead) keeps its weights and gets mean beta, with a warning. BatchNorm
layers without stored statistics get the sample's mean and Caffe's unbiased variance.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from caffe_utils import layout
from caffe_utils.magic.context import InitContext
from caffe_utils.measure import valid_rows


def image_moments(top: np.ndarray, valid: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Per-channel float64 sum, sum of squares and count over the first ``valid`` items of
    ``top`` (N, C, ...) (all of a blob with fewer rows), one image at a time: a float64 copy of
    one image, not of the batch. A 2-D ``top`` has one value per channel and item."""
    x = top[:valid]
    n = x.shape[0]
    if x.ndim == 2:
        x = x.astype(np.float64)
        return x.sum(axis=0), np.einsum("ij,ij->j", x, x), n
    x = x.reshape(n, x.shape[1], -1)
    s1 = np.zeros(x.shape[1])
    s2 = np.zeros(x.shape[1])
    for i in range(n):
        xi = x[i].astype(np.float64)
        s1 += xi.sum(axis=1)
        s2 += np.einsum("ij,ij->i", xi, xi)
    return s1, s2, n * x.shape[2]


def _channel_moments(ctx: InitContext, blob: str, upto: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Per-channel sum, sum of squares and count of ``blob`` over the sample, with the net run
    through layer ``upto`` for every batch."""
    s1 = s2 = None
    count = 0
    for valid in ctx.batches.through(upto):
        top = ctx.net.blobs[blob].data
        a, q, c = image_moments(top, valid_rows(top.shape[0], valid, ctx.batches.batch))
        s1 = a if s1 is None else s1 + a
        s2 = q if s2 is None else s2 + q
        count += c
    return s1, s2, count


def normalize(ctx: InitContext, lp, idx: int) -> None:
    """Give every output channel of affine layer ``lp`` mean beta and unit variance."""
    top = lp.top[0]
    s1, s2, count = _channel_moments(ctx, top, idx)
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0))
    dead = std <= 1e-6 * max(float(std.max()), 1e-30)
    if np.any(dead):
        ctx.layers[lp.name].dead_channels = int(dead.sum())
        ctx.warn(f"layer '{lp.name}': {int(dead.sum())} of {dead.size} output channels are constant on the sample "
                 "(dead); they keep their weights and get mean beta: use more varied images or another --init")
    scale = 1.0 / np.where(dead, 1.0, std)
    blobs = ctx.net.params[lp.name]
    beta = ctx.opts.beta
    if len(blobs) > 1:
        b_old = blobs[1].data.astype(np.float64).reshape(-1)
        new_b = (b_old - mean) * scale + beta
        layout.scale_rows(lp, blobs[:1], scale)
        blobs[1].data[...] = new_b.astype(np.float32).reshape(blobs[1].data.shape)
    else:
        layout.scale_rows(lp, blobs, scale)
    t = ctx.batches.checkpointed(top)
    if t is not None:  # the checkpointed top, corrected without re-running
        shape = (1, -1) + (1,) * (t.ndim - 2)
        if len(blobs) > 1:
            t -= mean.astype(np.float32).reshape(shape)
            t *= scale.astype(np.float32).reshape(shape)
            t += np.float32(beta)
        else:
            t *= scale.astype(np.float32).reshape(shape)


def pass_through(ctx: InitContext, idx: int) -> None:
    """Run the sample through layer ``idx`` unchanged (``--no-within``), so that the next
    layers' patches come from a checkpoint after it."""
    for _ in ctx.batches.through(idx):
        pass


def batchnorm_statistics(ctx: InitContext, lp, idx: int) -> None:
    """Stored statistics of BatchNorm ``lp`` from the sample (Caffe's unbiased variance)."""
    s1, s2, count = _channel_moments(ctx, lp.bottom[0], idx - 1)
    mean = s1 / count
    var = np.maximum(s2 / count - mean * mean, 0) * (count / max(count - 1, 1))
    blobs = ctx.net.params[lp.name]
    blobs[0].data[...] = mean.astype(np.float32)
    blobs[1].data[...] = var.astype(np.float32)
    blobs[2].data[...] = 1.0
