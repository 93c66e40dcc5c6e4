"""Tests of Softmax, BatchNorm, Scale, Bias and MVN (caffe_utils/layers/normalization.py): loop
oracles transcribing Caffe's C++, finite-difference gradient checks on every bottom and parameter,
BatchNorm's running statistics, in-place use, and comparisons with real pycaffe (skipped when
pycaffe is not importable)."""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils.layers.base import LayerSetupError
from gradcheck import check_gradients, make_layer, rand
from reference import check_against_caffe

TRAIN, TEST = 0, 1
F = np.float32






def count(shape, a=0, b=None):
    return int(np.prod(shape[a:b], dtype=np.int64))


class TopView:
    """What the net gives an in-place layer's backward: the shared data and a copy of the diff."""

    def __init__(self, blob, diff):
        self.data, self.diff = blob.data, np.array(diff, F)

    @property
    def shape(self):
        return self.data.shape


# ----------------------------------------------------------------------------- Softmax
def softmax_oracle(x, axis, dy):
    outer, c, inner = count(x.shape, 0, axis), x.shape[axis], count(x.shape, axis + 1)
    x3 = x.reshape(outer, c, inner).astype(np.float64)
    d3 = dy.reshape(outer, c, inner).astype(np.float64)
    y = np.zeros_like(x3)
    dx = np.zeros_like(x3)
    for i in range(outer):
        for k in range(inner):
            m = max(x3[i, j, k] for j in range(c))
            e = [np.exp(x3[i, j, k] - m) for j in range(c)]
            s = sum(e)
            for j in range(c):
                y[i, j, k] = e[j] / s
            dot = sum(d3[i, j, k] * y[i, j, k] for j in range(c))
            for j in range(c):
                dx[i, j, k] = (d3[i, j, k] - dot) * y[i, j, k]
    return y.reshape(x.shape), dx.reshape(x.shape)


@pytest.mark.parametrize("axis,shape", [(1, (2, 5, 3, 2)), (0, (4, 3)), (-1, (2, 3, 6)), (2, (2, 2, 3, 2))])
def test_softmax_matches_loop(axis, shape):
    x = rand(shape, 1) * 3
    x.reshape(-1)[0] = 80  # large values are handled by subtracting the max
    dy = rand(shape, 2)
    layer, bottom, top = make_layer(f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}', [x])
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    y, dx = softmax_oracle(x, axis % len(shape), dy)
    np.testing.assert_allclose(top[0].data, y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bottom[0].diff, dx, rtol=1e-4, atol=1e-6)
    assert check_gradients(layer, bottom, top, step=1e-3) > 0


# ----------------------------------------------------------------------------- BatchNorm
def bn_oracle(x, dy, blobs, global_stats, eps, maf):
    """BatchNormLayer transcribed with per-channel loops; returns y, dx, new blobs."""
    n, c = x.shape[0], (1 if x.ndim == 1 else x.shape[1])
    x3 = x.reshape(n, c, -1).astype(np.float64)
    d3 = dy.reshape(n, c, -1).astype(np.float64)
    m = x3.shape[0] * x3.shape[2]
    b0, b1, b2 = [np.array(b, np.float64).copy() for b in blobs]
    y = np.zeros_like(x3)
    dx = np.zeros_like(x3)
    for ch in range(c):
        v = x3[:, ch, :]
        if global_stats:
            sf = 0.0 if b2[0] == 0 else 1.0 / b2[0]
            mean, var = b0[ch] * sf, b1[ch] * sf
        else:
            mean = v.sum() / m
            var = ((v - mean) ** 2).sum() / m
            b0[ch] = mean + maf * b0[ch]
            b1[ch] = (m / (m - 1) if m > 1 else 1) * var + maf * b1[ch]
        std = np.sqrt(var + eps)
        yc = (v - mean) / std
        y[:, ch, :] = yc
        dyc = d3[:, ch, :]
        if global_stats:
            dx[:, ch, :] = dyc / std
        else:
            dx[:, ch, :] = (dyc - (yc * (dyc * yc).sum() + dyc.sum()) / m) / std
    if not global_stats:
        b2 = b2 * maf + 1
    return y.reshape(x.shape), dx.reshape(x.shape), (b0, b1, b2)


@pytest.mark.parametrize("phase,spec,shape", [
    (TEST, "", (2, 3, 4, 5)),
    (TRAIN, "", (3, 4, 2, 3)),
    (TRAIN, "batch_norm_param { moving_average_fraction: 0.9 eps: 0.001 }", (5, 3)),
    (TEST, "batch_norm_param { use_global_stats: false }", (2, 3, 5)),
    (TRAIN, "batch_norm_param { use_global_stats: true eps: 0.01 }", (2, 3, 2, 2)),
])
def test_batchnorm_matches_loop(phase, spec, shape):
    x = rand(shape, 3) * 2 + 1
    dy = rand(shape, 4)
    layer, bottom, top = make_layer(f'name: "bn" type: "BatchNorm" {spec}', [x], phase)
    c = shape[1]
    assert [b.shape for b in layer.blobs] == [(c,), (c,), (1,)]
    blobs = [rand((c,), 5), np.abs(rand((c,), 6)) + 0.5, np.array([1.7], F)]
    for b, v in zip(layer.blobs, blobs):
        b.data[...] = v
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    p = layer.param.batch_norm_param
    global_stats = p.use_global_stats if p.HasField("use_global_stats") else phase == TEST
    y, dx, new = bn_oracle(x, dy, blobs, global_stats, float(F(p.eps)), float(F(p.moving_average_fraction)))
    np.testing.assert_allclose(top[0].data, y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, dx, rtol=1e-4, atol=1e-5)
    for b, w in zip(layer.blobs, new):
        np.testing.assert_allclose(b.data, w, rtol=1e-5, atol=1e-6)
        assert not b.diff.any()  # BatchNorm has no learnable parameters


def test_batchnorm_zero_factor_and_in_place():
    x = rand((2, 3, 4), 7)
    layer, bottom, top = make_layer('name: "bn" type: "BatchNorm"', [x])
    layer.forward(bottom, top)  # fresh blobs: factor 0 -> mean 0, var 0
    np.testing.assert_allclose(top[0].data, x / np.sqrt(F(1e-5)), rtol=1e-6)
    # in place in TRAIN mode: backward uses the kept normalised output, not the (changed) top
    ref, rb, rt = make_layer('name: "bn" type: "BatchNorm"', [x], TRAIN)
    dy = rand(x.shape, 8)
    ref.forward(rb, rt)
    rt[0].diff[...] = dy
    ref.backward(rt, [True], rb)
    layer, bottom, top = make_layer('name: "bn" type: "BatchNorm"', [x], TRAIN, in_place=True)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(bottom[0].data, rt[0].data)
    bottom[0].data *= 3  # e.g. an in-place Scale after it
    bottom[0].diff[...] = 0
    layer.backward([TopView(bottom[0], dy)], [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, rb[0].diff, rtol=1e-6)


@pytest.mark.parametrize("phase,shape", [(TRAIN, (3, 2, 3, 2)), (TEST, (2, 3, 4)), (TRAIN, (6, 4))])
def test_batchnorm_gradients(phase, shape):
    x = rand(shape, 9) * 2 + 0.5
    layer, bottom, top = make_layer('name: "bn" type: "BatchNorm"', [x], phase)
    c = shape[1]
    layer.blobs[0].data[...] = rand((c,), 10)
    layer.blobs[1].data[...] = np.abs(rand((c,), 11)) + 0.5
    layer.blobs[2].data[...] = 1.3
    check_gradients(layer, bottom, top, step=1e-2, check_params=False)


# ----------------------------------------------------------------------------- Scale / Bias
def affine_oracle(x, p, axis, mode, dy):
    """Scale/Bias with explicit (outer, dim, inner) loops; returns y, dx, dp."""
    ax = 0 if p.ndim == 0 else axis % x.ndim
    outer, dim, inner = count(x.shape, 0, ax), p.size, count(x.shape, ax + p.ndim)
    xf, pf, df = x.reshape(-1).astype(np.float64), p.reshape(-1).astype(np.float64), dy.reshape(-1)
    y = np.zeros(x.size)
    dx = np.zeros(x.size)
    dp = np.zeros(dim)
    for n in range(outer):
        for d in range(dim):
            for k in range(inner):
                i = (n * dim + d) * inner + k
                if mode == "scale":
                    y[i] = xf[i] * pf[d]
                    dx[i] = df[i] * pf[d]
                    dp[d] += df[i] * xf[i]
                else:
                    y[i] = xf[i] + pf[d]
                    dx[i] = df[i]
                    dp[d] += df[i]
    return y.reshape(x.shape), dx.reshape(x.shape), dp.reshape(p.shape)


SCALE_CASES = [  # (spec, bottom shape, param shape or None for a learnable parameter, axis)
    ("", (2, 3, 4, 2), None, 1),
    ("scale_param { axis: 0 num_axes: 2 }", (2, 3, 4), None, 0),
    ("scale_param { num_axes: -1 }", (2, 3, 2), None, 1),
    ("scale_param { num_axes: 0 }", (2, 3, 2), None, 1),
    ("scale_param { axis: -1 }", (2, 3, 5), None, 2),
    ("scale_param { axis: 2 num_axes: 2 }", (2, 3, 4, 5), None, 2),
    ("", (2, 3, 4), (3,), 1),
    ("scale_param { axis: 0 }", (2, 3, 4), (2, 3), 0),
    ("", (2, 3, 4), (), 1),
    ("scale_param { axis: 1 }", (3, 4), (3, 4), 1),
]


@pytest.mark.parametrize("spec,shape,pshape,axis", SCALE_CASES)
@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_scale_bias_match_loop(kind, spec, shape, pshape, axis):
    if pshape == (3, 4) and shape == (3, 4):
        pshape = (4,)  # bottom[1] must fit after axis 1
    spec = spec.replace("scale_param", f"{kind.lower()}_param")
    x = rand(shape, 12)
    arrays = [x] if pshape is None else [x, rand(pshape, 13)]
    layer, bottom, top = make_layer(f'name: "l" type: "{kind}" {spec}', arrays)
    if pshape is None:
        assert len(layer.blobs) == 1
        p = rand(layer.blobs[0].shape, 14)
        layer.blobs[0].data[...] = p
        layer.blobs[0].diff[...] = 0.25  # accumulates
        pblob = layer.blobs[0]
    else:
        assert layer.blobs == []
        p, pblob = arrays[1], bottom[1]
    dy = rand(shape, 15)
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True] * len(bottom), bottom)
    y, dx, dp = affine_oracle(x, p, axis, kind.lower(), dy)
    np.testing.assert_allclose(top[0].data, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bottom[0].diff, dx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pblob.diff, dp + (0.25 if pshape is None else 0), rtol=1e-5, atol=1e-5)
    assert check_gradients(layer, bottom, top) > 0


def test_scale_param_shapes_and_bias_term():
    x = rand((2, 3, 4, 5), 16)
    layer, bottom, top = make_layer('name: "s" type: "Scale" scale_param { bias_term: true }', [x])
    assert [b.shape for b in layer.blobs] == [(3,), (3,)]
    layer.blobs[0].data[...] = [1, 2, -1]
    layer.blobs[1].data[...] = [0.5, 0, -2]
    layer.forward(bottom, top)
    want = x * np.array([1, 2, -1], F)[:, None, None] + np.array([0.5, 0, -2], F)[:, None, None]
    np.testing.assert_allclose(top[0].data, want, rtol=1e-6)
    assert check_gradients(layer, bottom, top) > 0
    layer, bottom, top = make_layer('name: "s" type: "Scale" scale_param { axis: 0 bias_term: true }',
                                    [x, rand((2, 3), 17)])
    assert [b.shape for b in layer.blobs] == [(2, 3)]
    layer.blobs[0].data[...] = rand((2, 3), 18)
    assert check_gradients(layer, bottom, top) > 0
    layer, _, _ = make_layer('name: "s" type: "Scale" scale_param { num_axes: 0 bias_term: true }', [x])
    assert [b.shape for b in layer.blobs] == [(), ()]


def test_scale_in_place_uses_saved_input():
    x = rand((2, 3, 4), 19)
    dy = rand(x.shape, 20)
    ref, rb, rt = make_layer('name: "s" type: "Scale"', [x])
    ref.blobs[0].data[...] = [2, -1, 0.5]
    ref.forward(rb, rt)
    rt[0].diff[...] = dy
    ref.backward(rt, [True], rb)
    layer, bottom, top = make_layer('name: "s" type: "Scale"', [x], in_place=True)
    layer.blobs[0].data[...] = [2, -1, 0.5]
    layer.forward(bottom, top)
    np.testing.assert_array_equal(bottom[0].data, rt[0].data)
    bottom[0].diff[...] = 0
    layer.backward([TopView(bottom[0], dy)], [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, rb[0].diff, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].diff, ref.blobs[0].diff, rtol=1e-6)


def test_scale_in_place_without_param_diffs_keeps_no_copy():
    """With the parameters' diffs off (as the initialization runs it), an in-place Scale keeps
    no copy of its input and backward still gives the bottom diff; a backward that wants the
    scale's diff after such a forward is an error naming the layer, not a wrong diff."""
    x = rand((2, 3, 4), 19)
    dy = rand(x.shape, 20)
    ref, rb, rt = make_layer('name: "s" type: "Scale" scale_param { bias_term: true }', [x])
    ref.blobs[0].data[...] = [2, -1, 0.5]
    ref.forward(rb, rt)
    rt[0].diff[...] = dy
    ref.backward(rt, [True], rb)
    layer, bottom, _ = make_layer('name: "s" type: "Scale" scale_param { bias_term: true }', [x], in_place=True)
    layer.blobs[0].data[...] = [2, -1, 0.5]
    layer.set_param_propagate_down(0, False)
    layer.set_param_propagate_down(1, False)
    layer.forward(bottom, bottom)
    assert layer._saved is None
    bottom[0].diff[...] = 0
    layer.backward([TopView(bottom[0], dy)], [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, rb[0].diff, rtol=1e-6)
    assert not layer.blobs[0].diff.any() and not layer.blobs[1].diff.any()
    layer.set_param_propagate_down(0, True)
    with pytest.raises(LayerSetupError, match="layer 's'.*run forward again"):
        layer.backward([TopView(bottom[0], dy)], [True], bottom)


def test_bias_param_diff_honours_param_propagate_down():
    x = rand((2, 3, 4), 21)
    layer, bottom, top = make_layer('name: "b" type: "Bias"', [x])
    top[0].diff[...] = rand(x.shape, 22)
    layer.set_param_propagate_down(0, False)
    layer.backward(top, [True], bottom)
    assert not layer.blobs[0].diff.any()
    np.testing.assert_array_equal(bottom[0].diff, top[0].diff)
    layer.set_param_propagate_down(0, True)
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, top[0].diff.sum(axis=(0, 2)), rtol=1e-6)


def test_scale_bias_errors():
    x = rand((2, 3, 4))
    with pytest.raises(LayerSetupError, match="extends past"):
        make_layer('name: "s" type: "Scale" scale_param { axis: 2 num_axes: 2 }', [x])
    with pytest.raises(LayerSetupError, match="dimension mismatch"):
        make_layer('name: "b" type: "Bias"', [x, rand((4,))])
    with pytest.raises(LayerSetupError, match="does not fit"):
        make_layer('name: "s" type: "Scale"', [x, rand((5,))])


# ----------------------------------------------------------------------------- MVN
def mvn_oracle(x, dy, normalize_variance, across, eps):
    shape4 = tuple(x.shape) + (1,) * (4 - x.ndim)
    rows = shape4[0] if across else shape4[0] * shape4[1]
    x2 = x.reshape(rows, -1).astype(np.float64)
    d2 = dy.reshape(rows, -1).astype(np.float64)
    dim = x2.shape[1]
    y = np.zeros_like(x2)
    dx = np.zeros_like(x2)
    for r in range(rows):
        mean = x2[r].sum() / dim
        c = x2[r] - mean
        if normalize_variance:
            std = np.sqrt((c ** 2).sum() / dim) + eps
            y[r] = c / std
            dx[r] = (d2[r] - (y[r] * (y[r] * d2[r]).sum() + d2[r].sum()) / dim) / std
        else:
            y[r] = c
            dx[r] = d2[r] - d2[r].sum() / dim
    return y.reshape(shape4), dx.reshape(x.shape)


@pytest.mark.parametrize("spec,shape", [
    ("", (2, 3, 4, 5)),
    ("mvn_param { across_channels: true }", (2, 3, 2, 3)),
    ("mvn_param { normalize_variance: false }", (2, 3, 4, 2)),
    ("mvn_param { normalize_variance: false across_channels: true eps: 0.1 }", (3, 2, 2, 2)),
    ("mvn_param { eps: 0.01 }", (3, 4, 5)),
    ("mvn_param { across_channels: true }", (4, 6)),
])
def test_mvn_matches_loop(spec, shape):
    x = rand(shape, 21) * 2 + 1
    layer, bottom, top = make_layer(f'name: "m" type: "MVN" {spec}', [x])
    dy = rand(top[0].shape, 22)
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    p = layer.param.mvn_param
    y, dx = mvn_oracle(x, dy, p.normalize_variance, p.across_channels, float(F(p.eps)))
    assert top[0].shape == y.shape
    np.testing.assert_allclose(top[0].data, y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, dx, rtol=1e-4, atol=1e-5)
    assert check_gradients(layer, bottom, top) > 0


# ----------------------------------------------------------------------------- against pycaffe
def net(shapes, layers: str) -> str:
    tops = " ".join(f'top: "{n}"' for n in shapes)
    dims = " ".join("shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes.values())
    return f'layer {{ name: "in" type: "Input" {tops} input_param {{ {dims} }} }}\n' + layers


CAFFE_CASES = [
    ({"a": (2, 5, 3, 2)}, 'type: "Softmax" bottom: "a" top: "y"'),
    ({"a": (4, 7)}, 'type: "Softmax" bottom: "a" top: "y"'),
    ({"a": (2, 3, 5)}, 'type: "Softmax" softmax_param { axis: -1 } bottom: "a" top: "y"'),
    ({"a": (3, 2, 4)}, 'type: "Softmax" softmax_param { axis: 0 } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "BatchNorm" bottom: "a" top: "y"'),
    ({"a": (5, 3)}, 'type: "BatchNorm" batch_norm_param { eps: 0.001 } bottom: "a" top: "y"'),
    ({"a": (3, 4, 2, 3)}, 'type: "BatchNorm" batch_norm_param { use_global_stats: false } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "Scale" bottom: "a" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "Scale" scale_param { bias_term: true } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4)}, 'type: "Scale" scale_param { axis: 0 num_axes: -1 bias_term: true } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4)}, 'type: "Scale" scale_param { num_axes: 0 } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4)}, 'type: "Scale" scale_param { axis: -1 } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4, 2), "s": (3, 4)}, 'type: "Scale" bottom: "a" bottom: "s" top: "y"'),
    ({"a": (2, 3, 4), "s": (2,)}, 'type: "Scale" scale_param { axis: 0 bias_term: true } '
                                  'bottom: "a" bottom: "s" top: "y"'),
    ({"a": (2, 3, 4), "s": (2, 3, 4)}, 'type: "Scale" scale_param { axis: 0 } bottom: "a" bottom: "s" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "Bias" bottom: "a" top: "y"'),
    ({"a": (2, 3, 4)}, 'type: "Bias" bias_param { axis: 0 num_axes: 2 } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4)}, 'type: "Bias" bias_param { num_axes: 0 } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4), "b": (3, 4)}, 'type: "Bias" bottom: "a" bottom: "b" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "MVN" bottom: "a" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "MVN" mvn_param { across_channels: true } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "MVN" mvn_param { normalize_variance: false } bottom: "a" top: "y"'),
    ({"a": (3, 6)}, 'type: "MVN" mvn_param { eps: 0.001 } bottom: "a" top: "y"'),
]


@pytest.mark.parametrize("shapes,spec", CAFFE_CASES)
def test_against_caffe(tmp_path, shapes, spec):
    check_against_caffe(tmp_path, net(shapes, f'layer {{ name: "l" {spec} }}\n'))


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 5)])
def test_against_caffe_batchnorm_train_updates_statistics(tmp_path, shape):
    text = net({"a": shape}, 'layer { name: "bn" type: "BatchNorm" '
                             'batch_norm_param { moving_average_fraction: 0.8 } bottom: "a" top: "y" }\n')
    nets = check_against_caffe(tmp_path, text, phase="TRAIN")
    for ours, ref in zip(nets["ours"].params["bn"], nets["caffe"].params["bn"]):
        np.testing.assert_allclose(ours.data, ref.data, rtol=1e-5, atol=1e-6)


def test_against_caffe_resnet_block(tmp_path):
    """BatchNorm + Scale(bias) in place, then ReLU in place, as in ResNet; global and batch stats."""
    layers = """
layer { name: "p" type: "Power" power_param { scale: 1.0 } bottom: "a" top: "c" }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }
layer { name: "sc" type: "Scale" scale_param { bias_term: true } bottom: "c" top: "c" }
layer { name: "r" type: "ReLU" bottom: "c" top: "c" }
layer { name: "out" type: "Power" power_param { scale: 2 } bottom: "c" top: "y" }
"""
    check_against_caffe(tmp_path, net({"a": (2, 4, 3, 3)}, layers))
    check_against_caffe(tmp_path, net({"a": (2, 4, 3, 3)}, layers), phase="TRAIN")


@pytest.mark.parametrize("text,shapes,phase", [
    ('name: "s" type: "Softmax"', [(2, 3, 2)], TEST),
    ('name: "bn" type: "BatchNorm"', [(3, 2, 2)], TRAIN),
    ('name: "bn" type: "BatchNorm"', [(3, 2, 2)], TEST),
    ('name: "s" type: "Scale" scale_param { bias_term: true }', [(2, 3, 2)], TEST),
    ('name: "s" type: "Scale"', [(2, 3, 2), (3,)], TEST),
    ('name: "b" type: "Bias"', [(2, 3, 2)], TEST),
    ('name: "b" type: "Bias"', [(2, 3, 2), (3, 2)], TEST),
    ('name: "m" type: "MVN"', [(2, 3, 2, 2)], TEST),
    ('name: "m" type: "MVN" mvn_param { normalize_variance: false }', [(2, 3, 2, 2)], TEST),
])
def test_backward_adds_into_diffs(text, shapes, phase):
    """Backward must add (+=) into bottom and parameter diffs, never overwrite them."""
    xs = [rand(s, 40 + i) for i, s in enumerate(shapes)]
    layer, bottom, top = make_layer(text, xs, phase)
    if layer.type == "BatchNorm":
        layer.blobs[1].data[...] = 1
        layer.blobs[2].data[...] = 1
    for b in layer.blobs:
        if layer.type != "BatchNorm":
            b.data[...] = rand(b.shape, 50)
    layer.forward(bottom, top)
    top[0].diff[...] = rand(top[0].shape, 51)
    layer.backward(top, [True] * len(bottom), bottom)
    first = [b.diff.copy() for b in bottom + layer.blobs]
    for b in bottom + layer.blobs:
        b.diff[...] = 0.5
    layer.forward(bottom, top)
    layer.backward(top, [True] * len(bottom), bottom)
    for b, d in zip(bottom + layer.blobs, first):
        # BatchNorm writes no parameter diffs
        want = np.full(b.shape, 0.5, F) if layer.type == "BatchNorm" and b in layer.blobs else d + 0.5
        np.testing.assert_allclose(b.diff, want, rtol=1e-5, atol=1e-6)


def test_batchnorm_on_a_scalar_is_an_error_naming_the_layer():
    """Found by the prototxt fuzzer: a BatchNorm fed a loss's scalar top was an IndexError."""
    with pytest.raises(LayerSetupError, match="scalar"):
        make_layer('name: "bn" type: "BatchNorm"', [np.zeros((), np.float32)])
