"""Normalisation and affine layers of the numpy engine: Softmax, BatchNorm, Scale, Bias and MVN,
with Caffe's exact semantics (LRN is in :mod:`.lrn`).

* BatchNorm: ``use_global_stats`` defaults to ``phase == TEST``; blobs are the running mean and
  variance sums and the moving-average factor, so the statistics used are ``blob / blob[2]``
  (``0`` when ``blob[2] == 0``). In batch-statistics mode every forward updates the three blobs
  as Caffe does (``moving_average_fraction``, unbiased variance). BatchNorm has no learnable
  parameters: backward writes no parameter diffs.
* Scale/Bias take their factor from a parameter blob (one bottom) or from ``bottom[1]``; the
  parameter shape is ``bottom.shape[axis:axis + num_axes]`` as in Caffe (a 0-axis blob when
  ``num_axes == 0``). Scale's ``bias_term`` adds a second parameter blob.
* MVN, like Caffe's, works on blobs of at most 4 axes and outputs a 4-axis blob.

In-place use is supported as in Caffe (BatchNorm keeps its normalised output, Scale a copy of
its input, unless the scale's ``param_propagate_down`` is off: then no backward needs it). Scale
and Bias honour ``param_propagate_down``. Backward adds into diffs (see :mod:`.base`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register
from caffe_utils.layers.im2col import parallel
from caffe_utils.layers.structure import canonical_axis

_F = np.float32


def _shares(a: Blob, b: Blob) -> bool:
    return a is b or a.data is b.data


def _count(shape, start: int = 0, end=None) -> int:
    return int(np.prod(shape[start:end], dtype=np.int64))


def _csum(a: np.ndarray) -> np.ndarray:
    """Sum of an (outer, C, inner) array over outer and inner: shape (C,), float32."""
    return np.einsum("ijk->j", a)


def _cdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel dot product of two (outer, C, inner) arrays: shape (C,), float32."""
    return np.einsum("ijk,ijk->j", a, b)


#: elements of the outer-axis items :func:`_channelwise` takes at a time (at least one item)
CHANNELWISE_BLOCK = 1 << 18


def _channelwise(a: np.ndarray, v: np.ndarray, op: np.ufunc, x: Optional[np.ndarray] = None,
                 then: Optional[Tuple[np.ndarray, np.ufunc]] = None) -> None:
    """``a = op(x, v)`` for (outer, C, inner) arrays ``a`` and ``x`` (default: ``a`` itself, in
    place) and a per-channel ``v`` (C,), followed by ``a = op2(a, v2)`` for ``then = (v2, op2)``:
    item by item of the outer axis, in threads, so the second step finds the item in cache."""
    vb = v.reshape(1, -1, 1)
    src = a if x is None else x
    v2 = None if then is None else then[0].reshape(1, -1, 1)
    step = max(1, CHANNELWISE_BLOCK // max(a[:1].size, 1))

    def work(items: slice) -> None:
        for i in range(items.start, items.stop, step):
            part = slice(i, min(i + step, items.stop))
            op(src[part], vb, out=a[part])
            if then is not None:
                then[1](a[part], v2, out=a[part])

    parallel(work, a.shape[0], a.size)


def softmax(x: np.ndarray, axis: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Caffe's softmax along ``axis`` (max subtracted first), float32; ``out`` may be ``x``."""
    m = np.max(x, axis=axis, keepdims=True)
    e = np.subtract(x, m, out=out)
    np.exp(e, out=e)
    s = np.sum(e, axis=axis, keepdims=True, dtype=DTYPE)
    np.divide(e, s, out=e)
    return e


@register
class Softmax(Layer):
    type = "Softmax"
    num_bottom = 1
    num_top = 1

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        self.axis = canonical_axis(self, self.param.softmax_param.axis, len(bottom[0].shape))
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        softmax(bottom[0].data, self.axis, out=top[0].data)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        shape = top[0].shape
        dims = (_count(shape, 0, self.axis), shape[self.axis], _count(shape, self.axis + 1))
        y, dy = top[0].data.reshape(dims), top[0].diff.reshape(dims)
        dot = np.einsum("ijk,ijk->ik", dy, y)
        g = dy - dot[:, None, :]  # Caffe: (dy - dot) * y
        g *= y
        bottom[0].diff += g.reshape(shape)


@register
class BatchNorm(Layer):
    type = "BatchNorm"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.batch_norm_param
        self.maf = _F(p.moving_average_fraction)
        self.use_global_stats = bool(p.use_global_stats) if p.HasField("use_global_stats") \
            else self.phase == 1  # TEST
        shape = bottom[0].shape
        if not shape:
            raise self.error("its bottom is a scalar; BatchNorm needs a blob with a batch axis (N, C, ...)")
        self.channels = 1 if len(shape) == 1 else shape[1]
        self.eps = _F(p.eps)
        c = self.channels
        self.blobs = [Blob((c,)), Blob((c,)), Blob((1,))]
        self.x_norm: Optional[np.ndarray] = None
        self.std: Optional[np.ndarray] = None

    def _dims(self, shape: Tuple[int, ...]) -> Tuple[int, int, int]:
        n = shape[0]
        return n, self.channels, _count(shape) // (n * self.channels) if n * self.channels else 0

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if not shape:
            raise self.error("its bottom is a scalar; BatchNorm needs a blob with a batch axis (N, C, ...)")
        c = 1 if len(shape) == 1 else shape[1]
        if c != self.channels:
            raise self.error(f"bottom has {c} channels, the layer was set up for {self.channels}")
        top[0].reshape(shape)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        n, c, s = self._dims(x.shape)
        x3 = x.reshape(n, c, s)
        y = top[0].data.reshape(n, c, s)  # may be x3 itself (in place)
        if self.use_global_stats:
            f = self.blobs[2].data.reshape(-1)[0]
            scale = _F(0) if f == 0 else _F(1) / f
            mean = self.blobs[0].data * scale
            var = self.blobs[1].data * scale
            self.std, self.x_norm = np.sqrt(var + self.eps), None
            _channelwise(y, mean, np.subtract, x3, then=(self.std, np.divide))
            return
        inv_m = _F(1.0 / (n * s))
        mean = _csum(x3) * inv_m
        np.subtract(x3, mean[None, :, None], out=y)
        var = _cdot(y, y) * inv_m
        b2 = self.blobs[2].data
        b2 *= self.maf
        b2 += _F(1)
        self.blobs[0].data[...] = mean + self.maf * self.blobs[0].data
        m = x.size // c
        bias_correction = _F(m) / _F(m - 1) if m > 1 else _F(1)
        self.blobs[1].data[...] = bias_correction * var + self.maf * self.blobs[1].data
        std = np.sqrt(var + self.eps)
        np.divide(y, std[None, :, None], out=y)
        self.std = std
        # kept apart from top: an in-place layer downstream may change the top (Caffe: x_norm_)
        self.x_norm = y.copy()

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        shape = bottom[0].shape
        n, c, s = self._dims(shape)
        dy = top[0].diff.reshape(n, c, s)
        std = self.std[None, :, None]
        if self.use_global_stats:
            bottom[0].diff += (dy / std).reshape(shape)
            return
        y = self.x_norm
        a = _cdot(dy, y)
        b = _csum(dy)
        g = y * a[None, :, None]
        g += b[None, :, None]
        g *= _F(-1.0 / (n * s))
        g += dy
        g /= std
        bottom[0].diff += g.reshape(shape)

    @property
    def in_place_backward(self) -> bool:
        """With stored statistics the layer is a per-channel affine map, whose gradient is
        the diff divided by the channel's std."""
        return self.use_global_stats

    def backward_in_place(self, blob: Blob) -> None:
        n, c, s = self._dims(blob.shape)
        _channelwise(blob.diff.reshape(n, c, s), self.std, np.divide)


def _param_shape(layer: Layer, shape: Tuple[int, ...], axis: int, num_axes: int) -> Tuple[int, ...]:
    """``shape[axis:axis + num_axes]`` (``num_axes == -1``: to the end), checked as Caffe does."""
    ndim = len(shape)
    axis = canonical_axis(layer, axis, ndim)
    if num_axes < -1:
        raise layer.error(f"num_axes must be non-negative, or -1 to extend to the end, got {num_axes}")
    if num_axes >= 0 and axis + num_axes > ndim:
        raise layer.error(f"the parameter blob's shape extends past the bottom's shape {shape} when applied "
                          f"from axis {axis} with num_axes {num_axes}")
    return tuple(shape[axis:]) if num_axes == -1 else tuple(shape[axis:axis + num_axes])


def _outer_inner(layer: Layer, shape: Tuple[int, ...], pshape: Tuple[int, ...], axis_param: int,
                 check_dims: bool) -> Tuple[int, int, int]:
    """(outer, param count, inner) for applying a parameter of ``pshape`` to a bottom of ``shape``."""
    ndim = len(shape)
    axis = 0 if len(pshape) == 0 else canonical_axis(layer, axis_param, ndim)
    if axis + len(pshape) > ndim:
        raise layer.error(f"the parameter blob {pshape} extends past the bottom's shape {shape} when applied "
                          f"from axis {axis}")
    if check_dims and tuple(shape[axis:axis + len(pshape)]) != tuple(pshape):
        raise layer.error(f"dimension mismatch between the bottom {shape} (from axis {axis}) and the "
                          f"parameter blob {pshape}")
    outer, dim, inner = _count(shape, 0, axis), _count(pshape), _count(shape, axis + len(pshape))
    if outer * dim * inner != _count(shape):
        raise layer.error(f"the parameter blob {pshape} does not fit the bottom {shape} at axis {axis}")
    return outer, dim, inner


@register
class Bias(Layer):
    """``top = bottom[0] + b`` with ``b`` a parameter or ``bottom[1]``, broadcast from ``axis``."""

    type = "Bias"
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        if len(bottom) not in (1, 2):
            raise self.error(f"needs 1 or 2 bottoms, has {len(bottom)}")
        if len(bottom) == 1:
            p = self.param.bias_param
            self.blobs = [Blob(_param_shape(self, bottom[0].shape, p.axis, p.num_axes))]

    def _bias(self, bottom: List[Blob]) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        b = self._bias(bottom)
        self.dims = _outer_inner(self, bottom[0].shape, b.shape, self.param.bias_param.axis, True)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        outer, dim, inner = self.dims
        x = bottom[0].data.reshape(outer, dim, inner)
        b = self._bias(bottom).data.reshape(1, dim, 1)
        np.add(x, b, out=top[0].data.reshape(outer, dim, inner))

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        dy = top[0].diff
        if propagate_down[0]:
            bottom[0].diff += dy
        outer, dim, inner = self.dims
        if propagate_down[1] if len(bottom) > 1 else self.param_propagate_down(0):
            b = self._bias(bottom)
            b.diff += _csum(dy.reshape(outer, dim, inner)).reshape(b.shape)


@register
class Scale(Layer):
    """``top = bottom[0] * s (+ b)`` with ``s`` a parameter or ``bottom[1]``, broadcast from ``axis``."""

    type = "Scale"
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        if len(bottom) not in (1, 2):
            raise self.error(f"needs 1 or 2 bottoms, has {len(bottom)}")
        p = self.param.scale_param
        self.blobs = []
        if len(bottom) == 1:
            self.blobs.append(Blob(_param_shape(self, bottom[0].shape, p.axis, p.num_axes)))
        self._scale_from_bottom = len(bottom) > 1
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            num_axes = len(bottom[1].shape) if len(bottom) > 1 else int(p.num_axes)
            self.blobs.append(Blob(_param_shape(self, bottom[0].shape, p.axis, num_axes)))
        self._saved: Optional[np.ndarray] = None

    def _scale(self, bottom: List[Blob]) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        s = self._scale(bottom)
        axis = self.param.scale_param.axis
        self.dims = _outer_inner(self, bottom[0].shape, s.shape, axis, False)
        if self.bias_term:
            self.bias_dims = _outer_inner(self, bottom[0].shape, self.blobs[-1].shape, axis, True)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        outer, dim, inner = self.dims
        x = bottom[0].data
        # Caffe's temp_: an in-place top overwrites the input that the scale's diff needs (kept in
        # the array of the last forward when the shape allows)
        if _shares(bottom[0], top[0]) and self._scale_diff_possible(bottom):
            if self._saved is None or self._saved.shape != x.shape:
                self._saved = np.empty_like(x)
            np.copyto(self._saved, x)
        else:
            self._saved = None
        s = self._scale(bottom).data.reshape(-1)
        y = top[0].data.reshape(outer, dim, inner)
        if self.bias_term and self.bias_dims == self.dims:
            _channelwise(y, s, np.multiply, x.reshape(outer, dim, inner), then=(self.blobs[-1].data, np.add))
            return
        _channelwise(y, s, np.multiply, x.reshape(outer, dim, inner))
        if self.bias_term:
            bo, bd, bi = self.bias_dims
            top[0].data.reshape(bo, bd, bi)[...] += self.blobs[-1].data.reshape(1, bd, 1)

    def _scale_diff_possible(self, bottom: List[Blob]) -> bool:
        """Whether a backward may compute the scale's diff: always for a scale bottom (its
        propagate_down is known only then), for the scale parameter unless its
        ``param_propagate_down`` is off (the initialization, which never reads it)."""
        return len(bottom) > 1 or self.param_propagate_down(0)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        outer, dim, inner = self.dims
        dy = top[0].diff
        if self.bias_term and self.param_propagate_down(len(self.blobs) - 1):
            bo, bd, bi = self.bias_dims
            bias = self.blobs[-1]
            bias.diff += _csum(dy.reshape(bo, bd, bi)).reshape(bias.shape)
        s = self._scale(bottom)
        if propagate_down[1] if len(bottom) > 1 else self.param_propagate_down(0):
            x = bottom[0].data
            if _shares(bottom[0], top[0]):
                if self._saved is None or self._saved.shape != x.shape:
                    raise self.error("backward needs the input its in-place forward overwrote, and no copy of it "
                                     "was kept (no forward at this shape, or one with the scale's "
                                     "param_propagate_down off); run forward again")
                x = self._saved
            s.diff += _cdot(dy.reshape(outer, dim, inner), x.reshape(outer, dim, inner)).reshape(s.shape)
        if propagate_down[0]:
            g = dy.reshape(outer, dim, inner) * s.data.reshape(1, dim, 1)
            bottom[0].diff += g.reshape(bottom[0].shape)

    @property
    def in_place_backward(self) -> bool:
        """With the scale a parameter (one bottom): the parameter diffs from the top diff, then
        the diff times the scale, per channel."""
        return not self._scale_from_bottom

    def backward_in_place(self, blob: Blob) -> None:
        self.backward([blob], [False], [blob])  # the parameter diffs only, from the top diff
        outer, dim, inner = self.dims
        _channelwise(blob.diff.reshape(outer, dim, inner), self.blobs[0].data.reshape(-1), np.multiply)


@register
class MVN(Layer):
    """Mean-variance normalisation per (num, channel), or per num with ``across_channels``."""

    type = "MVN"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = _F(p.eps)

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) > 4:
            raise self.error(f"works on blobs of at most 4 axes (Caffe's legacy shape), got {shape}")
        legacy = tuple(shape) + (1,) * (4 - len(shape))
        top[0].reshape(legacy)
        rows = legacy[0] if self.across_channels else legacy[0] * legacy[1]
        self.rows = rows
        self.dim = _count(legacy) // rows if rows else 0

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data.reshape(self.rows, self.dim)
        inv = _F(1.0 / self.dim)
        mean = x.sum(axis=1, keepdims=True, dtype=DTYPE) * inv
        y = x - mean
        if self.normalize_variance:
            var = np.square(y).sum(axis=1, keepdims=True, dtype=DTYPE) * inv
            self.std = np.sqrt(var) + self.eps  # Caffe adds eps after the square root
            y = y / self.std
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(self.rows, self.dim)
        if self.normalize_variance:
            y = top[0].data.reshape(self.rows, self.dim)
            a = np.sum(y * dy, axis=1, keepdims=True, dtype=DTYPE)
            b = np.sum(dy, axis=1, keepdims=True, dtype=DTYPE)
            g = dy + _F(-1.0 / self.dim) * (y * a + b)
            g = g / self.std
        else:
            g = dy - dy.sum(axis=1, keepdims=True, dtype=DTYPE) * _F(1.0 / self.dim)
        bottom[0].diff += g.reshape(bottom[0].shape)
