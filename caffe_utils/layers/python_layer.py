"""Caffe's ``Python`` layer on the numpy engine: the user's layer class, run through a shim of
pycaffe's Layer API.

A Python layer names a module and a class (``python_param { module layer param_str }``) whose
``setup``/``reshape``/``forward``/``backward`` use only ``caffe.Layer``'s API: ``self.param_str``,
``self.phase``, and blobs' ``data``, ``diff``, ``shape``, ``count``, ``num``/``channels``/
``height``/``width`` and ``reshape``. Real pycaffe's ``caffe.Layer`` can only be made by a Caffe
net, so the module is loaded afresh (never put in ``sys.modules``) with builtins of its own whose
``__import__`` answers ``import caffe`` with :data:`SHIM`. A module that needs more of pycaffe (``caffe.io``,
``caffe.Net``, ...) or fails to import is one error line naming the module and the layer, and
suggesting ``--engine caffe`` with the user's own Caffe build.

pycaffe layers *assign* their bottoms' diffs; the engine's layers add into them (see
:mod:`caffe_utils.layers.base`), so the user's backward writes into zeroed stand-ins that are
then added.
"""
from __future__ import annotations

import builtins
import importlib.util
import types
from typing import List

import numpy as np

from caffe_utils.errors import UnsupportedLayerError
from caffe_utils.layers.base import Blob, Layer, register


class ShimLayer:
    """The base class a Python layer's module sees as ``caffe.Layer``."""

    param_str: str = ""
    phase: int = 1

    def setup(self, bottom, top) -> None:
        pass

    def reshape(self, bottom, top) -> None:
        pass

    def forward(self, bottom, top) -> None:
        pass

    def backward(self, top, propagate_down, bottom) -> None:
        pass


SHIM = types.ModuleType("caffe", "magic-init's stand-in for pycaffe's Layer API (numpy engine).")
SHIM.Layer = ShimLayer
SHIM.TRAIN, SHIM.TEST = 0, 1


def _diff_stand_in(blob: Blob) -> Blob:
    """A bottom blob as the user's backward sees it: its data, and a zeroed diff of its own."""
    stand_in = Blob.__new__(Blob)
    stand_in.data, stand_in.diff = blob.data, np.zeros_like(blob.diff)
    return stand_in


def _shim_import(name, globals=None, locals=None, fromlist=(), level=0):
    """``__import__`` for the user's module: ``caffe`` is :data:`SHIM`, ``caffe.*`` is not there."""
    if level == 0 and name == "caffe":
        return SHIM
    if level == 0 and name.startswith("caffe."):
        raise ImportError(f"No module named '{name}' in magic-init's stand-in for pycaffe's Layer API")
    return builtins.__import__(name, globals, locals, fromlist, level)


def _load_module(name: str):
    """Module ``name`` executed with its own builtins, whose ``__import__`` answers ``caffe``
    with :data:`SHIM` (also for imports inside its methods); nothing global changes."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named '{name}'")
    module = importlib.util.module_from_spec(spec)
    module.__dict__["__builtins__"] = dict(builtins.__dict__, __import__=_shim_import)
    spec.loader.exec_module(module)
    return module


@register
class Python(Layer):
    type = "Python"

    def _fail(self, what: str, exc: Exception, fix: str = "") -> UnsupportedLayerError:
        p = self.param.python_param
        fix = fix or ("the numpy engine runs Python layers that use only pycaffe's Layer API: use --engine caffe "
                      "with your own Caffe build and the module on PYTHONPATH")
        return UnsupportedLayerError(
            f"layer '{self.name}' (Python, {p.module}.{p.layer}): {what} ({type(exc).__name__}: {exc}); {fix}")

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.python_param
        try:
            cls = getattr(_load_module(p.module), p.layer)
        except Exception as exc:  # the user's module: any import-time failure is reported as one line
            raise self._fail("cannot load the layer", exc) from None
        if not (isinstance(cls, type) and issubclass(cls, ShimLayer)):
            raise self._fail("not a caffe.Layer subclass", TypeError(f"{p.layer} is {type(cls).__name__}"))
        self.user = cls()
        self.user.param_str, self.user.phase = p.param_str, self.phase
        self._call("setup", bottom, top)

    def _call(self, method: str, *args) -> None:
        try:
            getattr(self.user, method)(*args)
        except Exception as exc:  # the user's code, run through the shim
            fix = ""
            if method != "backward" and any(len(b.data.shape) and b.data.shape[0] > 1 for b in args[0]):
                # py-faster-rcnn's proposal layer, e.g., asserts one image per batch
                fix = "it ran on a batch of several images: a layer written for one image needs --batch-size 1"
            raise self._fail(f"its {method} failed", exc, fix) from None

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        self._call("reshape", bottom, top)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        self._call("forward", bottom, top)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not any(propagate_down):
            return  # a head (propagate_down: false on every bottom): the pycaffe engine skips it too
        stand_ins = [_diff_stand_in(b) for b in bottom]
        self._call("backward", top, propagate_down, stand_ins)
        for b, s, down in zip(bottom, stand_ins, propagate_down):
            if down:
                b.diff += s.diff
