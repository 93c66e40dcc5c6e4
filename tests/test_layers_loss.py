"""Tests of the loss and evaluation layers (caffe_utils/layers/loss.py): loop oracles
transcribing Caffe's C++, finite-difference gradient checks, normalisation modes, ignore_label,
label axes, Accuracy's tie order, and comparisons with real pycaffe (skipped when pycaffe is not
importable)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from caffe_utils.errors import DataError
from caffe_utils.layers.base import LayerSetupError
from gradcheck import check_gradients, make_layer, rand
from reference import check_against_caffe

TEST = 1
F = np.float32
FLT_MIN = float(np.finfo(np.float32).tiny)






def labels(shape, classes, seed=0, ignore=None, frac=0.3):
    rng = np.random.RandomState(seed)
    lab = rng.randint(0, classes, shape).astype(F)
    if ignore is not None:
        lab[rng.uniform(size=shape) < frac] = ignore
    return lab


def normalizer(mode, outer, inner, valid):
    n = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, float(n))


def run(layer, bottom, top, weight=1.0):
    layer.forward(bottom, top)
    top[0].diff[...] = weight
    pd = [layer.can_propagate(i) for i in range(len(bottom))]
    layer.backward(top, pd, bottom)


# ----------------------------------------------------------------------------- SoftmaxWithLoss
def softmax_loss_oracle(x, lab, axis, ignore, mode, weight):
    outer, c, inner = int(np.prod(x.shape[:axis])), x.shape[axis], int(np.prod(x.shape[axis + 1:]))
    x3 = x.reshape(outer, c, inner).astype(np.float64)
    l2 = lab.reshape(outer, inner)
    prob = np.zeros_like(x3)
    for i in range(outer):
        for j in range(inner):
            m = x3[i, :, j].max()
            e = np.exp(x3[i, :, j] - m)
            prob[i, :, j] = e / e.sum()
    loss, cnt = 0.0, 0
    diff = prob.copy()
    for i in range(outer):
        for j in range(inner):
            v = int(l2[i, j])
            if ignore is not None and v == ignore:
                diff[i, :, j] = 0
                continue
            loss -= math.log(max(prob[i, v, j], FLT_MIN))
            diff[i, v, j] -= 1
            cnt += 1
    norm = normalizer(mode, outer, inner, cnt)
    return loss / norm, diff.reshape(x.shape) * weight / norm, prob.reshape(x.shape)


@pytest.mark.parametrize("spec,axis,ignore,mode,shape", [
    ("", 1, None, "VALID", (4, 5)),
    ("loss_param { ignore_label: 2 }", 1, 2, "VALID", (3, 4, 2, 3)),
    ("loss_param { ignore_label: 0 normalization: FULL }", 1, 0, "FULL", (2, 3, 4)),
    ("loss_param { normalization: BATCH_SIZE }", 1, None, "BATCH_SIZE", (2, 3, 2, 2)),
    ("loss_param { normalization: NONE ignore_label: 1 }", 1, 1, "NONE", (3, 4, 3)),
    ("loss_param { normalize: false }", 1, None, "BATCH_SIZE", (2, 3, 4)),
    ("loss_param { normalize: true ignore_label: 3 }", 1, 3, "VALID", (2, 4, 3)),
    ("softmax_param { axis: 2 }", 2, None, "VALID", (2, 3, 4)),
    ("softmax_param { axis: -1 } loss_param { ignore_label: -1 }", 2, -1, "VALID", (2, 2, 5)),
])
def test_softmax_loss_matches_loop(spec, axis, ignore, mode, shape):
    x = rand(shape, 1) * 3
    lshape = shape[:axis] + shape[axis + 1:]
    lab = labels(lshape, shape[axis], 2, ignore)
    layer, bottom, top = make_layer(f'name: "l" type: "SoftmaxWithLoss" {spec}', [x, lab], ntop=2)
    assert top[0].shape == () and top[1].shape == shape
    run(layer, bottom, top, weight=0.7)
    loss, dx, prob = softmax_loss_oracle(x, lab, axis, ignore, mode, float(F(0.7)))
    assert float(top[0].data) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(top[1].data, prob, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bottom[0].diff, dx, rtol=1e-5, atol=1e-7)
    assert not bottom[1].diff.any()
    assert layer.loss_weight_default(0) == 1 and layer.loss_weight_default(1) == 0
    assert layer.can_propagate(0) and not layer.can_propagate(1)
    assert check_gradients(layer, bottom, top[:1], check_bottom=[0]) > 0


def test_softmax_loss_label_errors():
    x = rand((2, 3))
    with pytest.raises(LayerSetupError, match="number of labels"):
        make_layer('name: "l" type: "SoftmaxWithLoss"', [x, np.zeros((2, 2), F)])
    with pytest.raises(LayerSetupError, match="first dimension"):
        make_layer('name: "l" type: "SoftmaxWithLoss"', [x, np.zeros((3,), F)])
    layer, bottom, top = make_layer('name: "l" type: "SoftmaxWithLoss"', [x, np.array([0, 3], F)])
    with pytest.raises(DataError, match="label value 3"):
        layer.forward(bottom, top)
    # labels are truncated like static_cast<int>
    layer, bottom, top = make_layer('name: "l" type: "SoftmaxWithLoss"', [x, np.array([0.9, 2.7], F)])
    layer.forward(bottom, top)
    y, _, _ = softmax_loss_oracle(x, np.array([0, 2]), 1, None, "VALID", 1.0)
    assert float(top[0].data) == pytest.approx(y, rel=1e-5)


# ----------------------------------------------------------------------------- SigmoidCrossEntropyLoss
def sce_oracle(x, t, ignore, mode, weight):
    n = x.shape[0]
    xf, tf = x.reshape(-1).astype(np.float64), t.reshape(-1).astype(np.float64)
    loss, cnt = 0.0, 0
    diff = np.zeros_like(xf)
    for i in range(xf.size):
        if ignore is not None and int(tf[i]) == ignore:
            continue
        v = xf[i]
        loss -= v * (tf[i] - (v >= 0)) - math.log(1 + math.exp(v - 2 * v * (v >= 0)))
        diff[i] = 1 / (1 + math.exp(-v)) - tf[i]
        cnt += 1
    norm = normalizer(mode, n, xf.size // n, cnt)
    return loss / norm, (diff * weight / norm).reshape(x.shape)


@pytest.mark.parametrize("spec,ignore,mode", [
    ("", None, "BATCH_SIZE"),
    ("loss_param { normalization: VALID ignore_label: -1 }", -1, "VALID"),
    ("loss_param { normalization: FULL }", None, "FULL"),
    ("loss_param { normalize: true }", None, "VALID"),
    ("loss_param { ignore_label: 1 normalization: NONE }", 1, "NONE"),
])
def test_sigmoid_cross_entropy_matches_loop(spec, ignore, mode):
    x = rand((3, 4, 2), 3) * 4
    x.reshape(-1)[:3] = [40, -40, 0]
    t = np.random.RandomState(4).uniform(size=x.shape).astype(F)
    if ignore is not None:
        t.reshape(-1)[::5] = ignore
    layer, bottom, top = make_layer(f'name: "l" type: "SigmoidCrossEntropyLoss" {spec}', [x, t])
    run(layer, bottom, top, weight=1.5)
    loss, dx = sce_oracle(x, t, ignore, mode, 1.5)
    assert float(top[0].data) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(bottom[0].diff, dx, rtol=1e-5, atol=1e-7)
    assert not layer.can_propagate(1)
    assert check_gradients(layer, bottom, top, check_bottom=[0]) > 0


# ----------------------------------------------------------------------------- EuclideanLoss
def test_euclidean_loss_matches_formula():
    a, b = rand((4, 3, 2), 5), rand((4, 6), 6)
    layer, bottom, top = make_layer('name: "l" type: "EuclideanLoss"', [a, b])
    run(layer, bottom, top, weight=2.0)
    d = a.reshape(4, -1).astype(np.float64) - b
    assert float(top[0].data) == pytest.approx((d ** 2).sum() / 4 / 2, rel=1e-6)
    np.testing.assert_allclose(bottom[0].diff, (2.0 * d / 4).reshape(a.shape), rtol=1e-6)
    np.testing.assert_allclose(bottom[1].diff, -2.0 * d / 4, rtol=1e-6)
    assert layer.can_propagate(1)
    assert check_gradients(layer, bottom, top) == a.size + b.size
    with pytest.raises(LayerSetupError, match="same dimension"):
        make_layer('name: "l" type: "EuclideanLoss"', [a, rand((4, 5))])


# ----------------------------------------------------------------------------- Accuracy
def accuracy_oracle(x, lab, axis, top_k, ignore):
    """AccuracyLayer::Forward_cpu with std::partial_sort over (value, index) pairs, std::greater."""
    outer, c, inner = int(np.prod(x.shape[:axis])), x.shape[axis], int(np.prod(x.shape[axis + 1:]))
    x3 = x.reshape(outer, c, inner)
    l2 = lab.reshape(outer, inner)
    acc, cnt = 0, 0
    hits, nums = np.zeros(c), np.zeros(c)
    for i in range(outer):
        for j in range(inner):
            v = int(l2[i, j])
            if ignore is not None and v == ignore:
                continue
            nums[v] += 1
            pairs = sorted(((float(x3[i, k, j]), k) for k in range(c)), reverse=True)
            if any(k == v for _, k in pairs[:top_k]):
                acc += 1
                hits[v] += 1
            cnt += 1
    per_class = np.where(nums == 0, 0, hits / np.maximum(nums, 1))
    return acc / cnt, per_class


@pytest.mark.parametrize("spec,axis,top_k,ignore,shape", [
    ("", 1, 1, None, (20, 5)),
    ("accuracy_param { top_k: 3 }", 1, 3, None, (12, 6)),
    ("accuracy_param { ignore_label: 1 }", 1, 1, 1, (10, 4, 3)),
    ("accuracy_param { axis: 2 top_k: 2 }", 2, 2, None, (3, 4, 5)),
    ("accuracy_param { axis: -1 ignore_label: 0 top_k: 2 }", 2, 2, 0, (4, 3, 4)),
])
def test_accuracy_matches_loop(spec, axis, top_k, ignore, shape):
    x = np.round(rand(shape, 7))  # many ties: Caffe ranks a tied larger class index first
    lab = labels(shape[:axis] + shape[axis + 1:], shape[axis], 8, ignore)
    layer, bottom, top = make_layer(f'name: "a" type: "Accuracy" {spec}', [x, lab], ntop=2)
    layer.forward(bottom, top)
    acc, per_class = accuracy_oracle(x, lab, axis, top_k, ignore)
    assert float(top[0].data) == pytest.approx(acc, rel=1e-6)
    np.testing.assert_allclose(top[1].data, per_class, rtol=1e-6)
    assert not layer.can_propagate(0) and not layer.can_propagate(1)
    assert layer.loss_weight_default(0) == 0


def test_accuracy_tie_order():
    x = np.array([[1.0, 1.0, 0.0]], F)
    for lab, want in ((0, 0.0), (1, 1.0)):
        layer, bottom, top = make_layer('name: "a" type: "Accuracy"', [x, np.array([lab], F)])
        layer.forward(bottom, top)
        assert float(top[0].data) == want
    with pytest.raises(LayerSetupError, match="top_k"):
        make_layer('name: "a" type: "Accuracy" accuracy_param { top_k: 4 }', [x, np.array([0], F)])


# ----------------------------------------------------------------------------- against pycaffe
def net(shapes, layers: str) -> str:
    tops = " ".join(f'top: "{n}"' for n in shapes)
    dims = " ".join("shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes.values())
    return f'layer {{ name: "in" type: "Input" {tops} input_param {{ {dims} }} }}\n' + layers


@pytest.mark.parametrize("spec,shape,axis,ignore", [
    ("", (4, 5), 1, None),
    ("loss_weight: 0.5 loss_param { ignore_label: 2 }", (3, 4, 2, 3), 1, 2),
    ("loss_param { normalization: FULL ignore_label: 0 }", (2, 3, 4), 1, 0),
    ("loss_param { normalization: BATCH_SIZE }", (2, 3, 2, 2), 1, None),
    ("loss_param { normalization: NONE }", (3, 4), 1, None),
    ("loss_param { normalize: false }", (2, 3, 4), 1, None),
    ("softmax_param { axis: 2 }", (2, 3, 4), 2, None),
    ("softmax_param { axis: -1 } loss_param { ignore_label: 1 }", (2, 2, 5), 2, 1),
])
def test_softmax_loss_against_caffe(tmp_path, spec, shape, axis, ignore):
    lshape = shape[:axis] + shape[axis + 1:]
    x = rand(shape, 9) * 2
    lab = labels(lshape, shape[axis], 10, ignore)
    text = net({"x": shape, "label": lshape},
               f'layer {{ name: "p" type: "Power" bottom: "x" top: "h" }}\n'
               f'layer {{ name: "l" type: "SoftmaxWithLoss" {spec} bottom: "h" bottom: "label" top: "loss" }}\n')
    check_against_caffe(tmp_path, text, {"x": x, "label": lab})


@pytest.mark.parametrize("spec", ["", "loss_weight: 3"])
def test_sigmoid_cross_entropy_against_caffe(tmp_path, spec):
    x = rand((3, 4, 2), 13) * 3
    t = np.random.RandomState(14).uniform(size=x.shape).astype(F)
    text = net({"x": x.shape, "t": x.shape},
               f'layer {{ name: "l" type: "SigmoidCrossEntropyLoss" {spec} bottom: "x" bottom: "t" top: "loss" }}\n')
    check_against_caffe(tmp_path, text, {"x": x, "t": t})


@pytest.mark.parametrize("shapes", [{"a": (4, 3, 2), "b": (4, 3, 2)}, {"a": (3, 6), "b": (3, 2, 3)}])
def test_euclidean_against_caffe(tmp_path, shapes):
    text = net(shapes, 'layer { name: "l" type: "EuclideanLoss" loss_weight: 0.3 bottom: "a" bottom: "b" '
                       'top: "loss" }\n')
    check_against_caffe(tmp_path, text)


@pytest.mark.parametrize("spec,shape,axis", [
    ("", (20, 5), 1),
    ("accuracy_param { top_k: 3 }", (12, 6), 1),
    ("accuracy_param { ignore_label: 1 top_k: 2 }", (10, 4, 3), 1),
    ("accuracy_param { axis: 2 }", (3, 4, 5), 2),
])
def test_accuracy_against_caffe(tmp_path, spec, shape, axis):
    x = np.round(rand(shape, 15))
    lshape = shape[:axis] + shape[axis + 1:]
    lab = labels(lshape, shape[axis], 16)
    text = net({"x": shape, "label": lshape},
               f'layer {{ name: "a" type: "Accuracy" {spec} bottom: "x" bottom: "label" top: "acc" top: "per" }}\n')
    check_against_caffe(tmp_path, text, {"x": x, "label": lab}, backward=False)


@pytest.mark.parametrize("text,arrays", [
    ('name: "l" type: "SoftmaxWithLoss" loss_param { ignore_label: 1 }',
     [rand((4, 3), 60), np.array([0, 1, 2, 1], F)]),
    ('name: "l" type: "SigmoidCrossEntropyLoss"', [rand((4, 3), 61), np.ones((4, 3), F)]),
    ('name: "l" type: "EuclideanLoss"', [rand((4, 3), 62), rand((4, 3), 63)]),
])
def test_backward_adds_into_diffs(text, arrays):
    """Backward must add (+=) into bottom diffs, never overwrite them."""
    layer, bottom, top = make_layer(text, arrays)
    run(layer, bottom, top, weight=1.0)
    first = [b.diff.copy() for b in bottom]
    for b in bottom:
        b.diff[...] = 0.5
    run(layer, bottom, top, weight=1.0)
    for b, d in zip(bottom, first):
        np.testing.assert_allclose(b.diff, d + 0.5, rtol=1e-6, atol=1e-7)
