"""One engine interface over two implementations: real pycaffe and the built-in numpy engine.

:func:`open_net` returns a net with pycaffe's vocabulary that the initialization uses without
knowing which engine runs it:

* ``blobs`` / ``params``: ordered dicts (input to output) of blobs with ``.data`` and ``.diff``
  numpy arrays; ``inputs`` / ``outputs``; ``net_param`` (the upgraded, phase-filtered
  NetParameter); ``layer_names``, ``layer_types``, ``bottom_names``, ``top_names`` for the layers
  of the prototxt;
* ``forward(start=, end=)``, ``backward(start=, end=)`` (pycaffe's order: backward from ``start``
  down to ``end``), ``reshape()``, ``clear_param_diffs()``, ``set_data(name, data)``,
  ``copy_from(path)``, ``save(path)``; ``phase`` and ``input_diffs``;
* for speed, where the engine can (pycaffe cannot, and the calls then change nothing):
  ``bind_data(name, array)`` / ``unbind_data()`` (a layer writes a blob straight into the
  caller's array) and ``expect_backward(follows)`` (forward-only passes skip what only a backward
  reads).

:class:`~caffe_utils.engine.protocol.EngineNet` spells this interface out as a Protocol.

Engine names: ``auto`` (pycaffe when importable, else numpy), ``numpy``, ``caffe``. A GPU id goes
to pycaffe; asking the numpy engine for a GPU is an error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from caffe_utils import netio
from caffe_utils.engine.protocol import EngineNet
from caffe_utils.errors import EngineError
from caffe_utils.schema import pycaffe_importable

ENGINES = ("auto", "numpy", "caffe")


def physical_memory() -> int:
    """This machine's RAM in bytes (0 when the platform does not tell: no limit)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 0


def resolve_engine(engine: str = "auto", gpu: Optional[int] = None) -> str:
    """The concrete engine (``numpy`` or ``caffe``) that ``engine`` and ``gpu`` select."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        engine = "caffe" if pycaffe_importable() else "numpy"
    if engine == "numpy" and gpu is not None:
        raise EngineError("the numpy engine runs on the CPU only; drop --gpu or use --engine caffe with a CUDA Caffe")
    if engine == "caffe" and not pycaffe_importable():
        raise EngineError("pycaffe is not importable; build it with scripts/install_caffe.sh and add its "
                          "python folder to PYTHONPATH, or use --engine numpy")
    return engine


def open_net(net: Union[str, Path, object], weights: Optional[Union[str, Path]] = None,
             phase: Union[int, str] = netio.TEST, engine: str = "auto", gpu: Optional[int] = None, *,
             level: int = 0, stages: Sequence[str] = (),
             input_shapes: Optional[Mapping[str, Sequence[int]]] = None, seed: int = 0,
             fill_weights: bool = True) -> EngineNet:
    """Build ``net`` (prototxt path or NetParameter) on the selected engine. ``fill_weights``
    False: the numpy engine leaves the affine layers' weights zero rather than drawing their
    fillers, for a caller that fills them all (Caffe draws them either way)."""
    which = resolve_engine(engine, gpu)
    kwargs = dict(level=level, stages=stages, input_shapes=input_shapes, seed=seed)
    if which == "caffe":
        from caffe_utils.engine.caffe_net import CaffeNet
        return CaffeNet(net, phase, weights, gpu=gpu, **kwargs)
    from caffe_utils.engine.numpy_net import Net
    return Net(net, phase, weights, fill_weights=fill_weights, **kwargs)
