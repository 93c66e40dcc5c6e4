"""Convolution kernels of the numpy engine that need no column matrix.

:class:`~caffe_utils.layers.vision.Convolution` picks one of these for the shapes where im2col
is wasted work, and the general im2col + GEMM path (:mod:`.im2col`) for the rest:

* **pointwise** (1x1 kernel, no padding): the input already is the column matrix. The batch is
  laid out as one ``(C, N*H*W)`` matrix (subsampled in the same copy when the stride is above
  1) and multiplied by the ``(M, C)`` weights, all groups in one stacked ``np.matmul``: one
  large product per group rather than one per image, which keeps BLAS efficient on small planes
  and costs one transposing copy each way. The bias is added in the copy back; the bottom
  gradient is added straight into the bottom diff (no col2im).
* **depthwise** (``group == channels``, one input channel per group, any channel multiplier):
  a direct stencil, the sum over the ``kh*kw`` taps of a shifted (strided, dilated) slice of the
  input times each channel's tap weight. Taps reaching into the padding are clipped rather than
  padded, and the work goes in blocks of images and channels small enough to stay in cache,
  split over threads (numpy releases the GIL in the elementwise loops). On small planes with
  clipped taps (MobileNet's 14x14 and 7x7 ones) each block is copied with its channels
  innermost first (:func:`depthwise_channels_last`).

Both follow the engine's protocol: the forward pass overwrites the top, backward adds (``+=``)
into the bottom and weight diffs. Results agree with Caffe's im2col + GEMM up to float32
rounding (the sums run in another order); ``tests/oracles.py``'s direct loops are the reference.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from caffe_utils.layers.blas import matmul_groups, matmul_nt_long
from caffe_utils.layers.im2col import blocks as tile_blocks
from caffe_utils.layers.im2col import channels_last, channels_last_pays, parallel, scratch, tap_range

Pair = Tuple[int, int]

#: elements of one depthwise block's output (cache-sized: the block and its tap products)
BLOCK = 1 << 18

#: only output rows shorter than this are worked on channels innermost (:func:`depthwise_channels_last`)
CHANNELS_LAST_BELOW = 20


def is_pointwise(kernel: Pair, pad: Pair) -> bool:
    """Whether a convolution is a 1x1 kernel without padding (dilation then plays no part)."""
    return kernel == (1, 1) and pad == (0, 0)


def is_depthwise(channels: int, group: int) -> bool:
    """Whether every group convolves exactly one input channel (and there is more than one)."""
    return group > 1 and group == channels


# ---- pointwise ------------------------------------------------------------------------------

def _rows(a: np.ndarray, stride: Pair, name: str) -> np.ndarray:
    """``a`` (n, C, H, W) at the given stride as a contiguous (C, n*P) matrix in the scratch
    buffer ``name``: one transposing (and subsampling) copy."""
    v = a if stride == (1, 1) else a[:, :, ::stride[0], ::stride[1]]
    n, c, h, w = v.shape
    r = scratch(name, v.size).reshape(c, n, h, w)
    np.copyto(r, v.transpose(1, 0, 2, 3))
    return r.reshape(c, n * h * w)


def pointwise_forward(x: np.ndarray, w: np.ndarray, group: int, stride: Pair, y: np.ndarray,
                      bias: Optional[np.ndarray] = None) -> None:
    """Write the 1x1 convolution of ``x`` (n, C, H, W) with weights ``w`` (M, C/group, 1, 1)
    (plus ``bias`` (M,), if given) into ``y`` (n, M, oh, ow)."""
    n, m = y.shape[:2]
    xr = _rows(x, stride, "pw_in")
    wg = w.reshape(group, m // group, -1)
    out = scratch("pw_out", m * xr.shape[1]).reshape(group, m // group, xr.shape[1])
    matmul_groups(wg, xr.reshape(group, wg.shape[2], -1), out)
    res = out.reshape(m, n, -1).transpose(1, 0, 2)
    y3 = y.reshape(n, m, -1)
    if bias is None:
        np.copyto(y3, res)
    else:
        np.add(res, bias[None, :, None], out=y3)


def pointwise_backward(x: np.ndarray, w: np.ndarray, dy: np.ndarray, group: int, stride: Pair,
                       dx: Optional[np.ndarray], dw: np.ndarray) -> None:
    """Add the gradients of :func:`pointwise_forward` for top diff ``dy``: into ``dw`` (the
    weight diff) and, unless ``dx`` is None, into ``dx`` (the bottom diff, shaped as ``x``)."""
    n, m, oh, ow = dy.shape
    c = x.shape[1]
    mg, cg = m // group, c // group
    dyr = _rows(dy, (1, 1), "pw_dy").reshape(group, mg, -1)
    xr = _rows(x, stride, "pw_in").reshape(group, cg, -1)
    t = scratch("pw_w", m * cg).reshape(group, mg, cg)
    for g in range(group):
        matmul_nt_long(dyr[g], xr[g], t[g])
    dw += t.reshape(dw.shape)
    if dx is None:
        return
    g = scratch("pw_out", c * dyr.shape[2]).reshape(group, cg, -1)
    matmul_groups(w.reshape(group, mg, cg).transpose(0, 2, 1), dyr, g)
    v = dx if stride == (1, 1) else dx[:, :, ::stride[0], ::stride[1]]
    v += g.reshape(c, n, oh, ow).transpose(1, 0, 2, 3)


# ---- depthwise ------------------------------------------------------------------------------

def _taps(shape: Sequence[int], out_hw: Pair, kernel: Pair, pad: Pair, stride: Pair,
          dilation: Pair) -> List[Tuple[int, int, slice, slice, slice, slice]]:
    """Every kernel tap ``(i, j)`` that reads inside the input, with its output rows/cols and
    the input rows/cols they read: ``(i, j, out_rows, out_cols, in_rows, in_cols)``."""
    H, W = shape[2], shape[3]
    rows = [(i,) + tap_range(H, out_hw[0], i * dilation[0] - pad[0], stride[0]) for i in range(kernel[0])]
    cols = [(j,) + tap_range(W, out_hw[1], j * dilation[1] - pad[1], stride[1]) for j in range(kernel[1])]
    return [(i, j, ro, co, ri, ci) for i, ro, ri in rows if ro.stop > ro.start
            for j, co, ci in cols if co.stop > co.start]


def depthwise_channels_last(taps: Sequence[Tuple[int, int, slice, slice, slice, slice]], out_hw: Pair,
                            channels: int) -> bool:
    """Whether a depthwise stencil of ``channels`` channels works on its blocks copied channels
    innermost: :func:`~caffe_utils.layers.im2col.channels_last_pays` with
    :data:`CHANNELS_LAST_BELOW` (README, "Benchmarks", 2026-12-07)."""
    return channels_last_pays([(ro, co) for _, _, ro, co, _, _ in taps], out_hw, channels, CHANNELS_LAST_BELOW)


def _block_size(blocks: List[Tuple[slice, slice]], per_channel: int) -> int:
    """Elements of the largest block's output."""
    return max((ns.stop - ns.start) * (cs.stop - cs.start) for ns, cs in blocks) * per_channel


def depthwise_forward(x: np.ndarray, w: np.ndarray, geometry, y: np.ndarray,
                      bias: Optional[np.ndarray] = None) -> None:
    """Write the depthwise convolution of ``x`` (n, C, H, W) with weights ``w`` (C*mult, 1, kh,
    kw) (plus ``bias`` (C*mult,), if given) into ``y`` (n, C*mult, oh, ow). ``geometry``:
    (kernel, pad, stride, dilation)."""
    n, c = x.shape[:2]
    mult = w.shape[0] // c
    oh, ow = y.shape[2:]
    taps = _taps(x.shape, (oh, ow), *geometry)
    w5 = w.reshape(c, mult, geometry[0][0], geometry[0][1])
    y5 = y.reshape(n, c, mult, oh, ow)
    blocks = tile_blocks(n, c, mult * oh * ow, BLOCK)
    size = _block_size(blocks, mult * oh * ow)
    last = depthwise_channels_last(taps, (oh, ow), c)

    def work(part: slice) -> None:
        tmp = None if last else np.empty(size, x.dtype)
        for ns, cs in blocks[part]:
            start = 0 if bias is None else bias.reshape(c, mult, 1, 1)[cs]
            yb, xb = y5[ns, cs], x[ns, cs]
            if last:
                yb, xb = channels_last(yb, 0), channels_last(xb)
                yb += start
                tb = np.empty_like(yb)
            else:
                yb[...] = start
            for i, j, ro, co, ri, ci in taps:
                xv = xb[:, :, ri, ci][:, :, None]
                t = tb[..., ro, co] if last else tmp[:yb[..., ro, co].size].reshape(yb[..., ro, co].shape)
                np.multiply(xv, w5[cs, :, i, j][None, :, :, None, None], out=t)
                yv = yb[..., ro, co]
                yv += t
            if last:
                y5[ns, cs] = yb

    parallel(work, len(blocks), y.size)


def depthwise_backward(x: np.ndarray, w: np.ndarray, dy: np.ndarray, geometry,
                       dx: Optional[np.ndarray], dw: np.ndarray) -> None:
    """Add the gradients of :func:`depthwise_forward` for top diff ``dy`` into ``dw`` and,
    unless ``dx`` is None, into ``dx`` (shaped as ``x``)."""
    n, c = x.shape[:2]
    mult = w.shape[0] // c
    kh, kw = geometry[0]
    oh, ow = dy.shape[2:]
    taps = _taps(x.shape, (oh, ow), *geometry)
    w5 = w.reshape(c, mult, kh, kw)
    dy5 = dy.reshape(n, c, mult, oh, ow)
    blocks = tile_blocks(n, c, mult * oh * ow, BLOCK)
    partial = np.zeros((len(blocks), c, mult, kh, kw), np.float32)
    size = _block_size(blocks, mult * oh * ow)
    last = depthwise_channels_last(taps, (oh, ow), c)

    def work(part: slice) -> None:
        tmp = None if last else np.empty(size, x.dtype)
        for b in range(part.start, part.stop):
            ns, cs = blocks[b]
            dyb, xb, dxb = dy5[ns, cs], x[ns, cs], None if dx is None else dx[ns, cs]
            if last:
                dyb, xb = channels_last(dyb), channels_last(xb)
                dxb = None if dxb is None else channels_last(dxb, 0)
                tb = np.empty_like(dyb)
            for i, j, ro, co, ri, ci in taps:
                dyv = dyb[..., ro, co]
                t = tb[..., ro, co] if last else tmp[:dyv.size].reshape(dyv.shape)
                np.multiply(dyv, xb[:, :, ri, ci][:, :, None], out=t)
                # channels innermost, t is no contiguous block to flatten
                partial[b, cs, :, i, j] = (t.sum(axis=(0, 3, 4)) if last
                                           else t.reshape(t.shape[:3] + (-1,)).sum(axis=(0, 3)))
                if dxb is None:
                    continue
                np.multiply(dyv, w5[cs, :, i, j][None, :, :, None, None], out=t)
                dxv = dxb[:, :, ri, ci]
                dxv += t[:, :, 0] if mult == 1 else t.sum(axis=2)
            if last and dxb is not None:
                dx[ns, cs] += dxb

    parallel(work, len(blocks), dy.size)
    dw += partial.sum(axis=0).reshape(dw.shape)
