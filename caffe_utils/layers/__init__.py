"""Numpy implementations of Caffe layers, one class per type; importing this package registers
them all in :data:`caffe_utils.layers.base.LAYERS`."""
from caffe_utils.layers.base import LAYERS, Blob, Layer, create_layer, register, supported_types  # noqa: F401
from caffe_utils.layers import activation, data, loss, lrn, normalization, pooling, structure, vision  # noqa: F401,E402
from caffe_utils.layers import detection, forks, python_layer  # noqa: F401,E402
