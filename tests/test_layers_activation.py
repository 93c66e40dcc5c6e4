"""Tests of the element-wise layers (caffe_utils/layers/activation.py): a per-element loop
transcribing Caffe's C++ as oracle, finite-difference gradient checks, in-place behaviour, and
comparisons with real pycaffe (skipped when pycaffe is not importable)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from caffe_utils.layers.base import LayerSetupError
from caffe_utils.schema import caffe_pb2
from gradcheck import check_gradients, make_layer
from reference import check_against_caffe

TRAIN, TEST = 0, 1
F = np.float32




def run(text, x, phase=TEST, dy=None, params=None):
    """Forward and backward on copies; returns (top data, bottom diff, layer)."""
    layer, bottom, top = make_layer(text, [x], phase)
    for blob, val in zip(layer.blobs, params or []):
        blob.data[...] = val
    layer.forward(bottom, top)
    y = top[0].data.copy()
    if dy is not None:
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
    return y, bottom[0].diff.copy(), layer


def rand(shape, seed=0, lo=None, hi=None):
    rng = np.random.RandomState(seed)
    if lo is not None:
        return rng.uniform(lo, hi, shape).astype(F)
    return rng.standard_normal(shape).astype(F)


def away_from(x, points, margin=0.05):
    """Push elements within ``margin`` of any kink point away from it (for gradient checks)."""
    x = x.copy()
    for p in points:
        near = np.abs(x - p) < margin
        x[near] = p + np.where(x[near] >= p, margin, -margin) * 2
    return x


# ----------------------------------------------------------------------------- naive oracles
def loop(fn, *arrays):
    out = np.empty(arrays[0].shape, np.float64)
    flat = [a.reshape(-1) for a in arrays]
    o = out.reshape(-1)
    for i in range(o.size):
        o[i] = fn(*[float(f[i]) for f in flat])
    return out


@pytest.mark.parametrize("slope", [0.0, 0.1, -0.3])
def test_relu_matches_loop(slope):
    x = rand((2, 3, 4, 5))
    dy = rand(x.shape, 1)
    y, dx, _ = run(f'name: "r" type: "ReLU" relu_param {{ negative_slope: {slope} }}', x, dy=dy)
    s = float(F(slope))
    np.testing.assert_allclose(y, loop(lambda v: max(v, 0) + s * min(v, 0), x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, loop(lambda v, d: d * ((v > 0) + s * (v <= 0)), x, dy), rtol=1e-6, atol=1e-7)


def test_relu_backward_adds_into_diff():
    x = rand((3, 4))
    layer, bottom, top = make_layer('name: "r" type: "ReLU"', [x])
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    bottom[0].diff[...] = 5
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 5 + (x > 0))
    bottom[0].diff[...] = 7
    layer.backward(top, [False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 7)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_matches_loop(shared):
    x = rand((2, 3, 4, 2))
    dy = rand(x.shape, 1)
    slopes = np.array([0.25], F) if shared else np.array([0.1, -0.2, 0.7], F)
    text = f'name: "p" type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}'
    layer, bottom, top = make_layer(text, [x])
    assert layer.blobs[0].shape == (() if shared else (3,))
    layer.blobs[0].data[...] = slopes.reshape(layer.blobs[0].shape)
    layer.blobs[0].diff[...] = 0.5  # parameter diffs accumulate
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    dim = 4 * 2
    want_y = np.empty(x.size)
    want_dx = np.empty(x.size)
    want_ds = np.zeros(slopes.size)
    xf, dyf = x.reshape(-1), dy.reshape(-1)
    for i in range(x.size):
        c = 0 if shared else (i // dim) % 3
        v = float(xf[i])
        want_y[i] = max(v, 0) + slopes[c] * min(v, 0)
        want_ds[c] += dyf[i] * v * (v <= 0)
        want_dx[i] = dyf[i] * ((v > 0) + slopes[c] * (v <= 0))
    np.testing.assert_allclose(top[0].data.reshape(-1), want_y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bottom[0].diff.reshape(-1), want_dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.blobs[0].diff.reshape(-1), want_ds + 0.5, rtol=1e-5, atol=1e-6)


def test_prelu_in_place_uses_saved_input():
    x = rand((2, 3, 5))
    dy = rand(x.shape, 1)
    ref_y, ref_dx, ref = run('name: "p" type: "PReLU"', x, dy=dy, params=[np.array([0.2, -0.5, 0.3], F)])
    layer, bottom, top = make_layer('name: "p" type: "PReLU"', [x], in_place=True)
    layer.blobs[0].data[...] = [0.2, -0.5, 0.3]
    layer.forward(bottom, top)
    np.testing.assert_array_equal(bottom[0].data, ref_y)

    class View:  # what the net hands an in-place layer's backward: shared data, own diff
        def __init__(self, b):
            self.data, self.diff = b.data, dy.copy()
    bottom[0].diff[...] = 0
    layer.backward([View(bottom[0])], [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, ref_dx, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].diff, ref.blobs[0].diff, rtol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_elu_matches_loop(alpha):
    x = rand((3, 7), 2) * 2
    x[0, 0] = 0  # Caffe: x <= 0 takes the negative branch
    dy = rand(x.shape, 3)
    y, dx, _ = run(f'name: "e" type: "ELU" elu_param {{ alpha: {alpha} }}', x, dy=dy)
    want = loop(lambda v: max(v, 0) + alpha * (math.exp(min(v, 0)) - 1), x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, loop(lambda v, t, d: d * ((v > 0) + (alpha + t) * (v <= 0)), x, want, dy),
                               rtol=1e-5, atol=1e-6)


def test_sigmoid_tanh_match_loop():
    x = rand((4, 9), 4) * 4
    x[0, :3] = [-100, 100, 0]
    dy = rand(x.shape, 5)
    y, dx, _ = run('name: "s" type: "Sigmoid"', x, dy=dy)
    s = loop(lambda v: 1 / (1 + math.exp(-v)), x)
    np.testing.assert_allclose(y, s, rtol=1e-6, atol=1e-7)
    # float32 sigmoid (tanh) is good to a few ulps, ~eps absolute near 1, and 1 - y (1 - y*y)
    # keeps that absolute error where it is tiny, so the bound there is a few eps times |dy|
    np.testing.assert_allclose(dx, dy * s * (1 - s), rtol=1e-5, atol=4 * np.finfo(F).eps * np.abs(dy).max())
    y, dx, _ = run('name: "t" type: "TanH"', x, dy=dy)
    t = loop(math.tanh, x)
    np.testing.assert_allclose(y, t, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, dy * (1 - t * t), rtol=1e-5, atol=4 * np.finfo(F).eps * np.abs(dy).max())


def test_absval_matches_loop_and_refuses_in_place():
    x = rand((5, 6), 6)
    x[0, 0] = 0
    dy = rand(x.shape, 7)
    y, dx, _ = run('name: "a" type: "AbsVal"', x, dy=dy)
    np.testing.assert_array_equal(y, np.abs(x))
    np.testing.assert_array_equal(dx, loop(lambda v, d: d * ((v > 0) - (v < 0)), x, dy))
    with pytest.raises(LayerSetupError, match="in-place"):
        make_layer('name: "a" type: "AbsVal"', [x], in_place=True)


def power_oracle(x, dy, power, scale, shift):
    """Caffe's PowerLayer, transcribed element by element."""
    ds = power * scale
    y = np.empty(x.size)
    dx = np.empty(x.size)
    for i, (v, d) in enumerate(zip(x.reshape(-1).astype(float), dy.reshape(-1).astype(float))):
        if ds == 0:
            y[i] = 1.0 if power == 0 else shift ** power
        else:
            y[i] = (shift + scale * v) ** power if (shift + scale * v) > 0 or float(power).is_integer() else math.nan
        if ds == 0:
            g = 0.0
        elif power == 1:
            g = ds
        elif power == 2:
            g = ds * scale * v + ds * shift
        elif shift == 0:
            g = y[i] / v * power
        else:
            g = y[i] / (scale * v + shift) * ds
        dx[i] = g * d if ds != 0 else 0.0
    return y.reshape(x.shape), dx.reshape(x.shape)


@pytest.mark.parametrize("power,scale,shift", [(1, 1, 0), (2, 0.5, 0.3), (3, 1.5, 0), (0.5, 2, 4.0),
                                               (2, 0, 1.5), (0, 3, 2), (-1.5, 0.7, 3.0), (1, -2, 1)])
def test_power_matches_loop(power, scale, shift):
    x = rand((3, 4, 5), 8, 0.2, 1.5)
    dy = rand(x.shape, 9)
    text = f'name: "p" type: "Power" power_param {{ power: {power} scale: {scale} shift: {shift} }}'
    y, dx, _ = run(text, x, dy=dy)
    wy, wdx = power_oracle(x, dy, float(F(power)), float(F(scale)), float(F(shift)))
    np.testing.assert_allclose(y, wy, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(dx, wdx, rtol=2e-4, atol=1e-5)


def test_bnll_matches_loop():
    x = rand((4, 8), 10) * 10
    x[0, :5] = [60, -60, 0, 49.9, 100]  # the gradient clamps the input at 50: no inf/inf
    dy = rand(x.shape, 11)
    y, dx, _ = run('name: "b" type: "BNLL"', x, dy=dy)
    want = loop(lambda v: v + math.log(1 + math.exp(-v)) if v > 0 else math.log(1 + math.exp(v)), x)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)
    e = loop(lambda v: math.exp(min(v, 50.0)), x)
    np.testing.assert_allclose(dx, dy * e / (e + 1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("base,scale,shift", [(-1, 1, 0), (2, 0.5, 1), (-1, -0.7, 0.3), (10, 2, -0.5)])
def test_exp_log_match_formula(base, scale, shift):
    x = rand((3, 6), 12, 0.5, 2.0)
    dy = rand(x.shape, 13)
    ln_b = 1.0 if base == -1 else math.log(base)
    text = f'name: "e" type: "Exp" exp_param {{ base: {base} scale: {scale} shift: {shift} }}'
    y, dx, _ = run(text, x, dy=dy)
    want = loop(lambda v: math.exp(ln_b * (shift + scale * v)), x)
    np.testing.assert_allclose(y, want, rtol=2e-5)
    np.testing.assert_allclose(dx, dy * want * ln_b * scale, rtol=2e-4, atol=1e-6)
    text = f'name: "l" type: "Log" log_param {{ base: {base} scale: {scale} shift: {shift} }}'
    xl = x if scale > 0 else -x
    y, dx, _ = run(text, xl, dy=dy)
    want = loop(lambda v: math.log(shift + scale * v) / ln_b, xl)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, loop(lambda v, d: d * scale / ln_b / (shift + scale * v), xl, dy),
                               rtol=1e-4, atol=1e-6)


def test_exp_log_reject_bad_base():
    with pytest.raises(LayerSetupError, match="base"):
        make_layer('name: "e" type: "Exp" exp_param { base: -2 }', [rand((2, 2))])
    with pytest.raises(LayerSetupError, match="base"):
        make_layer('name: "l" type: "Log" log_param { base: 1 }', [rand((2, 2))])


def test_threshold_forward_only():
    x = rand((4, 5), 14)
    x[0, 0] = 0.2
    y, _, layer = run('name: "t" type: "Threshold" threshold_param { threshold: 0.2 }', x)
    np.testing.assert_array_equal(y, (x > F(0.2)).astype(F))
    assert y[0, 0] == 0
    assert not layer.can_propagate(0)
    layer2, bottom, top = make_layer('name: "t" type: "Threshold"', [x])
    with pytest.raises(NotImplementedError):
        layer2.backward(top, [True], bottom)


def test_clip_if_schema_has_it():
    if "clip_param" not in caffe_pb2().LayerParameter.DESCRIPTOR.fields_by_name:
        pytest.skip("this Caffe schema has no clip_param")
    x = rand((4, 6), 15) * 2
    dy = rand(x.shape, 16)
    y, dx, _ = run('name: "c" type: "Clip" clip_param { min: -0.5 max: 1 }', x, dy=dy)
    np.testing.assert_array_equal(y, loop(lambda v: max(-0.5, min(v, 1.0)), x))
    np.testing.assert_array_equal(dx, loop(lambda v, d: d * (-0.5 <= v <= 1.0), x, dy))


def test_clip_under_builtin_schema():
    """When the schema in use (e.g. pycaffe's) lacks clip_param, run the Clip tests in a process that
    uses the project's built-in schema, so Clip is always covered."""
    if "clip_param" in caffe_pb2().LayerParameter.DESCRIPTOR.fields_by_name:
        pytest.skip("Clip is tested directly in this process")
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MAGIC_INIT_SCHEMA="builtin")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "clip and not builtin",
                          str(Path(__file__).resolve())], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "2 passed" in res.stdout, res.stdout[-3000:]


# ----------------------------------------------------------------------------- Dropout
def test_dropout_train_statistics_and_scaling():
    x = np.ones((200, 50), F)
    layer, bottom, top = make_layer('name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [x], TRAIN)
    layer.seed = 123
    layer.forward(bottom, top)
    y = top[0].data
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / F(0.7), rtol=1e-7)
    assert abs(kept.mean() - 0.7) < 0.01
    top[0].diff[...] = 2
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, np.where(kept, 2 * F(1 / F(0.7)), 0).astype(F))
    # same seed -> same mask; another forward -> a new mask
    first = kept.copy()
    layer.seed = 123
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data != 0, first)
    layer.forward(bottom, top)
    assert (top[0].data != 0).mean() != 1 and not np.array_equal(top[0].data != 0, first)


def test_dropout_test_phase_identity_and_ratio_check():
    x = rand((3, 5), 17)
    y, dx, _ = run('name: "d" type: "Dropout"', x, TEST, dy=x * 2)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, x * 2)
    with pytest.raises(LayerSetupError, match="dropout_ratio"):
        make_layer('name: "d" type: "Dropout" dropout_param { dropout_ratio: 1.0 }', [x])


# ----------------------------------------------------------------------------- gradient checks
GRAD_CASES = [
    ('name: "r" type: "ReLU"', [0.0]),
    ('name: "r" type: "ReLU" relu_param { negative_slope: 0.2 }', [0.0]),
    ('name: "p" type: "PReLU"', [0.0]),
    ('name: "p" type: "PReLU" prelu_param { channel_shared: true }', [0.0]),
    ('name: "e" type: "ELU" elu_param { alpha: 0.5 }', [0.0]),
    ('name: "s" type: "Sigmoid"', []),
    ('name: "t" type: "TanH"', []),
    ('name: "a" type: "AbsVal"', [0.0]),
    ('name: "b" type: "BNLL"', []),
    ('name: "p" type: "Power" power_param { power: 2 scale: 0.5 shift: 0.2 }', []),
    ('name: "p" type: "Power" power_param { power: 1 scale: -1.5 shift: 0.2 }', []),
    ('name: "e" type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.1 }', []),
    ('name: "d" type: "Dropout"', []),
]


@pytest.mark.parametrize("text,kinks", GRAD_CASES)
def test_gradients(text, kinks):
    rng = np.random.RandomState(3)
    x = away_from(rng.standard_normal((2, 3, 3, 2)).astype(F), kinks)
    layer, bottom, top = make_layer(text, [x])
    for b in layer.blobs:
        b.data[...] = rng.uniform(-0.5, 0.5, b.shape)
    n = check_gradients(layer, bottom, top, kink=0.0 if kinks else None, kink_range=0.02 if kinks else -1.0)
    assert n >= x.size


def test_gradients_positive_domain():
    x = rand((2, 3, 4), 18, 0.5, 2.0)
    for text in ['name: "p" type: "Power" power_param { power: 0.5 scale: 2 shift: 1 }',
                 'name: "p" type: "Power" power_param { power: -2 }',
                 'name: "l" type: "Log" log_param { base: 3 scale: 2 shift: 0.5 }']:
        layer, bottom, top = make_layer(text, [x])
        assert check_gradients(layer, bottom, top, step=1e-3) == x.size


def test_gradients_dropout_train():
    x = rand((4, 5), 19)
    layer, bottom, top = make_layer('name: "d" type: "Dropout"', [x], TRAIN)

    # finite differences need a fixed mask: reseed before every forward
    orig = layer.forward

    def fixed_forward(b, t):
        layer.seed = 7
        orig(b, t)
    layer.forward = fixed_forward
    assert check_gradients(layer, bottom, top) == x.size


def test_gradients_clip():
    if "clip_param" not in caffe_pb2().LayerParameter.DESCRIPTOR.fields_by_name:
        pytest.skip("this Caffe schema has no clip_param")
    x = away_from(rand((3, 8), 20) * 2, [-0.5, 1.0])
    layer, bottom, top = make_layer('name: "c" type: "Clip" clip_param { min: -0.5 max: 1 }', [x])
    assert check_gradients(layer, bottom, top) == x.size


# ----------------------------------------------------------------------------- against pycaffe
def net(shape, layers: str, name: str = "x") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "in" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n' + layers


CAFFE_CASES = [
    ('type: "ReLU"', (2, 3, 4, 5)),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', (3, 7)),
    ('type: "PReLU"', (2, 3, 5, 4)),
    ('type: "PReLU" prelu_param { channel_shared: true }', (2, 5, 3)),
    ('type: "PReLU"', (3, 4)),
    ('type: "ELU" elu_param { alpha: 0.7 }', (2, 3, 5)),
    ('type: "Sigmoid"', (2, 3, 4, 5)),
    ('type: "TanH"', (5, 7)),
    ('type: "AbsVal"', (2, 3, 5)),
    ('type: "BNLL"', (4, 3, 5)),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 0.3 }', (3, 5, 2)),
    ('type: "Power" power_param { power: 1 scale: -2 shift: 1 }', (3, 5)),
    ('type: "Power" power_param { power: 3 }', (3, 5)),
    ('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', (3, 5)),
    ('type: "Exp"', (3, 4, 5)),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', (3, 5)),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', (2, 3, 4)),
]


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("spec,shape", CAFFE_CASES)
def test_against_caffe(tmp_path, spec, shape, in_place):
    if in_place and "AbsVal" in spec:
        pytest.skip("AbsVal does not allow in-place computation")
    top = "x" if in_place else "y"
    text = net(shape, f'layer {{ name: "l" {spec} bottom: "x" top: "{top}" }}\n')
    if in_place:  # something after, so the in-place blob is not itself an output
        text += 'layer { name: "after" type: "Power" power_param { scale: 1.5 } bottom: "x" top: "z" }\n'
    check_against_caffe(tmp_path, text)


@pytest.mark.parametrize("spec", ['type: "Power" power_param { power: 0.5 scale: 2 shift: 1 }',
                                  'type: "Power" power_param { power: -1.5 scale: 0.5 }',
                                  'type: "Log"',
                                  'type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }'])
@pytest.mark.parametrize("in_place", [False, True])
def test_against_caffe_positive_inputs(tmp_path, spec, in_place):
    x = rand((2, 3, 5), 21, 1.5, 3.0)
    top = "x" if in_place else "y"
    text = net(x.shape, f'layer {{ name: "l" {spec} bottom: "x" top: "{top}" }}\n')
    if in_place:
        text += 'layer { name: "after" type: "Power" power_param { scale: 1.5 } bottom: "x" top: "z" }\n'
    check_against_caffe(tmp_path, text, {"x": x})


def test_against_caffe_threshold_forward(tmp_path):
    x = rand((3, 4, 5), 22)
    x[0, 0, :2] = [0.25, 0.2500001]
    check_against_caffe(tmp_path, net(x.shape, 'layer { name: "l" type: "Threshold" threshold_param '
                                               '{ threshold: 0.25 } bottom: "x" top: "y" }\n'),
                        {"x": x}, backward=False)


def test_against_caffe_activation_chain(tmp_path):
    """Several in-place activations on one blob, plus a branch reading the pre-activation blob."""
    text = net((2, 4, 3, 3), """
layer { name: "p" type: "PReLU" bottom: "x" top: "a" }
layer { name: "s" type: "Sigmoid" bottom: "a" top: "a" }
layer { name: "e" type: "ELU" bottom: "a" top: "a" }
layer { name: "r" type: "ReLU" relu_param { negative_slope: 0.05 } bottom: "a" top: "a" }
layer { name: "t" type: "TanH" bottom: "x" top: "b" }
layer { name: "t2" type: "TanH" bottom: "b" top: "b" }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "c" }
""")
    check_against_caffe(tmp_path, text)


@pytest.mark.parametrize("text", [
    'name: "r" type: "ReLU" relu_param { negative_slope: 0.1 }', 'name: "p" type: "PReLU"',
    'name: "e" type: "ELU"', 'name: "s" type: "Sigmoid"', 'name: "t" type: "TanH"', 'name: "a" type: "AbsVal"',
    'name: "p" type: "Power" power_param { power: 2 shift: 1 }', 'name: "p" type: "Power" power_param { scale: 3 }',
    'name: "b" type: "BNLL"', 'name: "d" type: "Dropout"', 'name: "e" type: "Exp"',
    'name: "l" type: "Log" log_param { shift: 5 }',
])
def test_backward_adds_into_diffs(text):
    """Backward must add (+=) into bottom and parameter diffs, never overwrite them."""
    x = rand((2, 3, 4), 30)
    layer, bottom, top = make_layer(text, [x])
    layer.forward(bottom, top)
    top[0].diff[...] = rand(x.shape, 31)
    layer.backward(top, [True], bottom)
    first = [b.diff.copy() for b in bottom + layer.blobs]
    for b in bottom + layer.blobs:
        b.diff[...] = 0.5
    layer.backward(top, [True], bottom)
    for b, d in zip(bottom + layer.blobs, first):
        np.testing.assert_allclose(b.diff, d + 0.5, rtol=1e-6, atol=1e-6)
