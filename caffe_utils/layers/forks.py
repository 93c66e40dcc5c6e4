"""Fork layers of the numpy engine: ReLU6, Permute, ShuffleChannel, Upsample, Interp and Normalize,
each with the semantics of the fork that introduced it (the one whose fields the project's schema
carries, see ``caffe_utils/proto/caffe.proto``):

* ReLU6 (mobile forks, as brocolli-caffe 9.0.2): ``min(max(x, 0) + slope * min(x, 0), threshold)``;
  backward passes ``dy * ((x > 0) + slope * (x <= 0))`` where ``x < threshold``.
* Permute (SSD): axes in ``order``, the unnamed ones appended in their order.
* ShuffleChannel (farmingyard/ShuffleNet): channel ``i*k + j`` of ``group x k`` goes to ``j*group + i``.
* Upsample (brocolli-caffe, the YOLOv3 ports): nearest-neighbour repeat by ``scale`` of the last
  two axes (``dims_num: 4``) or of the last one (``dims_num: 3``); backward sums each block.
* Interp (PSPNet/deeplab): bilinear resize with aligned corners, after a crop by non-positive
  ``pad_beg``/``pad_end``; output size from ``zoom_factor``, ``shrink_factor``, both, or
  ``height`` and ``width``. Forward uses Caffe's float32 formula term for term.
* Normalize (SSD): L2 normalisation over each image (``across_spatial``) or over the channels at
  each position, with ``eps`` added to the sum of squares, then a learned scale (one value, or one
  per channel). Backward is SSD's CPU backward *as written*: with a per-channel scale it scales
  the normalised gradient by the channel's scale instead of differentiating through it, so it is
  the true gradient only when the scale is shared or uniform (kept so that the engines agree,
  like Power's in-place gradient in :mod:`.activation`). The scale's gradient is
  ``sum(dy * x / norm)``, which SSD computes as ``sum(dy * top) / scale``.

Layers whose parameter message is missing from the schema a net was read with (pycaffe's
schema may lack ``interp_param`` or ``shuffle_channel_param`` when the net leaves them at their
defaults) read the defaults of the project's schema (:func:`fork_message`). Backward adds into
bottom and parameter diffs (see :mod:`.base`).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register
from caffe_utils.schema import builtin_pb2

_F = np.float32


def fork_message(lp, field: str):
    """``lp.<field>`` of a LayerParameter, or that message's defaults when the schema the net
    was read with lacks the field."""
    if field in lp.DESCRIPTOR.fields_by_name:
        return getattr(lp, field)
    return getattr(builtin_pb2().LayerParameter(), field)


def fork_param(layer: Layer, field: str):
    """:func:`fork_message` of ``layer``'s LayerParameter."""
    return fork_message(layer.param, field)


# --------------------------------------------------------------------------------------------
# ReLU6
# --------------------------------------------------------------------------------------------

@register
class ReLU6(Layer):
    type = "ReLU6"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = fork_param(self, "relu6_param")
        self.slope, self.threshold = _F(p.negative_slope), _F(p.threshold)

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        y = np.maximum(x, _F(0))
        if self.slope != 0:
            y += self.slope * np.minimum(x, _F(0))
        np.minimum(y, self.threshold, out=top[0].data)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        x = bottom[0].data  # in place: the top data, as Caffe reads it
        pos = x > 0
        f = pos.astype(DTYPE)
        if self.slope != 0:
            f += self.slope * ~pos
        f *= x < self.threshold
        bottom[0].diff += top[0].diff * f


# --------------------------------------------------------------------------------------------
# Permute and ShuffleChannel
# --------------------------------------------------------------------------------------------

def permute_order(order, ndim: int) -> Tuple[int, ...]:
    """SSD's full axis order: the given axes (each < ndim, no repeats), then the others."""
    given = [int(o) for o in order]
    if any(o >= ndim for o in given):
        raise ValueError(f"order {given} names an axis beyond the bottom's {ndim}")
    if len(set(given)) != len(given):
        raise ValueError(f"there are duplicate orders in {given}")
    return tuple(given + [i for i in range(ndim) if i not in given])


@register
class Permute(Layer):
    type = "Permute"
    num_bottom = 1
    num_top = 1

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        try:
            self.order = permute_order(fork_param(self, "permute_param").order, len(shape))
        except ValueError as exc:
            raise self.error(str(exc)) from None
        self.inverse = tuple(int(i) for i in np.argsort(self.order))
        top[0].reshape(tuple(shape[o] for o in self.order))

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        top[0].data[...] = bottom[0].data.transpose(self.order)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff += top[0].diff.transpose(self.inverse)


@register
class ShuffleChannel(Layer):
    type = "ShuffleChannel"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        self.group = int(fork_param(self, "shuffle_channel_param").group)
        if self.group <= 0:
            raise self.error("group must be positive")

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) < 2 or shape[1] % self.group:
            raise self.error(f"channels of {shape} must be a multiple of group ({self.group})")
        top[0].reshape(shape)

    def _view(self, a: np.ndarray, rows: int) -> np.ndarray:
        n, c = a.shape[:2]
        return a.reshape(n, rows, c // rows, -1)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = self._view(bottom[0].data, self.group)
        self._view(top[0].data, x.shape[2])[...] = x.transpose(0, 2, 1, 3)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            dy = self._view(top[0].diff, bottom[0].shape[1] // self.group)
            self._view(bottom[0].diff, self.group)[...] += dy.transpose(0, 2, 1, 3)


# --------------------------------------------------------------------------------------------
# Upsample and Interp
# --------------------------------------------------------------------------------------------

@register
class Upsample(Layer):
    type = "Upsample"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = fork_param(self, "upsample_param")
        self.scale, self.dims = int(p.scale), int(p.dims_num)
        if self.dims not in (3, 4):
            raise self.error(f"dims_num must be 3 or 4, got {self.dims}")
        if self.scale <= 0:
            raise self.error("scale must be positive")

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != self.dims:
            raise self.error(f"dims_num {self.dims} needs a {self.dims}-axis bottom, got {shape}")
        self.axes = (2, 3) if self.dims == 4 else (2,)
        out = list(shape)
        for a in self.axes:
            out[a] *= self.scale
        top[0].reshape(out)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        y = bottom[0].data
        for a in self.axes:
            y = np.repeat(y, self.scale, axis=a)
        top[0].data[...] = y

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        s, shape = self.scale, bottom[0].shape
        if self.dims == 4:
            g = top[0].diff.reshape(shape[0], shape[1], shape[2], s, shape[3], s).sum(axis=(3, 5), dtype=DTYPE)
        else:
            g = top[0].diff.reshape(shape[0], shape[1], shape[2], s).sum(axis=3, dtype=DTYPE)
        bottom[0].diff += g


def interp_taps(size_in: int, size_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Caffe's aligned-corner bilinear taps along one axis: for each output index the first input
    index, the step to the second (0 at the last row), and the two float32 weights."""
    r = _F(size_in - 1) / _F(size_out - 1) if size_out > 1 else _F(0)
    pos = r * np.arange(size_out, dtype=_F)
    first = pos.astype(np.int64)
    step = (first < size_in - 1).astype(np.int64)
    w1 = pos - first.astype(_F)
    return first, step, _F(1) - w1, w1


def interp_matrix(size_in: int, size_out: int) -> np.ndarray:
    """The (size_out, size_in) float32 matrix of :func:`interp_taps` (for the backward pass)."""
    first, step, w0, w1 = interp_taps(size_in, size_out)
    m = np.zeros((size_out, size_in), _F)
    rows = np.arange(size_out)
    np.add.at(m, (rows, first), w0)
    np.add.at(m, (rows, first + step), w1)
    return m


@register
class Interp(Layer):
    type = "Interp"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = fork_param(self, "interp_param")
        self.pad_beg, self.pad_end = int(p.pad_beg), int(p.pad_end)
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error("Only supports non-pos padding (cropping) for now")

    def _out_size(self, h: int, w: int) -> Tuple[int, int]:
        p = fork_param(self, "interp_param")
        zoom, shrink = p.HasField("zoom_factor"), p.HasField("shrink_factor")
        if shrink and p.shrink_factor < 1:
            raise self.error("Shrink factor must be positive")
        if zoom and p.zoom_factor < 1:
            raise self.error("Zoom factor must be positive")
        hw = p.HasField("height") and p.HasField("width")

        def shrunk(h: int, w: int) -> Tuple[int, int]:
            return (h - 1) // p.shrink_factor + 1, (w - 1) // p.shrink_factor + 1

        def zoomed(h: int, w: int) -> Tuple[int, int]:
            return h + (h - 1) * (p.zoom_factor - 1), w + (w - 1) * (p.zoom_factor - 1)

        if shrink != zoom:  # Caffe's order: one factor, else height and width, else both factors
            return shrunk(h, w) if shrink else zoomed(h, w)
        if hw:
            return int(p.height), int(p.width)
        if shrink:
            return zoomed(*shrunk(h, w))
        raise self.error("give zoom_factor, shrink_factor (or both), or height and width")

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"needs a 4-axis bottom, got {shape}")
        h, w = shape[2] + self.pad_beg + self.pad_end, shape[3] + self.pad_beg + self.pad_end
        if h <= 0 or w <= 0:
            raise self.error(f"the crop by pad_beg/pad_end leaves {h}x{w} of {shape}")
        self.eff = (h, w)
        self.out = self._out_size(h, w)
        if min(self.out) <= 0:
            raise self.error(f"output size {self.out} must be positive")
        top[0].reshape((shape[0], shape[1]) + self.out)

    def _crop(self, a: np.ndarray) -> np.ndarray:
        b = -self.pad_beg
        return a[:, :, b:b + self.eff[0], b:b + self.eff[1]]

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = self._crop(bottom[0].data)
        h1, hs, h0l, h1l = interp_taps(self.eff[0], self.out[0])
        w1, ws, w0l, w1l = interp_taps(self.eff[1], self.out[1])
        rows0, rows1 = x[:, :, h1, :], x[:, :, h1 + hs, :]
        h0l, h1l = h0l[:, None], h1l[:, None]
        top[0].data[...] = (h0l * (w0l * rows0[..., w1] + w1l * rows0[..., w1 + ws])
                            + h1l * (w0l * rows1[..., w1] + w1l * rows1[..., w1 + ws]))

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        mh = interp_matrix(self.eff[0], self.out[0])
        mw = interp_matrix(self.eff[1], self.out[1])
        g = np.matmul(np.matmul(mh.T, top[0].diff), mw)
        self._crop(bottom[0].diff)[...] += g


# --------------------------------------------------------------------------------------------
# Normalize
# --------------------------------------------------------------------------------------------

@register
class Normalize(Layer):
    type = "Normalize"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if top[0] is bottom[0]:
            raise self.error("cannot run in place (its backward reads the bottom data)")
        if len(shape) < 2 or len(shape) > 4:
            raise self.error(f"needs a bottom of 2 to 4 axes, got {shape}")
        p = fork_param(self, "norm_param")
        self.across, self.shared, self.eps = bool(p.across_spatial), bool(p.channel_shared), _F(p.eps)
        self.blobs = [Blob(() if self.shared else (shape[1],))]

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) < 2 or len(shape) > 4:
            raise self.error(f"needs a bottom of 2 to 4 axes, got {shape}")
        if not self.shared and self.blobs[0].count != shape[1]:
            raise self.error(f"Scale size is inconsistent with prototxt config ({self.blobs[0].count} "
                             f"scales, {shape[1]} channels)")
        top[0].reshape(shape)

    def _scale(self, n_channels: int) -> np.ndarray:
        s = self.blobs[0].data.reshape(-1)
        return s.reshape(1, 1, 1) if self.shared else s.reshape(1, n_channels, 1)

    def _norm(self, x: np.ndarray) -> np.ndarray:
        """(N, C, HW) -> sqrt(sum of squares + eps): (N, 1, 1) across space, else (N, 1, HW)."""
        sq = np.square(x)
        s = sq.reshape(x.shape[0], -1).sum(axis=1, dtype=DTYPE).reshape(-1, 1, 1) if self.across \
            else sq.sum(axis=1, keepdims=True, dtype=DTYPE)
        return np.sqrt(s + self.eps)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data.reshape(bottom[0].shape[0], bottom[0].shape[1], -1)
        self._n = self._norm(x)
        top[0].data.reshape(x.shape)[...] = x / self._n * self._scale(x.shape[1])

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        shape = bottom[0].shape
        x = bottom[0].data.reshape(shape[0], shape[1], -1)
        dy = top[0].diff.reshape(x.shape)
        n = self._norm(x)
        z = x / n
        if self.shared:
            self.blobs[0].diff += np.sum(dy * z, dtype=DTYPE)
        else:
            self.blobs[0].diff += np.einsum("ncs->c", dy * z)
        if not propagate_down[0]:
            return
        dot = (x * dy).reshape(shape[0], -1).sum(axis=1, dtype=DTYPE).reshape(-1, 1, 1) if self.across \
            else (x * dy).sum(axis=1, keepdims=True, dtype=DTYPE)
        g = (dy - x * (dot / np.square(n))) / n
        bottom[0].diff.reshape(x.shape)[...] += g * self._scale(shape[1])
