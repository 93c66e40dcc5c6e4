"""Caffe's LRN layer in the numpy engine, with Caffe's exact semantics.

ACROSS_CHANNELS uses Caffe's running window sum over channels (each channel's sum is the
previous one plus the entering channel minus the leaving one, so the cost does not grow with
``local_size``), in cache-sized blocks of whole images split over threads, so the only
blob-sized arrays are the top and the cached ``scale``. WITHIN_CHANNEL is what Caffe composes
(square, AVE pooling, power, product), so ``k`` is not used there. In-place use is supported;
backward adds into the bottom diff (see :mod:`.base`).
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register
from caffe_utils.layers.im2col import parallel
from caffe_utils.layers.pooling import ave_pool_backward, ave_pool_forward, pooled_size

#: elements of one block of whole images in the ACROSS_CHANNELS passes (cache-sized)
LRN_BLOCK = 1 << 18


@register
class LRN(Layer):
    type = "LRN"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        lp = self.param.lrn_param
        self.size = int(lp.local_size)
        if self.size % 2 != 1:
            raise self.error("LRN only supports odd values for local_size")
        self.pre_pad = (self.size - 1) // 2
        self.alpha = float(lp.alpha)
        self.beta = float(lp.beta)
        self.k = float(lp.k)
        region = lp.DESCRIPTOR.fields_by_name["norm_region"].enum_type.values_by_number[lp.norm_region].name
        if region not in ("ACROSS_CHANNELS", "WITHIN_CHANNEL"):
            raise self.error(f"unknown norm_region {region}")
        self.within = region == "WITHIN_CHANNEL"
        self._cache: Optional[tuple] = None

    def set_alpha(self, alpha: float) -> None:
        """A new ``alpha``: scaling it by ``1/r**2`` makes the layer exactly equivariant to an
        input scaled by ``r`` (the between-layer stage's LRN rescale)."""
        self.param.lrn_param.alpha = alpha
        self.alpha = float(self.param.lrn_param.alpha)
        self._cache = None

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"Input must have 4 axes, corresponding to (num, channels, height, width); "
                             f"got {shape}")
        top[0].reshape(shape)

    # ---- ACROSS_CHANNELS: scale_c = k + alpha/size * sum_{|c'-c|<=pre_pad} x_c'^2, one image
    # at a time (its (C, H*W) temporaries stay in cache; images go to threads)
    def _channel_window_sum(self, a: np.ndarray, out: np.ndarray, first: float, tail_first: bool = False) -> None:
        """Caffe's running window sum over the channels of a block of images ``a`` (n, C, P)
        into ``out``: out[:, 0] = first + sum a[:, 0..pre_pad], then out[:, c] = out[:, c-1] +
        a[:, c+pre_pad] - a[:, c-pre_pad-1] (zero outside; the forward pass adds the head
        first, the backward pass subtracts the tail first), in Caffe's order of additions."""
        C, p = a.shape[1], self.pre_pad
        out[:, 0] = first
        for c in range(min(p + 1, C)):
            out[:, 0] += a[:, c]
        for c in range(1, C):
            head, tail = c + p, c - p - 1
            steps = [(np.subtract, tail)] if tail >= 0 else []
            if head < C:
                steps.insert(len(steps) if tail_first else 0, (np.add, head))
            src = out[:, c - 1]
            for op, i in steps:
                op(src, a[:, i], out=out[:, c])
                src = out[:, c]
            if not steps:
                out[:, c] = src

    def _image_blocks(self, shape) -> List[slice]:
        """Blocks of whole images of about :data:`LRN_BLOCK` elements (at least one image)."""
        step = max(1, LRN_BLOCK // max(1, int(np.prod(shape[1:], dtype=np.int64))))
        return [slice(i, min(shape[0], i + step)) for i in range(0, shape[0], step)]

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        if self.within:
            self._within_forward(x, top[0])
            return
        N, C = x.shape[:2]
        x3, y3 = x.reshape(N, C, -1), top[0].data.reshape(N, C, -1)
        scale = self._cache[0] if self._cache and self._cache[0].shape == x3.shape else np.empty(x3.shape, DTYPE)
        a, k, nb = DTYPE(self.alpha / self.size), self.k, DTYPE(-self.beta)

        blocks = self._image_blocks(x3.shape)

        def work(part: slice) -> None:
            for n in blocks[part]:
                sq = np.multiply(x3[n], x3[n])
                sq *= a
                self._channel_window_sum(sq, scale[n], k)
                np.power(scale[n], nb, out=sq)
                np.multiply(x3[n], sq, out=y3[n])

        parallel(work, len(blocks), x.size)
        self._cache = (scale,)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        if self._cache is None:
            raise self.error("backward called before forward")
        if self.within:
            self._within_backward(top[0], bottom[0])
            return
        (scale,) = self._cache
        N, C = scale.shape[:2]
        x3, dx3 = bottom[0].data.reshape(N, C, -1), bottom[0].diff.reshape(N, C, -1)
        dy3, y3 = top[0].diff.reshape(N, C, -1), top[0].data.reshape(N, C, -1)
        cache_ratio, nb = DTYPE(2.0 * self.alpha * self.beta / self.size), DTYPE(-self.beta)

        blocks = self._image_blocks(scale.shape)

        def work(part: slice) -> None:
            for n in blocks[part]:
                ratio = np.multiply(dy3[n], y3[n])
                accum = np.empty_like(ratio)
                ratio /= scale[n]
                self._channel_window_sum(ratio, accum, 0.0, tail_first=True)
                np.power(scale[n], nb, out=ratio)       # Caffe: dy * scale^-beta
                ratio *= dy3[n]
                accum *= x3[n]                          # - cache_ratio * x * accum
                accum *= cache_ratio
                ratio -= accum
                dx3[n] += ratio

        parallel(work, len(blocks), scale.size)

    # ---- WITHIN_CHANNEL: Caffe composes split, power(2), AVE pool(size, pad pre_pad),
    # power(shift 1, scale alpha, power -beta) and an eltwise product; k is not used.
    def _pool_args(self):
        s, p = self.size, self.pre_pad
        return (s, s), (p, p), (1, 1)

    def _within_forward(self, x: np.ndarray, top: Blob) -> None:
        N, C, H, W = x.shape
        kernel, pad, stride = self._pool_args()
        out = (pooled_size(H, kernel[0], pad[0], 1), pooled_size(W, kernel[1], pad[1], 1))
        pooled = ave_pool_forward(x * x, kernel, pad, stride, out)
        base = pooled * DTYPE(self.alpha) + DTYPE(1.0)
        power = np.power(base, DTYPE(-self.beta))
        top.data[...] = x * power
        self._cache = (pooled, base, power)

    def _within_backward(self, top: Blob, bottom: Blob) -> None:
        pooled, base, power = self._cache
        x = bottom.data
        dy = top.diff
        diff_scale = DTYPE(-self.beta * self.alpha)
        d_power = dy * x                        # product layer, w.r.t. the power output
        if diff_scale == 0:
            d_pooled = np.zeros_like(pooled)
        elif -self.beta == 1.0:
            d_pooled = d_power * diff_scale
        else:                                   # Caffe: diff_scale * y / (shift + scale * x)
            d_pooled = (power / base) * diff_scale * d_power
        d_sq = ave_pool_backward(d_pooled, x.shape, *self._pool_args())
        g = dy * power                          # product layer, w.r.t. the input
        g += DTYPE(2.0) * x * d_sq              # square layer
        bottom.diff += g
