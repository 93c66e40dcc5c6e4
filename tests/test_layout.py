"""Weight layout (caffe_utils.layout) against what the layers compute: a row is the filter of one
output channel, a column reads one input channel, for every affine type and storage layout."""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils import layout
from caffe_utils.engine.numpy_net import Net

LAYERS = {
    "conv": ('type: "Convolution" convolution_param { num_output: 6 kernel_size: 3 group: 2 }', (2, 4, 7, 7)),
    "deconv": ('type: "Deconvolution" convolution_param { num_output: 6 kernel_size: 3 stride: 2 group: 2 }',
               (2, 4, 5, 5)),
    "ip": ('type: "InnerProduct" inner_product_param { num_output: 5 }', (3, 8)),
    "ip_t": ('type: "InnerProduct" inner_product_param { num_output: 5 transpose: true }', (3, 8)),
}


def _net(tmp_path, kind):
    body, shape = LAYERS[kind]
    dims = " ".join(f"dim: {d}" for d in shape)
    p = tmp_path / "net.prototxt"
    p.write_text(f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'
                 f'layer {{ name: "a" {body} bottom: "data" top: "a" }}\n')
    net = Net(p, "TEST")
    rng = np.random.RandomState(1)
    for b in net.params["a"]:
        b.data[...] = rng.standard_normal(b.shape)
    net.blobs["data"].data[...] = rng.standard_normal(shape)
    return net, net.net_param.layer[1]


def _out(net) -> np.ndarray:
    net.forward()
    return np.array(net.blobs["a"].data, np.float64)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_rows_are_output_channels(tmp_path, kind):
    net, lp = _net(tmp_path, kind)
    n = layout.num_output(lp)
    assert net.blobs["a"].data.shape[1] == n
    before = _out(net)
    f = np.linspace(0.5, 2.0, n)
    layout.scale_rows(lp, net.params["a"], f)
    np.testing.assert_allclose(_out(net), before * f.reshape((1, -1) + (1,) * (before.ndim - 2)),
                               rtol=1e-5, atol=1e-5 * np.abs(before).max())
    # set_rows: only row i non-zero (and no bias) makes only output channel i non-zero
    fan = net.params["a"][0].data.size // n
    rows = np.zeros((n, fan), np.float32)
    rows[n - 2] = 1.0
    layout.set_rows(lp, net.params["a"][0], rows)
    net.params["a"][1].data[...] = 0
    out = _out(net)
    alive = [i for i in range(n) if np.abs(out[:, i]).max() > 0]
    assert alive == [n - 2]


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_columns_are_input_channels(tmp_path, kind):
    net, lp = _net(tmp_path, kind)
    before = _out(net)
    x = net.blobs["data"].data
    c = x.shape[1]
    f = np.linspace(0.5, 2.0, c)
    layout.scale_columns(lp, net.params["a"], 1.0 / f)  # one factor per input channel (conv) or value (IP)
    x *= f.reshape((1, -1) + (1,) * (x.ndim - 2)).astype(np.float32)
    np.testing.assert_allclose(_out(net), before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_input_energies_and_columns_against_a_loop(tmp_path, kind):
    net, lp = _net(tmp_path, kind)
    w = np.array(net.params["a"][0].data, np.float64)
    c = net.blobs["data"].data.shape[1]
    naive = np.zeros(c)
    for j in range(c):  # the weights that multiply input channel j, found by perturbing it
        x = np.zeros_like(net.blobs["data"].data)
        net.params["a"][1].data[...] = 0
        touched = np.zeros(w.shape, bool)
        for idx in np.ndindex(*w.shape):
            saved = net.params["a"][0].data[idx]
            net.params["a"][0].data[idx] = 0
            x[...] = 0
            x[:, j] = 1
            net.blobs["data"].data[...] = x
            with_zero = _out(net)
            net.params["a"][0].data[idx] = saved
            touched[idx] = not np.array_equal(with_zero, _out(net))
        naive[j] = float((w[touched] ** 2).sum())
    np.testing.assert_allclose(layout.input_energies(lp, net.params["a"][0].data), naive, rtol=1e-5)
    cols = layout.column_energies(layout.input_columns(lp, net.params["a"][0].data))
    if lp.type == "InnerProduct":
        np.testing.assert_allclose(cols, naive, rtol=1e-5)
    else:  # a convolution's columns are (channel, kernel position) pairs of its weight matrix
        assert cols.sum() == pytest.approx(naive.sum(), rel=1e-5)
