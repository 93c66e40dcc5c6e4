"""Test oracles: direct loop transcriptions of Caffe's CPU code, slow and plainly right.

* :func:`im2col_naive` / :func:`col2im_naive`: Caffe's ``im2col_cpu`` / ``col2im_cpu`` for one
  image, against which :mod:`caffe_utils.layers.im2col`'s vectorised versions are checked.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import numpy as np

from caffe_utils.layers.im2col import IntPair, conv_out_size, out_shape


def _pair(v: IntPair) -> Tuple[int, int]:
    a, b = np.broadcast_to(np.asarray(v, dtype=np.int64), (2,))
    return int(a), int(b)


def _taps(shape: Sequence[int], kernel: IntPair, pad: IntPair, stride: IntPair,
          dilation: IntPair) -> Iterator[Tuple[int, int, int, int, int]]:
    """Caffe's im2col loops over a (C, H, W) image: ``(row, column, c, y, x)`` of every entry of
    the column matrix that reads inside the image, in Caffe's order (entries in the padding
    read 0 and are not listed)."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = map(_pair, (kernel, pad, stride, dilation))
    C, H, W = shape
    oh, ow = conv_out_size(H, kh, ph, sh, dh), conv_out_size(W, kw, pw, sw, dw)
    for c in range(C):
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for r in range(oh):
                    y = r * sh - ph + i * dh
                    for s in range(ow):
                        xx = s * sw - pw + j * dw
                        if 0 <= y < H and 0 <= xx < W:
                            yield row, r * ow + s, c, y, xx


def im2col_naive(x: np.ndarray, kernel: IntPair, pad: IntPair = 0, stride: IntPair = 1,
                 dilation: IntPair = 1) -> np.ndarray:
    """Loop transcription of Caffe's ``im2col_cpu``: (C*kh*kw, outH*outW) from (C, H, W)."""
    kh, kw = _pair(kernel)
    oh, ow = out_shape(x.shape[1:], kernel, pad, stride, dilation)
    col = np.zeros((x.shape[0] * kh * kw, oh * ow), x.dtype)
    for row, column, c, y, xx in _taps(x.shape, kernel, pad, stride, dilation):
        col[row, column] = x[c, y, xx]
    return col


def col2im_naive(col: np.ndarray, shape: Sequence[int], kernel: IntPair, pad: IntPair = 0,
                 stride: IntPair = 1, dilation: IntPair = 1) -> np.ndarray:
    """Loop transcription of Caffe's ``col2im_cpu``: the (C, H, W) image ``shape`` to which every
    column entry is added back where it was read from."""
    img = np.zeros(tuple(shape), col.dtype)
    for row, column, c, y, xx in _taps(shape, kernel, pad, stride, dilation):
        img[c, y, xx] += col[row, column]
    return img
