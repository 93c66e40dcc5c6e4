"""Caffe's Python layer on the numpy engine, through the shim of pycaffe's Layer API."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from caffe_utils.engine.numpy_net import Net
from caffe_utils.errors import MagicInitError
from gradcheck import check_gradients, make_layer, rand

HERE = Path(__file__).resolve().parent / "pylayers"

NET = """
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 4 dim: 4 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {{ num_output: 2 kernel_size: 1 }} }}
layer {{ name: "py" type: "Python" bottom: "conv" top: "py"
        python_param {{ module: "{module}" layer: "{layer}" param_str: "{param}" }} }}
layer {{ name: "mix" type: "Eltwise" bottom: "py" bottom: "conv" top: "mix" }}
"""


@pytest.fixture
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _net(tmp_path, module="shim_layers", layer="ScaledSquare", param="1.5"):
    p = tmp_path / "net.prototxt"
    p.write_text(NET.format(module=module, layer=layer, param=param))
    net = Net(p)
    rng = np.random.RandomState(0)
    for b in net.params["conv"]:
        b.data[...] = rng.standard_normal(b.shape)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    return net


def test_python_layer_forward_and_accumulated_backward(tmp_path, on_path):
    net = _net(tmp_path)
    net.forward()
    conv = np.array(net.blobs["conv"].data, np.float64)
    np.testing.assert_allclose(net.blobs["py"].data, 1.5 * conv ** 2, rtol=1e-6)
    g = np.random.RandomState(1).standard_normal(net.blobs["mix"].shape).astype(np.float32)
    net.blobs["mix"].diff[...] = g
    net.backward()
    # conv's diff is the sum of the Eltwise path (g) and the Python layer's (2 k conv g): the
    # layer's assignment must not overwrite the other consumer's share
    np.testing.assert_allclose(net.blobs["conv"].diff, g + 3.0 * conv * g, rtol=1e-5, atol=1e-6)


def test_python_layer_gradient(on_path):
    layer, bottom, top = make_layer('type: "Python" python_param { module: "shim_layers" layer: "ScaledSquare" '
                                    'param_str: "0.5" }', [rand((2, 3, 2, 2))])
    assert check_gradients(layer, bottom, top) > 0


def test_python_layer_legacy_accessors(tmp_path, on_path):
    p = tmp_path / "net.prototxt"
    p.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n'
                 'layer { name: "py" type: "Python" bottom: "data" top: "n" '
                 'python_param { module: "shim_layers" layer: "ChannelCount" } }\n')
    net = Net(p)
    net.forward()
    assert net.blobs["n"].data.shape == (2, 1) and np.all(net.blobs["n"].data == 3)


@pytest.mark.parametrize("module, layer, what", [
    ("no_such_module_here", "X", "cannot load the layer"),
    ("needs_more", "Uses", "cannot load the layer"),
    ("shim_layers", "NoSuchClass", "cannot load the layer"),
    ("shim_layers", "np", "not a caffe.Layer subclass"),
])
def test_python_layer_that_the_shim_cannot_run(tmp_path, on_path, module, layer, what):
    with pytest.raises(MagicInitError) as err:
        _net(tmp_path, module, layer)
    msg = str(err.value)
    assert "\n" not in msg and f"{module}.{layer}" in msg and what in msg and "--engine caffe" in msg


def test_the_real_caffe_module_is_left_alone(tmp_path, on_path):
    before = sys.modules.get("caffe")
    _net(tmp_path)
    assert sys.modules.get("caffe") is before
