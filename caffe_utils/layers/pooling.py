"""Pooling layer of the numpy engine, with Caffe's CPU semantics (BVLC ``pooling_layer.cpp``).

MAX and AVE pooling with Caffe's output size rule (the last window must start inside the image
when there is padding), AVE's divisor counting padded positions (window clipped to the padded
image), MAX's first maximum in scan order (strict ``>`` from ``-FLT_MAX``) and the optional mask
top. The AVE helpers (:func:`pooled_size`, :func:`ave_pool_forward`, :func:`ave_pool_backward`)
are also the pieces of LRN's WITHIN_CHANNEL mode. Backward adds into bottom diffs (see
:mod:`.base`).

The kernels loop over the window offsets (:func:`window_taps`): each offset is one strided
slice of the input, clipped to the outputs whose window reads inside the image, so there is no
padded copy of the input and no padded gradient image; the gradient goes straight into the
bottom diff. MAX keeps, per output, the offset of its maximum (int8 for windows up to 127
positions) for the backward pass; told that no backward follows (``expect_backward(False)``,
stages 1 and 2 of the initialization) it keeps only the maxima, a quarter of the work, and a
backward pass after all finds the offsets again from the bottom data. The work goes in blocks
of images and channels (cache-sized, split over threads). Where windows are clipped (padding,
a last partial window) and the output rows are short (an inception block's 7x7 or 14x14
planes), a block is first copied with its channels innermost in memory
(:func:`_channels_innermost`): numpy's ufuncs iterate in memory order, so every tap's operation
then runs over the block's channels in one inner loop instead of over a row of a few outputs.
Global pooling reduces each plane at once.

Limits (each raises a clear error): STOCHASTIC pooling is not implemented (Caffe's CPU build has
none either). Pooling reads ``round_mode`` (BVLC) or ``ceil_mode`` (forks such as the one pycaffe
may come from), whichever the net sets.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register
from caffe_utils.layers.im2col import blocks as tile_blocks
from caffe_utils.layers.im2col import channels_last, channels_last_pays, parallel, tap_range

FLT_MAX = float(np.finfo(np.float32).max)


def pooled_size(size: int, kernel: int, pad: int, stride: int, ceil_mode: bool = True) -> int:
    """Caffe's pooled output size, including the rule that with padding the last window
    must start inside the image (padding included on the left only)."""
    num = size + 2 * pad - kernel
    q = -((-num) // stride) if ceil_mode else num // stride
    out = q + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


#: elements of one block's output (pooling works block by block, see :func:`.im2col.blocks`)
BLOCK = 1 << 18

Taps = List[Tuple[int, slice, slice, slice, slice]]


def window_taps(in_hw: Tuple[int, int], out_hw: Tuple[int, int], kernel, pad, stride) -> Taps:
    """The window offsets ``(i, j)`` in Caffe's scan order (row, then column) that read inside
    the input for some output, as ``(i*kw + j, out_rows, out_cols, in_rows, in_cols)``. Window
    parts in the padding or past the input's end are left out (they read nothing: -inf for MAX,
    0 for AVE), so no padded copy is needed."""
    (kh, kw), (ph, pw), (sh, sw) = kernel, pad, stride
    rows = [tap_range(in_hw[0], out_hw[0], i - ph, sh) for i in range(kh)]
    cols = [tap_range(in_hw[1], out_hw[1], j - pw, sw) for j in range(kw)]
    return [(i * kw + j, ro, co, ri, ci) for i, (ro, ri) in enumerate(rows) if ro.stop > ro.start
            for j, (co, ci) in enumerate(cols) if co.stop > co.start]


#: only output rows shorter than this are worked on channels innermost (:func:`_channels_innermost`)
CHANNELS_LAST_BELOW = 64


def _channels_innermost(taps: Taps, out_hw: Tuple[int, int], channels: int) -> bool:
    """Whether a problem of ``channels`` channels is worked on with its blocks copied channels
    innermost: :func:`~caffe_utils.layers.im2col.channels_last_pays` with
    :data:`CHANNELS_LAST_BELOW`. Unclipped taps cover whole blocks and run fast as stored
    (README, "Benchmarks", 2026-12-07)."""
    return channels_last_pays([(ro, co) for _, ro, co, _, _ in taps], out_hw, channels, CHANNELS_LAST_BELOW)


def _by_blocks(work: Callable[[slice, slice], None], shape, out_hw: Tuple[int, int]) -> None:
    """Run ``work(images, channels)`` over blocks of an (N, C, ...) problem, in threads."""
    blocks = tile_blocks(int(shape[0]), int(shape[1]), out_hw[0] * out_hw[1], BLOCK)

    def run(part: slice) -> None:
        for ns, cs in blocks[part]:
            work(ns, cs)

    parallel(run, len(blocks), int(np.prod(shape)))


def _block_max(x: np.ndarray, taps: Taps, best: np.ndarray) -> np.ndarray:
    """``best`` (a block of outputs) set to the maximum over the window ``taps`` of input block
    ``x``, from ``-FLT_MAX`` (what a window that reads nothing keeps); returned."""
    best[...] = -FLT_MAX
    for _, ro, co, ri, ci in taps:
        bv = best[:, :, ro, co]
        np.maximum(bv, x[:, :, ri, ci], out=bv)
    return best


def ave_divisor(size: int, kernel: int, pad: int, stride: int, out: int) -> np.ndarray:
    """Caffe's per-window AVE divisor along one axis: window clipped to [-pad, size+pad)."""
    start = np.arange(out) * stride - pad
    end = np.minimum(start + kernel, size + pad)
    return (end - start).astype(np.int64)


def _divisor(in_hw, kernel, pad, stride, out_hw) -> np.ndarray:
    """(oh, ow) float32 AVE divisors."""
    return (ave_divisor(in_hw[0], kernel[0], pad[0], stride[0], out_hw[0])[:, None]
            * ave_divisor(in_hw[1], kernel[1], pad[1], stride[1], out_hw[1])[None, :]).astype(DTYPE)


def ave_pool_forward(x: np.ndarray, kernel, pad, stride, out, top: Optional[np.ndarray] = None) -> np.ndarray:
    """Caffe AVE pooling of (N, C, H, W) to ``out`` = (oh, ow): window sums (h then w order)
    divided by Caffe's pool_size. Written into ``top`` (then returned) or a new array."""
    N, C, H, W = x.shape
    y = np.empty((N, C) + tuple(out), DTYPE) if top is None else top
    taps = window_taps((H, W), out, kernel, pad, stride)
    div = _divisor((H, W), kernel, pad, stride, out)

    last = _channels_innermost(taps, out, C)

    def work(ns: slice, cs: slice) -> None:
        yb, xb = y[ns, cs], x[ns, cs]
        acc = channels_last(yb, 0) if last else yb
        if last:
            xb = channels_last(xb)
        else:
            acc[...] = 0
        for _, ro, co, ri, ci in taps:
            v = acc[:, :, ro, co]
            v += xb[:, :, ri, ci]
        acc /= div
        if last:
            yb[...] = acc

    _by_blocks(work, x.shape, out)
    return y


def ave_pool_backward(dy: np.ndarray, in_shape, kernel, pad, stride,
                      dx: Optional[np.ndarray] = None) -> np.ndarray:
    """Gradient of :func:`ave_pool_forward` w.r.t. its input: added into ``dx`` (then returned)
    or into a new zero array."""
    N, C, H, W = in_shape
    out = tuple(dy.shape[2:])
    g = np.zeros(tuple(in_shape), DTYPE) if dx is None else dx
    taps = window_taps((H, W), out, kernel, pad, stride)
    div = _divisor((H, W), kernel, pad, stride, out)

    last = _channels_innermost(taps, out, C)

    def work(ns: slice, cs: slice) -> None:
        t = channels_last(dy[ns, cs]) if last else dy[ns, cs] / div
        if last:
            t /= div
        gb = channels_last(g[ns, cs], 0) if last else g[ns, cs]
        for _, ro, co, ri, ci in taps:
            v = gb[:, :, ri, ci]
            v += t[:, :, ro, co]
        if last:
            g[ns, cs] += gb

    _by_blocks(work, in_shape, out)
    return g


@register
class Pooling(Layer):
    type = "Pooling"
    num_bottom = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        pp = self.param.pooling_param
        method = pp.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[pp.pool].name
        if method == "STOCHASTIC":
            raise self.error("STOCHASTIC pooling is not supported by the numpy engine")
        if method not in ("MAX", "AVE"):
            raise self.error(f"unknown pooling method {method}")
        self.method = method
        if not 1 <= len(top) <= (2 if method == "MAX" else 1):
            raise self.error(f"{method} pooling takes 1 top{' (or 2 with the mask)' if method == 'MAX' else ''}, "
                             f"got {len(top)}")
        self.global_pooling = bool(pp.global_pooling)
        if self.global_pooling:
            if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
                raise self.error("With Global_pooling: true Filter size cannot specified")
        else:
            has_hw = pp.HasField("kernel_h") and pp.HasField("kernel_w")
            if pp.HasField("kernel_size") == has_hw:
                raise self.error("Filter size is kernel_size OR kernel_h and kernel_w; not both")
        if not ((not pp.HasField("pad") and pp.HasField("pad_h") and pp.HasField("pad_w"))
                or (not pp.HasField("pad_h") and not pp.HasField("pad_w"))):
            raise self.error("pad is pad OR pad_h and pad_w are required.")
        if not ((not pp.HasField("stride") and pp.HasField("stride_h") and pp.HasField("stride_w"))
                or (not pp.HasField("stride_h") and not pp.HasField("stride_w"))):
            raise self.error("Stride is stride OR stride_h and stride_w are required.")
        if self.global_pooling:
            kernel = tuple(bottom[0].shape[2:4]) if len(bottom[0].shape) == 4 else (1, 1)
        elif pp.HasField("kernel_size"):
            kernel = (int(pp.kernel_size),) * 2
        else:
            kernel = (int(pp.kernel_h), int(pp.kernel_w))
        if min(kernel) <= 0:
            raise self.error("Filter dimensions cannot be zero.")
        pad = (int(pp.pad_h), int(pp.pad_w)) if pp.HasField("pad_h") else (int(pp.pad),) * 2
        stride = ((int(pp.stride_h), int(pp.stride_w)) if pp.HasField("stride_h")
                  else (int(pp.stride),) * 2)
        if min(stride) <= 0:
            raise self.error("stride must be positive")
        if self.global_pooling and (pad != (0, 0) or stride != (1, 1)):
            raise self.error("With Global_pooling: true; only pad = 0 and stride = 1")
        if (pad[0] or pad[1]) and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
            raise self.error(f"pad {pad} must be smaller than the kernel {kernel}")
        self.kernel, self.pad, self.stride = kernel, pad, stride
        self.ceil_mode = self._ceil_mode(pp)
        self._code: Optional[np.ndarray] = None
        self._backward_follows = True
        self._forwarded = False

    def expect_backward(self, follows: bool) -> None:
        """Without a backward to follow, MAX pooling's forward keeps only the maxima, not their
        places (a quarter of the work); a backward after all finds them from the bottom data."""
        self._backward_follows = bool(follows)

    @staticmethod
    def _ceil_mode(pp) -> bool:
        """Ceil rounding unless the net sets BVLC's ``round_mode: FLOOR`` or a fork's
        ``ceil_mode: false`` (the project's schema has both; the one set counts)."""
        fields = pp.DESCRIPTOR.fields_by_name
        if "round_mode" in fields and pp.HasField("round_mode"):
            return fields["round_mode"].enum_type.values_by_number[pp.round_mode].name == "CEIL"
        if "ceil_mode" in fields:
            return bool(pp.ceil_mode)
        return True

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"Input must have 4 axes, corresponding to (num, channels, height, width); "
                             f"got {shape}")
        if self.global_pooling:
            self.kernel = (int(shape[2]), int(shape[3]))
        oh = pooled_size(shape[2], self.kernel[0], self.pad[0], self.stride[0], self.ceil_mode)
        ow = pooled_size(shape[3], self.kernel[1], self.pad[1], self.stride[1], self.ceil_mode)
        if oh <= 0 or ow <= 0:
            raise self.error(f"output would be {oh}x{ow} for a {shape[2]}x{shape[3]} input")
        self.out = (oh, ow)
        for t in top:
            t.reshape((shape[0], shape[1], oh, ow))

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        if self.method == "AVE":
            if self._is_global(x.shape):
                N, C, H, W = x.shape
                y = top[0].data.reshape(N, C)
                np.sum(x.reshape(N, C, H * W), axis=2, dtype=DTYPE, out=y)
                y /= DTYPE(H * W)
                return
            ave_pool_forward(x, self.kernel, self.pad, self.stride, self.out, top=top[0].data)
            return
        if self._backward_follows or len(top) > 1 or self._is_global(x.shape):
            self._code = self._max_forward(x, top[0].data)
            if len(top) > 1:
                top[1].data[...] = self._flat_index(self._code, x.shape[3])
        else:  # no backward expected: a backward after all finds the places from the bottom data
            self._code = None
            self._max_values(x, top[0].data)
        self._forwarded = True

    def _is_global(self, shape) -> bool:
        return (self.out == (1, 1) and self.pad == (0, 0)
                and self.kernel == (int(shape[2]), int(shape[3])))

    def _max_forward(self, x: np.ndarray, best: np.ndarray) -> np.ndarray:
        """Caffe MAX pooling into ``best``; returns, per output, the window offset ``i*kw + j``
        of the first maximum in h-then-w scan order (Caffe's strict ``>`` from -FLT_MAX; -1 if
        none)."""
        (kh, kw), (oh, ow) = self.kernel, self.out
        N, C, H, W = x.shape
        K = kh * kw
        ctype = np.int8 if K <= 127 else (np.int16 if K <= 32767 else np.int32)
        if self._is_global(x.shape):
            flat = x.reshape(N, C, H * W)
            code = flat.argmax(axis=2)
            b = np.take_along_axis(flat, code[..., None], axis=2)[..., 0]
            none = ~(b > -FLT_MAX)
            code[none] = -1
            best[...] = np.where(none, DTYPE(-FLT_MAX), b).reshape(best.shape)
            return code.reshape(N, C, 1, 1).astype(ctype)
        taps = window_taps((H, W), self.out, self.kernel, self.pad, self.stride)
        last = _channels_innermost(taps, self.out, C)
        code = np.empty((N, oh, ow, C), ctype).transpose(0, 3, 1, 2) if last else np.empty((N, C, oh, ow), ctype)

        def work(ns: slice, cs: slice) -> None:
            cb, xb = code[ns, cs], x[ns, cs]
            bb = channels_last(best[ns, cs], -FLT_MAX) if last else best[ns, cs]
            if last:
                xb = channels_last(xb)
            else:
                bb[...] = -FLT_MAX
            cb[...] = -1
            gt = np.empty_like(bb, bool)
            tmp = np.empty_like(bb, ctype)
            for kk, ro, co, ri, ci in taps:
                v, bv, g, t = xb[:, :, ri, ci], bb[:, :, ro, co], gt[:, :, ro, co], tmp[:, :, ro, co]
                np.greater(v, bv, out=g)
                np.maximum(bv, v, out=bv)
                # offsets only grow, so "set the code to kk where v > best" is a maximum
                np.multiply(g.view(np.int8), ctype(kk), out=t, casting="unsafe")
                np.maximum(cb[:, :, ro, co], t, out=cb[:, :, ro, co])
            if last:
                best[ns, cs] = bb

        _by_blocks(work, x.shape, self.out)
        return code

    def _max_values(self, x: np.ndarray, best: np.ndarray) -> None:
        """Caffe MAX pooling's values into ``best`` (``-FLT_MAX`` for a window that reads
        nothing), without their places: a forward pass that no backward follows (stages 1 and
        2) needs only these, a quarter of the work of :meth:`_max_forward`."""
        taps = window_taps(x.shape[2:], self.out, self.kernel, self.pad, self.stride)
        last = _channels_innermost(taps, self.out, x.shape[1])

        def work(ns: slice, cs: slice) -> None:
            if not last:
                _block_max(x[ns, cs], taps, best[ns, cs])
                return
            best[ns, cs] = _block_max(channels_last(x[ns, cs]), taps, channels_last(best[ns, cs], 0))

        _by_blocks(work, x.shape, self.out)

    def _flat_index(self, code: np.ndarray, width: int) -> np.ndarray:
        """Caffe's mask: index ``h*W + w`` of the maximum in its channel plane (-1 if none)."""
        (kh, kw), (ph, pw), (sh, sw), (oh, ow) = self.kernel, self.pad, self.stride, self.out
        c = code.astype(np.int64)
        r = np.arange(oh)[:, None] * sh - ph + c // kw
        q = np.arange(ow)[None, :] * sw - pw + c % kw
        return np.where(c < 0, -1, r * width + q)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        N, C, H, W = dx.shape
        if self.method == "AVE":
            if self._is_global(dx.shape):
                dx += dy / DTYPE(H * W)
                return
            ave_pool_backward(dy, dx.shape, self.kernel, self.pad, self.stride, dx=dx)
            return
        if len(top) > 1:   # as Caffe: route through the mask top
            idx = top[1].data.astype(np.int64)
            valid = idx >= 0
            offs = (np.arange(N * C, dtype=np.int64) * (H * W)).reshape(N, C, 1, 1)
            np.add.at(dx.reshape(-1), (idx + offs)[valid], dy[valid])
            return
        if not self._forwarded:
            raise self.error("backward called before forward")
        code = self._code
        if code is None:
            self._max_backward_from_data(bottom[0].data, dy, dx)
            return
        if self._is_global(dx.shape):
            c = code.reshape(N * C).astype(np.int64)
            ok = np.nonzero(c >= 0)[0]
            dx.reshape(N * C, H * W)[ok, c[ok]] += dy.reshape(N * C)[ok]
            return
        self._max_backward(code, dy, dx)

    def _max_backward(self, code: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> None:
        """Add each top diff into the bottom diff at its window's maximum, tap by tap (within
        one tap, different outputs read different inputs, so no sum collides)."""
        taps = window_taps(dx.shape[2:], self.out, self.kernel, self.pad, self.stride)

        last = _channels_innermost(taps, self.out, dx.shape[1])

        def work(ns: slice, cs: slice) -> None:
            cb, db, xb = code[ns, cs], dy[ns, cs], dx[ns, cs]
            if last:
                db, xb = channels_last(db), channels_last(xb, 0)
            eq = np.empty_like(db, bool)
            tmp = np.empty_like(db)
            for kk, ro, co, ri, ci in taps:
                e, t = eq[:, :, ro, co], tmp[:, :, ro, co]
                np.equal(cb[:, :, ro, co], kk, out=e)
                np.multiply(db[:, :, ro, co], e, out=t)
                dst = xb[:, :, ri, ci]
                dst += t
            if last:
                dx[ns, cs] += xb

        _by_blocks(work, dx.shape, self.out)

    def _max_backward_from_data(self, x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> None:
        """Add each top diff into the bottom diff at its window's first maximum in scan order,
        found from the bottom data ``x`` of the forward pass: per block the maxima again
        (:meth:`_max_values`), then tap by tap in scan order the outputs whose maximum the tap
        reads and that no earlier tap claimed (Caffe's strict ``>`` keeps the first of equal
        values; a window without a value above ``-FLT_MAX``, or with a NaN, gets none)."""
        taps = window_taps(dx.shape[2:], self.out, self.kernel, self.pad, self.stride)

        last = _channels_innermost(taps, self.out, dx.shape[1])

        def work(ns: slice, cs: slice) -> None:
            db, xb, dst = dy[ns, cs], x[ns, cs], dx[ns, cs]
            if last:
                db, xb, dst = channels_last(db), channels_last(xb), channels_last(dst, 0)
            best = _block_max(xb, taps, np.empty_like(db))
            claimed = ~(best > -FLT_MAX)
            eq = np.empty_like(db, bool)
            tmp = np.empty_like(db)
            for _, ro, co, ri, ci in taps:
                e, c, t = eq[:, :, ro, co], claimed[:, :, ro, co], tmp[:, :, ro, co]
                np.equal(xb[:, :, ri, ci], best[:, :, ro, co], out=e)
                np.greater(e, c, out=e)     # read here and by no earlier tap
                np.logical_or(c, e, out=c)
                np.multiply(db[:, :, ro, co], e, out=t)
                d = dst[:, :, ri, ci]
                d += t
            if last:
                dx[ns, cs] += dst

        _by_blocks(work, dx.shape, self.out)
