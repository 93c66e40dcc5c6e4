"""Numpy implementations of Caffe layers, one class per type; importing this package registers
them all in :data:`caffe_utils.layers.base.LAYERS`."""
from caffe_utils.layers.base import LAYERS, Blob, Layer, create_layer, register, supported_types  # noqa: F401
import importlib as _importlib

for _mod in ("data", "vision", "activation", "structure", "normalization", "loss"):
    try:
        _importlib.import_module(f"caffe_utils.layers.{_mod}")
    except ModuleNotFoundError as _exc:  # a module not written yet
        if _exc.name != f"caffe_utils.layers.{_mod}":
            raise
