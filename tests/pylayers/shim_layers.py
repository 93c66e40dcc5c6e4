"""Python layers written against pycaffe's Layer API only (for tests/test_python_layer.py)."""
import numpy as np

import caffe


class ScaledSquare(caffe.Layer):
    """top = k * bottom^2, k from param_str; the diff is assigned, as pycaffe layers do."""

    def setup(self, bottom, top):
        self.k = float(self.param_str or 1.0)
        if len(bottom) != 1:
            raise Exception("one bottom")

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.k * bottom[0].data ** 2

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 2 * self.k * bottom[0].data * top[0].diff


class ChannelCount(caffe.Layer):
    """Uses the legacy accessors: top is (num, 1) holding the channel count."""

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].num, 1)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].channels

    def backward(self, top, propagate_down, bottom):
        pass
