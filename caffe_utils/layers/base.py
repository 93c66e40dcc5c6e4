"""Blob, Layer base class and the layer registry of the numpy engine.

One Caffe layer type is one small :class:`Layer` subclass, registered under its Caffe type
string with :func:`register`. A layer follows Caffe's protocol:

* ``setup(bottom, top)`` once: check the parameters, create ``self.blobs`` (the learnable
  parameters, zero-filled with their Caffe shapes; the net fills them from fillers or weights);
* ``reshape(bottom, top)`` whenever bottom shapes may have changed: reshape the tops;
* ``forward(bottom, top)``: write ``top[i].data``;
* ``backward(top, propagate_down, bottom)``: **add** (``+=``) the gradient into
  ``bottom[i].diff`` for each ``propagate_down[i]`` and into ``self.blobs[j].diff``. The net zeroes
  bottom diffs before a backward pass (parameter diffs accumulate across passes, as in Caffe,
  until :meth:`Net.clear_param_diffs`); that is how a blob with several consumers gets the sum of
  their gradients;
* optionally ``backward_in_place(blob)``, for a layer whose one top is its one bottom: Caffe's
  in-place backward, which turns the top diff in ``blob.diff`` into the bottom diff where it
  lies. No other layer reads an in-place blob's old contents (the net gives such a top a blob
  of its own), so nothing else adds into that diff; the net then needs no copy of the top diff
  and no zeroed bottom diff, two passes over the blob (:attr:`Layer.in_place_backward`).

Layer parameters are read from the LayerParameter message, whose descriptor supplies Caffe's
defaults. All arithmetic is float32, as in Caffe's CPU build.
"""
from __future__ import annotations

from typing import ClassVar, Dict, List, Sequence, Tuple, Type

import numpy as np

from caffe_utils.errors import PrototxtError, UnsupportedLayerError

DTYPE = np.float32


#: Caffe's Blob::Reshape limit: a blob's element count must fit in an ``int``
MAX_BLOB_COUNT = 2 ** 31 - 1


class BlobShapeError(PrototxtError):
    """A blob shape is negative, over Caffe's element limit (in total or in one dimension), or too
    large to allocate.

    Raised before anything is allocated (except for the MemoryError case); the net re-raises it
    naming the layer whose parameters implied the shape.
    """


def _checked_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise BlobShapeError(f"negative blob dimension in {shape}")
    count = 1
    for d in shape:
        count *= d
    if count > MAX_BLOB_COUNT or any(d > MAX_BLOB_COUNT for d in shape):
        raise BlobShapeError(f"a blob of shape {shape} has {count} elements, over Caffe's limit of "
                             f"{MAX_BLOB_COUNT}")
    return shape


def _zeros_pair(shape: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    try:
        return np.zeros(shape, DTYPE), np.zeros(shape, DTYPE)
    except MemoryError as exc:
        nbytes = 2 * DTYPE().itemsize * int(np.prod(shape, dtype=object))
        raise BlobShapeError(f"a blob of shape {shape} ({nbytes / 2 ** 30:.1f} GiB with its diff) "
                             "does not fit in memory") from exc
    except ValueError as exc:  # numpy: the dimensions' product (ignoring zeros) overflows
        raise BlobShapeError(f"a blob of shape {shape} has dimensions too large for numpy") from exc


class Blob:
    """A Caffe blob: ``data`` and ``diff`` float32 arrays of the same shape."""

    __slots__ = ("data", "diff")

    def __init__(self, shape: Sequence[int] = (0,)) -> None:
        shape = _checked_shape(shape)
        self.data, self.diff = _zeros_pair(shape)

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.data.shape

    @property
    def count(self) -> int:
        return int(self.data.size)

    # pycaffe's legacy 4-D accessors (Python layers use them)
    @property
    def num(self) -> int:
        return int(self.data.shape[0])

    @property
    def channels(self) -> int:
        return int(self.data.shape[1])

    @property
    def height(self) -> int:
        return int(self.data.shape[2])

    @property
    def width(self) -> int:
        return int(self.data.shape[3])

    def reshape(self, *shape) -> None:
        """Give the blob ``shape`` (a sequence, or the dimensions as arguments like pycaffe's
        ``Blob.reshape(n, c, h, w)``); contents are kept when the shape is unchanged, else zeroed."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = shape[0]
        shape = _checked_shape(shape)
        if shape != self.data.shape:
            self.data, self.diff = _zeros_pair(shape)

    def __repr__(self) -> str:
        return f"Blob{self.shape}"


class LayerSetupError(PrototxtError):
    """A layer's parameters or bottom shapes are invalid (message names the layer)."""


class Layer:
    """Base class of numpy-engine layers (see module docstring for the protocol)."""

    type: ClassVar[str] = ""
    #: exact number of bottoms / tops, or None for "any"; checked by the net
    num_bottom: ClassVar[object] = None
    num_top: ClassVar[object] = None

    def __init__(self, param, phase: int) -> None:
        self.param = param
        self.phase = phase
        self.blobs: List[Blob] = []
        self._param_propagate_down: Dict[int, bool] = {}

    def param_propagate_down(self, index: int) -> bool:
        """Whether backward computes the diff of ``self.blobs[index]`` (Caffe's
        ``param_propagate_down``; True unless turned off)."""
        return self._param_propagate_down.get(index, True)

    def set_param_propagate_down(self, index: int, value: bool) -> None:
        self._param_propagate_down[index] = bool(value)

    @property
    def name(self) -> str:
        return self.param.name

    def error(self, message: str) -> LayerSetupError:
        """An exception naming this layer, for invalid parameters or shapes."""
        return LayerSetupError(f"layer '{self.name}' ({self.type}): {message}")

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        """Check parameters and create ``self.blobs``; default: nothing to do."""

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        raise NotImplementedError

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        raise NotImplementedError

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        raise NotImplementedError

    @property
    def in_place_backward(self) -> bool:
        """Whether the net may call :meth:`backward_in_place` when the layer runs in place."""
        return False

    def backward_in_place(self, blob: Blob) -> None:
        """Backward of the layer run in place on ``blob`` (its top and bottom), with the bottom's
        ``propagate_down`` on: ``blob.diff`` holds the top diff and is overwritten by the bottom
        diff, as Caffe's in-place layers do; parameter diffs are added as by :meth:`backward`."""
        raise NotImplementedError

    def expect_backward(self, follows: bool) -> None:
        """Whether a backward pass follows the next forward passes: a layer may then skip, in
        a forward pass, state that only backward reads, and find it again in backward if one
        comes after all (max pooling's places of the maxima). Most layers ignore it."""

    def can_propagate(self, bottom_index: int) -> bool:
        """Whether a gradient can flow to ``bottom[bottom_index]`` (False e.g. for labels)."""
        return True

    def loss_weight_default(self, top_index: int) -> float:
        """Caffe's default loss weight of a top: 1 for a loss layer's first top, else 0."""
        return 0.0


LAYERS: Dict[str, Type[Layer]] = {}


def register(cls: Type[Layer]) -> Type[Layer]:
    """Class decorator: register ``cls`` under ``cls.type``."""
    if not cls.type:
        raise TypeError(f"{cls.__name__} has no Caffe type string")
    if cls.type in LAYERS:
        raise TypeError(f"layer type {cls.type!r} registered twice")
    LAYERS[cls.type] = cls
    return cls


def supported_types() -> List[str]:
    import caffe_utils.layers  # noqa: F401  (registers every layer module)
    return sorted(LAYERS)


def create_layer(param, phase: int) -> Layer:
    """Instantiate the numpy implementation of ``param.type``."""
    supported = supported_types()
    cls = LAYERS.get(param.type)
    if cls is None:
        raise UnsupportedLayerError(
            f"layer '{param.name}' has type '{param.type}', which the numpy engine does not support "
            f"(supported: {', '.join(supported)}); use --engine caffe with a Caffe that has it")
    return cls(param, phase)
