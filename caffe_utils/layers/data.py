"""Layers that bring data into a net: ``Input`` and Caffe's data-source layers.

The numpy engine does not read databases inside the net: the tops of ``Data``, ``ImageData``,
``MemoryData``, ``HDF5Data`` and ``WindowData`` are fed by the caller (as with pycaffe's
``net.blobs['data'].data[...] = ...``); their shapes come from the layer's parameters where Caffe
would know them without reading the source (batch size, crop size, new_height/new_width,
MemoryData's dims), else from the ``input_shapes`` the net is given. ``DummyData`` fills its tops
from its fillers on every forward, as Caffe does.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from caffe_utils.fillers import fill
from caffe_utils.layers.base import Blob, Layer, register


class _SourceLayer(Layer):
    """A layer without bottoms whose tops keep the shape set at setup (or by the caller)."""

    num_bottom = 0

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        pass  # as Caffe: shapes are set in setup; callers reshape the tops themselves

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        pass

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        pass


@register
class Input(_SourceLayer):
    type = "Input"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        shapes = self.param.input_param.shape
        if len(shapes) not in (1, len(top)):
            raise self.error(f"has {len(top)} tops but {len(shapes)} shapes; give one shape, or one per top")
        for i, t in enumerate(top):
            dims = list(shapes[0 if len(shapes) == 1 else i].dim)
            if any(d < 0 for d in dims):
                raise self.error(f"negative dimension in input shape {dims}")
            t.reshape(dims)


class FedDataLayer(_SourceLayer):
    """A Caffe data-source layer whose tops the caller fills (see module docstring)."""

    #: shapes the caller gave for this layer's tops (set by the net before setup)
    given_shapes: Optional[List[Optional[Tuple[int, ...]]]] = None

    def default_shapes(self, num_top: int) -> List[Optional[Tuple[int, ...]]]:
        return [None] * num_top

    def _crop(self) -> int:
        return int(self.param.transform_param.crop_size)

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        shapes = self.default_shapes(len(top))
        given = self.given_shapes or []
        for i, t in enumerate(top):
            shape = given[i] if i < len(given) and given[i] is not None else shapes[i]
            if shape is None:
                raise self.error(
                    f"the shape of top '{self.param.top[i]}' is only known after reading the layer's "
                    "source; give the net input shapes (engine input_shapes) or use a deploy net with an Input layer")
            t.reshape(shape)


def _with_label(data_shape, num_top: int) -> List[Optional[Tuple[int, ...]]]:
    out = [data_shape]
    if num_top > 1:
        out.append((data_shape[0],) if data_shape is not None else None)
    return out + [None] * (num_top - len(out))


@register
class Data(FedDataLayer):
    type = "Data"

    def default_shapes(self, num_top):
        return _with_label(None, num_top)


@register
class ImageData(FedDataLayer):
    type = "ImageData"

    def default_shapes(self, num_top):
        p = self.param.image_data_param
        crop = self._crop()
        channels = 3 if p.is_color else 1
        if crop:
            shape = (p.batch_size, channels, crop, crop)
        elif p.new_height and p.new_width:
            shape = (p.batch_size, channels, p.new_height, p.new_width)
        else:
            shape = None
        return _with_label(shape, num_top)


@register
class MemoryData(FedDataLayer):
    type = "MemoryData"

    def default_shapes(self, num_top):
        p = self.param.memory_data_param
        return _with_label((p.batch_size, p.channels, p.height, p.width), num_top)


@register
class HDF5Data(FedDataLayer):
    type = "HDF5Data"


@register
class WindowData(FedDataLayer):
    type = "WindowData"

    def default_shapes(self, num_top):
        p = self.param.window_data_param
        crop = self._crop() or p.crop_size
        shape = (p.batch_size, 3, crop, crop) if crop else None
        return _with_label(shape, num_top)


@register
class DummyData(_SourceLayer):
    type = "DummyData"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.dummy_data_param
        n = len(top)
        if len(p.shape):
            if len(p.shape) not in (1, n):
                raise self.error("needs one shape, or one per top")
            shapes = [list(p.shape[0 if len(p.shape) == 1 else i].dim) for i in range(n)]
        else:
            legacy = [p.num, p.channels, p.height, p.width]
            if any(len(f) not in (1, n) for f in legacy):
                raise self.error("num/channels/height/width need one value, or one per top")
            shapes = [[f[0 if len(f) == 1 else i] for f in legacy] for i in range(n)]
        if len(p.data_filler) not in (0, 1, n):
            raise self.error("needs no data_filler, one, or one per top")
        self._fillers = [p.data_filler[0 if len(p.data_filler) == 1 else i] if len(p.data_filler) else None
                         for i in range(n)]
        self._rng = np.random.RandomState(0)
        for t, s in zip(top, shapes):
            t.reshape(s)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        for t, f in zip(top, self._fillers):
            if f is None:
                t.data[...] = 0
            else:
                t.data[...] = fill(f, t.shape, self._rng)
