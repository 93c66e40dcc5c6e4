"""Element-wise ("neuron") layers of the numpy engine: ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal,
Power, BNLL, Dropout, Exp, Log, Threshold and Clip, with Caffe's exact forward and backward
formulas (including its special cases, e.g. Power's backward branches and BNLL's threshold).

In-place use (top is bottom) behaves as in Caffe: where Caffe's backward reads ``bottom_data``
it reads ``bottom.data``, which then holds the top data; PReLU keeps a copy of its input as
Caffe's ``bottom_memory_`` does. Power and Log in place reproduce Caffe's result too: Caffe
overwrites the shared diff with the local derivative ``g`` before multiplying by the top diff,
so their in-place gradient is ``g * g`` (a Caffe bug, kept so the engines agree). Backward adds
into ``bottom.diff`` (see :mod:`.base`).

Limits: Dropout's TRAIN masks come from a numpy ``Generator`` (PCG64) owned by the layer (seeded
from the layer name, or by setting :attr:`Dropout.seed`), so they cannot equal Caffe's; Threshold has no
gradient (Caffe: not implemented), so it never propagates; Clip needs a schema with
``clip_param`` (BVLC Caffe >= 1.0.0-rc5, the project's built-in schema).
"""
from __future__ import annotations

import zlib
from typing import List, Optional

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register
from caffe_utils.layers.im2col import parallel

_F = np.float32


def _shares(a: Blob, b: Blob) -> bool:
    """True when ``a`` and ``b`` hold the same data array (in-place layer)."""
    return a is b or a.data is b.data


class NeuronLayer(Layer):
    """One bottom, one top of the same shape (Caffe's ``NeuronLayer``)."""

    num_bottom = 1
    num_top = 1

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        top[0].reshape(bottom[0].shape)


@register
class ReLU(NeuronLayer):
    type = "ReLU"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        self.slope = _F(self.param.relu_param.negative_slope)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        if self.slope == 0:
            x2, y2 = _rows(x), _rows(top[0].data)

            def work(images: slice) -> None:
                np.maximum(x2[images], _F(0), out=y2[images])

            parallel(work, x2.shape[0], x2.size)
        else:
            top[0].data[...] = np.maximum(x, _F(0)) + self.slope * np.minimum(x, _F(0))

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        x = bottom[0].data
        dy = top[0].diff
        pos = x > 0
        if self.slope == 0:
            bottom[0].diff += dy * pos
        else:  # Caffe: dy * ((x > 0) + slope * (x <= 0)), exactly dy or dy * slope
            f = pos.astype(DTYPE)
            f += self.slope * ~pos
            bottom[0].diff += dy * f

    @property
    def in_place_backward(self) -> bool:
        return True

    def backward_in_place(self, blob: Blob) -> None:
        """The diff times the top's ``> 0`` mask (in place Caffe reads the top as its bottom
        data), an image at a time in threads: no temporary the size of the blob."""
        y, d = _rows(blob.data), _rows(blob.diff)

        def work(images: slice) -> None:
            for i in range(images.start, images.stop):
                pos = y[i] > 0
                if self.slope == 0:
                    np.multiply(d[i], pos, out=d[i])
                else:
                    f = pos.astype(DTYPE)
                    f += self.slope * ~pos
                    d[i] *= f

        parallel(work, y.shape[0], y.size)


def _rows(a: np.ndarray) -> np.ndarray:
    """``a`` as (first axis, the rest): the items element-wise kernels run on in threads."""
    return a.reshape(1, -1) if a.ndim == 0 else a.reshape(a.shape[0], -1)


@register
class PReLU(NeuronLayer):
    type = "PReLU"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        if len(bottom[0].shape) < 2:
            raise self.error(f"needs a bottom with at least 2 axes, got shape {bottom[0].shape}")
        self.channel_shared = bool(self.param.prelu_param.channel_shared)
        # Caffe: a 0-axis (scalar) blob when shared, else one slope per channel
        self.blobs = [Blob(() if self.channel_shared else (bottom[0].shape[1],))]
        self._saved: Optional[np.ndarray] = None

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) < 2:
            raise self.error(f"needs a bottom with at least 2 axes, got shape {shape}")
        want = 1 if self.channel_shared else shape[1]
        if self.blobs[0].count != want:
            raise self.error(f"slope has {self.blobs[0].count} values but the bottom has {shape[1]} "
                             f"channels{' (channel_shared)' if self.channel_shared else ''}")
        top[0].reshape(shape)

    def _slope(self, ndim: int) -> np.ndarray:
        s = self.blobs[0].data.reshape(-1)
        if self.channel_shared:
            return s.reshape((1,) * ndim)
        return s.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        if _shares(bottom[0], top[0]):
            self._saved = x.copy()  # Caffe's bottom_memory_
        else:
            self._saved = None
        slope = self._slope(x.ndim)
        top[0].data[...] = np.maximum(x, _F(0)) + slope * np.minimum(x, _F(0))

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        x = bottom[0].data
        if _shares(bottom[0], top[0]) and self._saved is not None and self._saved.shape == x.shape:
            x = self._saved
        dy = top[0].diff
        neg = x <= 0
        # slope gradient: sum over all but the channel axis of dy * x where x <= 0
        g = dy * x
        g *= neg
        if self.channel_shared:
            self.blobs[0].diff += g.sum(dtype=DTYPE)
        else:
            c = x.shape[1]
            self.blobs[0].diff += np.einsum("ijk->j", g.reshape(x.shape[0], c, -1))
        if propagate_down[0]:
            f = neg * self._slope(x.ndim)
            f += ~neg
            bottom[0].diff += dy * f


@register
class ELU(NeuronLayer):
    type = "ELU"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        self.alpha = _F(self.param.elu_param.alpha)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        top[0].data[...] = np.maximum(x, _F(0)) + self.alpha * (np.exp(np.minimum(x, _F(0))) - _F(1))

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        x, y, dy = bottom[0].data, top[0].data, top[0].diff
        pos = x > 0
        f = (self.alpha + y) * ~pos
        f += pos
        bottom[0].diff += dy * f


@register
class Sigmoid(NeuronLayer):
    type = "Sigmoid"

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        with np.errstate(over="ignore"):
            top[0].data[...] = _F(1) / (_F(1) + np.exp(-x))

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff += top[0].diff * y * (_F(1) - y)


@register
class TanH(NeuronLayer):
    type = "TanH"

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        np.tanh(bottom[0].data, out=top[0].data)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff += top[0].diff * (_F(1) - y * y)


@register
class AbsVal(NeuronLayer):
    type = "AbsVal"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        if top[0] is bottom[0]:
            raise self.error("does not allow in-place computation; give the top a new name")

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        np.abs(bottom[0].data, out=top[0].data)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff += np.sign(bottom[0].data) * top[0].diff


@register
class Power(NeuronLayer):
    """``y = (shift + scale * x) ^ power`` with Caffe's special cases."""

    type = "Power"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.power_param
        self.power, self.scale, self.shift = _F(p.power), _F(p.scale), _F(p.shift)
        self.diff_scale = _F(self.power * self.scale)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        if self.diff_scale == 0:
            value = _F(1) if self.power == 0 else _F(np.power(self.shift, self.power))
            top[0].data[...] = value
            return
        t = bottom[0].data
        if self.scale != 1:
            t = t * self.scale
        if self.shift != 0:
            t = t + self.shift
        if self.power != 1:
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                t = np.power(t, self.power)
        top[0].data[...] = t

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        if self.diff_scale == 0:
            return  # Caffe: the diff is set to 0
        dy = top[0].diff
        x = bottom[0].data
        if self.power == 1:
            if _shares(bottom[0], top[0]):
                bottom[0].diff += self.diff_scale * self.diff_scale
            elif self.diff_scale == 1:
                bottom[0].diff += dy
            else:
                bottom[0].diff += self.diff_scale * dy
            return
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if self.power == 2:
                g = _F(self.diff_scale * self.scale) * x
                if self.shift != 0:
                    g = g + _F(self.diff_scale * self.shift)
            elif self.shift == 0:
                g = (top[0].data / x) * self.power
            else:
                g = x
                if self.scale != 1:
                    g = g * self.scale
                g = g + self.shift
                g = top[0].data / g
                if self.diff_scale != 1:
                    g = g * self.diff_scale
            # in place, Caffe's top_diff is the bottom_diff it has just overwritten with g
            bottom[0].diff += g * g if _shares(bottom[0], top[0]) else dy * g


@register
class BNLL(NeuronLayer):
    """``y = log(1 + exp(x))``, computed as Caffe does (gradient input clamped at 50)."""

    type = "BNLL"
    THRESHOLD = 50.0

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        with np.errstate(over="ignore"):
            # Caffe: exp in float, the rest in double (then rounded to float)
            e = np.exp(-np.abs(x)).astype(np.float64)
            top[0].data[...] = np.maximum(x, _F(0)).astype(np.float64) + np.log1p(e)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        e = np.exp(np.minimum(bottom[0].data, _F(self.THRESHOLD))).astype(np.float64)
        bottom[0].diff += (top[0].diff * e / (e + 1.0)).astype(DTYPE)


@register
class Dropout(NeuronLayer):
    """Caffe's inverted dropout: TRAIN keeps each element with probability ``1 - ratio`` and
    scales kept ones by ``1 / (1 - ratio)``; TEST is the identity."""

    type = "Dropout"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        ratio = float(self.param.dropout_param.dropout_ratio)
        if not 0.0 <= ratio < 1.0:
            raise self.error(f"dropout_ratio must be in [0, 1), got {ratio}")
        self.ratio = _F(ratio)
        self.scale = _F(1.0 / (1.0 - self.ratio))
        self._mask: Optional[np.ndarray] = None
        self.seed = zlib.crc32(self.name.encode("utf-8"))

    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        """Reseed the layer's random stream."""
        self._seed = int(value)
        self.rng = np.random.Generator(np.random.PCG64(self._seed))

    @property
    def train(self) -> bool:
        return self.phase == 0  # caffe_pb2.TRAIN

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        if self.train:
            keep = self.rng.random(x.shape, dtype=DTYPE) < _F(1.0 - float(self.ratio))
            self._mask = keep * self.scale  # 0 or scale: x * mask * scale == x * (mask * scale)
            np.multiply(x, self._mask, out=top[0].data)
        elif top[0] is not bottom[0]:
            top[0].data[...] = x

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        if self.train:
            bottom[0].diff += top[0].diff * self._mask
        else:
            bottom[0].diff += top[0].diff

    @property
    def in_place_backward(self) -> bool:
        return True

    def backward_in_place(self, blob: Blob) -> None:
        """TRAIN: the diff times the mask; TEST: the identity, so nothing to do."""
        if self.train:
            blob.diff *= self._mask


@register
class Exp(NeuronLayer):
    """``y = base ^ (shift + scale * x)`` (``base = -1`` means e)."""

    type = "Exp"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.exp_param
        base = _F(p.base)
        if base != -1 and not base > 0:
            raise self.error(f"base must be strictly positive (or -1 for e), got {p.base}")
        log_base = _F(1) if base == -1 else _F(np.log(base))
        if not np.isfinite(log_base):
            raise self.error(f"log(base) is not finite for base {p.base}")
        self.inner_scale = _F(log_base * _F(p.scale))
        shift = _F(p.shift)
        if shift == 0:
            self.outer_scale = _F(1)
        else:
            self.outer_scale = _F(np.power(base, shift)) if base != -1 else _F(np.exp(shift))

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        with np.errstate(over="ignore"):
            y = np.exp(x) if self.inner_scale == 1 else np.exp(self.inner_scale * x)
            if self.outer_scale != 1:
                y = y * self.outer_scale
        top[0].data[...] = y

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        g = top[0].data * top[0].diff
        if self.inner_scale != 1:
            g = g * self.inner_scale
        bottom[0].diff += g


@register
class Log(NeuronLayer):
    """``y = log_base(shift + scale * x)`` (``base = -1`` means e)."""

    type = "Log"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.log_param
        base = _F(p.base)
        if base != -1 and not base > 0:
            raise self.error(f"base must be strictly positive (or -1 for e), got {p.base}")
        with np.errstate(divide="ignore"):
            log_base = _F(1) if base == -1 else _F(np.log(base))
            base_scale = _F(1) / log_base if log_base != 0 else _F(np.inf)
        if not np.isfinite(log_base) or not np.isfinite(base_scale):
            raise self.error(f"1/log(base) is not finite for base {p.base}")
        self.base_scale = base_scale
        self.input_scale, self.input_shift = _F(p.scale), _F(p.shift)
        self.backward_num_scale = _F(self.input_scale / log_base)

    def _inner(self, x: np.ndarray) -> np.ndarray:
        if self.input_scale != 1:
            x = x * self.input_scale
        if self.input_shift != 0:
            x = x + self.input_shift
        return x

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.log(self._inner(bottom[0].data))
            if self.base_scale != 1:
                y = y * self.base_scale
        top[0].data[...] = y

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.power(self._inner(bottom[0].data), _F(-1))
            if self.backward_num_scale != 1:
                g = g * self.backward_num_scale
            # in place, Caffe's top_diff is the bottom_diff it has just overwritten with g
            bottom[0].diff += g * g if _shares(bottom[0], top[0]) else top[0].diff * g


@register
class Threshold(NeuronLayer):
    """``y = 1 if x > threshold else 0``; no gradient (Caffe does not implement one)."""

    type = "Threshold"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        self.threshold = _F(self.param.threshold_param.threshold)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        top[0].data[...] = (bottom[0].data > self.threshold).astype(DTYPE)

    def can_propagate(self, bottom_index: int) -> bool:
        return False

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            raise NotImplementedError(f"layer '{self.name}' (Threshold) has no backward pass, as in Caffe")


@register
class Clip(NeuronLayer):
    """``y = min(max(x, min), max)``; gradient passes where ``min <= x <= max`` (BVLC Caffe)."""

    type = "Clip"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        fields = self.param.DESCRIPTOR.fields_by_name
        if "clip_param" not in fields:
            raise self.error("this Caffe schema has no clip_param; Clip needs BVLC Caffe >= 1.0 schema")
        p = self.param.clip_param
        if not p.HasField("min") or not p.HasField("max"):
            raise self.error("clip_param needs both min and max")
        self.lo, self.hi = _F(p.min), _F(p.max)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        top[0].data[...] = np.maximum(self.lo, np.minimum(bottom[0].data, self.hi))

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            x = bottom[0].data
            bottom[0].diff += top[0].diff * ((x >= self.lo) & (x <= self.hi))
