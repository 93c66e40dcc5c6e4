"""The engine interface: what the initialization uses of a net, whichever engine runs it.

:class:`EngineNet` is a :class:`typing.Protocol`; both engines (:class:`~.numpy_net.Net` and
:class:`~.caffe_net.CaffeNet`) satisfy it, and ``isinstance(net, EngineNet)`` checks that a net
has every member (``tests/test_engine.py`` also checks the methods' signatures). Code written
against it needs no ``hasattr`` probing of the engine.

Vocabulary is pycaffe's: ``blobs`` and ``params`` hold blobs with ``.data`` and ``.diff`` numpy
arrays; ``backward(start=A, end=B)`` runs from layer ``A`` down to layer ``B``.

Code that changes a net's state for a while (``input_diffs``, an input blob's shape, blob data
it overwrites) must restore it in a ``finally`` block, so that an exception leaves the net as
the caller gave it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np


@runtime_checkable
class EngineNet(Protocol):
    """A Caffe net behind the engine interface (see the module docstring)."""

    #: TRAIN (0) or TEST (1), as the net was built (decides e.g. BatchNorm's default statistics)
    phase: int
    #: the upgraded, phase-filtered NetParameter both engines build from
    net_param: Any
    #: whether backward computes the diffs of the net's input blobs (Caffe's ``force_backward``);
    #: the initialization turns it off where it needs parameter diffs only
    input_diffs: bool

    @property
    def blobs(self) -> Mapping[str, Any]:
        """Blob name -> blob (``.data``, ``.diff``), input to output."""

    @property
    def params(self) -> Mapping[str, Sequence[Any]]:
        """Layer name -> its parameter blobs, only layers that have parameters, in net order."""

    @property
    def inputs(self) -> List[str]:
        """Names of the blobs fed from outside (Input layers' tops)."""

    @property
    def outputs(self) -> List[str]:
        """Names of the blobs no later layer reads (Caffe's net outputs), then of those only
        bottoms with ``propagate_down: false`` read (a head's inputs): where the gradient starts."""

    @property
    def layer_names(self) -> List[str]:
        """Names of the prototxt's layers, in order (Caffe's own Split layers are not listed)."""

    @property
    def layer_types(self) -> List[str]:
        """Types of the prototxt's layers, in the order of :attr:`layer_names`."""

    @property
    def bottom_names(self) -> Mapping[str, List[str]]:
        """Layer name -> its bottom blob names."""

    @property
    def top_names(self) -> Mapping[str, List[str]]:
        """Layer name -> its top blob names."""

    def forward(self, start: Optional[str] = None, end: Optional[str] = None) -> Mapping[str, np.ndarray]:
        """Run layers ``start`` to ``end`` (inclusive; None: the first / the last)."""

    def backward(self, start: Optional[str] = None, end: Optional[str] = None) -> Mapping[str, np.ndarray]:
        """Backpropagate from layer ``start`` down to layer ``end`` (None: the last / the first);
        parameter diffs accumulate until :meth:`clear_param_diffs`."""

    def reshape(self) -> None:
        """Propagate changed input blob shapes through the net."""

    def clear_param_diffs(self) -> None:
        """Zero every parameter diff."""

    def set_data(self, name: str, data: np.ndarray) -> None:
        """Set blob ``name``'s data, so that ``forward(start=...)`` from a later layer sees it."""

    def expect_backward(self, follows: bool) -> None:
        """Whether backward passes follow the forward passes from now on (True at first): the
        numpy engine's max pooling then skips recording its maxima's places; a backward pass
        stays correct either way."""

    def bind_data(self, name: str, array: np.ndarray) -> bool:
        """Make ``array`` (C-contiguous float32, of the blob's shape) blob ``name``'s data, so
        that the layer writing the blob writes straight into it, until :meth:`unbind_data`;
        False, and nothing changed, where the engine cannot (pycaffe: the caller copies)."""

    def unbind_data(self) -> None:
        """Give every bound blob its own array back, holding the bound array's values."""

    def param_shapes(self) -> Mapping[str, List[Tuple[int, ...]]]:
        """Layer name -> the shapes of its parameter blobs."""

    def set_lrn_alphas(self, alphas: Mapping[str, float]) -> None:
        """Set the ``alpha`` of the LRN layers named in ``alphas``, in ``net_param`` and in the
        running net; blobs, params and their data stay as they are."""

    def copy_from(self, weights: Union[str, Path]) -> None:
        """Load parameters from a caffemodel, matching layers by name (as Caffe's ``copy_from``)."""

    def save(self, path: Union[str, Path]) -> None:
        """Write the net's parameters as a caffemodel."""
