"""Tests of the blob-structure layers (caffe_utils/layers/structure.py): Caffe's flat-index copy
loops transcribed as oracles, finite-difference gradient checks, parameter validation, and
comparisons with real pycaffe (skipped when pycaffe is not importable)."""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_utils.layers import create_layer
from caffe_utils.layers.base import LayerSetupError
from caffe_utils.schema import caffe_pb2
from gradcheck import check_gradients, make_layer, rand
from reference import check_against_caffe

TEST = 1
F = np.float32






def count(shape, a=0, b=None):
    return int(np.prod(shape[a:b], dtype=np.int64))


def fwd_bwd(layer, bottom, top, seed=1):
    layer.forward(bottom, top)
    rng = np.random.RandomState(seed)
    for t in top:
        t.diff[...] = rng.standard_normal(t.shape)
    layer.backward(top, [True] * len(bottom), bottom)


# ----------------------------------------------------------------------------- Concat
def concat_oracle(xs, axis):
    """ConcatLayer::Forward_cpu: copy blocks of bottom_concat_axis * concat_input_size."""
    shape = list(xs[0].shape)
    top_axis = sum(x.shape[axis] for x in xs)
    shape[axis] = top_axis
    out = np.zeros(count(shape), F)
    num_concats, inner = count(xs[0].shape, 0, axis), count(xs[0].shape, axis + 1)
    off = 0
    for x in xs:
        n_ax = x.shape[axis]
        flat = x.reshape(-1)
        for n in range(num_concats):
            block = n_ax * inner
            dst = (n * top_axis + off) * inner
            out[dst:dst + block] = flat[n * block:(n + 1) * block]
        off += n_ax
    return out.reshape(shape)


@pytest.mark.parametrize("spec,axis,shapes", [
    ("", 1, [(2, 3, 4), (2, 5, 4), (2, 1, 4)]),
    ("concat_param { axis: 0 }", 0, [(2, 3), (4, 3)]),
    ("concat_param { axis: -1 }", 3, [(2, 3, 2, 1), (2, 3, 2, 4)]),
    ("concat_param { axis: 2 }", 2, [(1, 2, 3, 2), (1, 2, 2, 2), (1, 2, 1, 2)]),
    ("concat_param { concat_dim: 0 }", 0, [(3, 2, 2), (1, 2, 2)]),
])
def test_concat_matches_copy_loop(spec, axis, shapes):
    xs = [rand(s, i) for i, s in enumerate(shapes)]
    layer, bottom, top = make_layer(f'name: "c" type: "Concat" {spec}', xs)
    fwd_bwd(layer, bottom, top)
    want = concat_oracle(xs, axis)
    np.testing.assert_array_equal(top[0].data, want)
    # backward: the oracle applied to the bottom diffs must give back the top diff
    np.testing.assert_array_equal(concat_oracle([b.diff for b in bottom], axis), top[0].diff)
    assert check_gradients(layer, bottom, top) > 0


def test_concat_errors_and_single_bottom():
    with pytest.raises(LayerSetupError, match="either axis or concat_dim"):
        make_layer('name: "c" type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [rand((2, 2))] * 2)
    with pytest.raises(LayerSetupError, match="must match except along axis"):
        make_layer('name: "c" type: "Concat"', [rand((2, 2, 3)), rand((2, 2, 4))])
    with pytest.raises(LayerSetupError, match="out of range"):
        make_layer('name: "c" type: "Concat" concat_param { axis: 3 }', [rand((2, 2, 3))] * 2)
    x = rand((2, 3))
    layer, bottom, top = make_layer('name: "c" type: "Concat"', [x])
    fwd_bwd(layer, bottom, top)
    assert np.shares_memory(top[0].data, bottom[0].data)  # Caffe shares data with one bottom
    np.testing.assert_array_equal(bottom[0].diff, top[0].diff)


# ----------------------------------------------------------------------------- Eltwise
def eltwise_oracle(op, xs, dy, coeffs=None, stable=True):
    """EltwiseLayer Forward_cpu/Backward_cpu transcribed element by element."""
    n = xs[0].size
    flat = [x.reshape(-1).astype(np.float64) for x in xs]
    d = dy.reshape(-1)
    y = np.zeros(n)
    mask = np.zeros(n, int)
    dx = [np.zeros(n) for _ in xs]
    for i in range(n):
        if op == "PROD":
            y[i] = np.prod([f[i] for f in flat])
        elif op == "SUM":
            y[i] = sum((coeffs[k] if coeffs else 1.0) * f[i] for k, f in enumerate(flat))
        else:
            if flat[0][i] > flat[1][i]:
                y[i], mask[i] = flat[0][i], 0
            else:
                y[i], mask[i] = flat[1][i], 1
            for k in range(2, len(flat)):
                if flat[k][i] > y[i]:
                    y[i], mask[i] = flat[k][i], k
        for k in range(len(xs)):
            if op == "PROD":
                g = np.prod([f[i] for j, f in enumerate(flat) if j != k]) if stable else y[i] / flat[k][i]
                dx[k][i] = g * d[i]
            elif op == "SUM":
                dx[k][i] = (coeffs[k] if coeffs else 1.0) * d[i]
            else:
                dx[k][i] = d[i] if mask[i] == k else 0.0
    return y.reshape(dy.shape), [g.reshape(dy.shape) for g in dx]


@pytest.mark.parametrize("spec,op,coeffs,stable,nb", [
    ("", "SUM", None, True, 2),
    ("eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }", "SUM", [1, -0.5, 2], True, 3),
    ("eltwise_param { operation: PROD }", "PROD", None, True, 3),
    ("eltwise_param { operation: PROD stable_prod_grad: false }", "PROD", None, False, 2),
    ("eltwise_param { operation: MAX }", "MAX", None, True, 2),
    ("eltwise_param { operation: MAX }", "MAX", None, True, 4),
])
def test_eltwise_matches_loop(spec, op, coeffs, stable, nb):
    shape = (2, 3, 4)
    xs = [rand(shape, i + 3) for i in range(nb)]
    if op == "MAX":  # ties: quantise so several bottoms share the max
        xs = [np.round(x * 2) / 2 for x in xs]
    layer, bottom, top = make_layer(f'name: "e" type: "Eltwise" {spec}', xs)
    dy = rand(shape, 9)
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True] * nb, bottom)
    y, dxs = eltwise_oracle(op, xs, dy, coeffs, stable)
    np.testing.assert_allclose(top[0].data, y, rtol=1e-6, atol=1e-6)
    for b, g in zip(bottom, dxs):
        np.testing.assert_allclose(b.diff, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("into", [0, 1, 2])
@pytest.mark.parametrize("spec,coeffs", [("", [1, 1, 1]), ("eltwise_param { coeff: -0.5 coeff: 2 coeff: 1 }",
                                                             [-0.5, 2, 1])])
def test_eltwise_sum_in_place_on_any_bottom(into, spec, coeffs):
    """The sum is accumulated in the top: a top that is bottom ``into`` must still give the sum
    of the inputs as they were."""
    xs = [rand((2, 3, 4), i + 3) for i in range(3)]
    layer, bottom, _ = make_layer(f'name: "e" type: "Eltwise" {spec}', xs)
    layer.forward(bottom, [bottom[into]])
    want = sum(np.float64(c) * x for c, x in zip(coeffs, xs))
    np.testing.assert_allclose(bottom[into].data, want, rtol=1e-6, atol=1e-6)
    for k, x in enumerate(xs):
        if k != into:
            np.testing.assert_array_equal(bottom[k].data, x)


def test_eltwise_max_tie_rule():
    a = np.array([1.0, 2.0, 3.0, 3.0], F)
    b = np.array([1.0, 1.0, 3.0, 2.0], F)
    c = np.array([1.0, 2.0, 0.0, 3.0], F)
    layer, bottom, top = make_layer('name: "e" type: "Eltwise" eltwise_param { operation: MAX }', [a, b, c])
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True] * 3, bottom)
    # a tie of bottoms 0 and 1 goes to 1; a later bottom must be strictly greater
    np.testing.assert_array_equal(bottom[0].diff, [0, 1, 0, 1])
    np.testing.assert_array_equal(bottom[1].diff, [1, 0, 1, 0])
    np.testing.assert_array_equal(bottom[2].diff, [0, 0, 0, 0])


def test_eltwise_errors():
    x = rand((2, 2))
    with pytest.raises(LayerSetupError, match="one coefficient per bottom"):
        make_layer('name: "e" type: "Eltwise" eltwise_param { coeff: 1 }', [x, x])
    with pytest.raises(LayerSetupError, match="only allowed for operation SUM"):
        make_layer('name: "e" type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [x, x])
    with pytest.raises(LayerSetupError, match="same shape"):
        make_layer('name: "e" type: "Eltwise"', [x, rand((2, 3))])
    with pytest.raises(LayerSetupError, match="at least 2"):
        make_layer('name: "e" type: "Eltwise"', [x])


@pytest.mark.parametrize("spec", ["eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 }",
                                  "eltwise_param { operation: PROD }",
                                  "eltwise_param { operation: PROD stable_prod_grad: false }",
                                  "eltwise_param { operation: MAX }"])
def test_eltwise_gradients(spec):
    rng = np.random.RandomState(5)
    # well-separated values so that no MAX switch lies within the finite-difference step
    vals = rng.permutation(3 * 24).astype(F).reshape(3, 2, 3, 4) * F(0.1) - F(3.6)
    vals[np.abs(vals) < 0.05] = 0.5
    layer, bottom, top = make_layer(f'name: "e" type: "Eltwise" {spec}', list(vals))
    assert check_gradients(layer, bottom, top, kink_range=0.0) == vals.size


# ----------------------------------------------------------------------------- Split
def test_split_shares_data_and_sums_diffs():
    x = rand((2, 3, 4))
    layer, bottom, top = make_layer('name: "s" type: "Split"', [x], ntop=3)
    fwd_bwd(layer, bottom, top)
    for t in top:
        assert t.shape == x.shape and np.shares_memory(t.data, bottom[0].data)
    np.testing.assert_allclose(bottom[0].diff, top[0].diff + top[1].diff + top[2].diff, rtol=1e-6)
    assert check_gradients(layer, bottom, top) == x.size
    with pytest.raises(LayerSetupError, match="in-place"):
        layer2 = create_layer(text_format.Parse('name: "s" type: "Split"', caffe_pb2().LayerParameter()), TEST)
        layer2.setup(bottom, [bottom[0]])


# ----------------------------------------------------------------------------- Slice
def slice_oracle(x, axis, sizes):
    """SliceLayer::Forward_cpu's block copies."""
    num_slices, inner = count(x.shape, 0, axis), count(x.shape, axis + 1)
    flat = x.reshape(-1)
    outs, off = [], 0
    for s in sizes:
        shape = list(x.shape)
        shape[axis] = s
        o = np.zeros(count(shape), F)
        for n in range(num_slices):
            src = (n * x.shape[axis] + off) * inner
            o[n * s * inner:(n + 1) * s * inner] = flat[src:src + s * inner]
        outs.append(o.reshape(shape))
        off += s
    return outs


@pytest.mark.parametrize("spec,axis,sizes,shape", [
    ("slice_param { slice_point: 1 slice_point: 4 }", 1, [1, 3, 2], (2, 6, 3)),
    ("", 1, [2, 2, 2], (3, 6, 2)),
    ("slice_param { axis: 0 }", 0, [2, 2], (4, 3)),
    ("slice_param { axis: -1 slice_point: 2 }", 2, [2, 3], (2, 3, 5)),
    ("slice_param { slice_dim: 2 slice_point: 1 }", 2, [1, 2], (2, 2, 3, 2)),
])
def test_slice_matches_copy_loop(spec, axis, sizes, shape):
    x = rand(shape, 7)
    layer, bottom, top = make_layer(f'name: "s" type: "Slice" {spec}', [x], ntop=len(sizes))
    fwd_bwd(layer, bottom, top)
    for t, w in zip(top, slice_oracle(x, axis, sizes)):
        np.testing.assert_array_equal(t.data, w)
    np.testing.assert_array_equal(concat_oracle([t.diff for t in top], axis), bottom[0].diff)
    assert check_gradients(layer, bottom, top) == x.size


def test_slice_errors():
    x = rand((2, 6))
    with pytest.raises(LayerSetupError, match="evenly divide"):
        make_layer('name: "s" type: "Slice"', [x], ntop=4)
    with pytest.raises(LayerSetupError, match="slice_point"):
        make_layer('name: "s" type: "Slice" slice_param { slice_point: 2 }', [x], ntop=3)
    with pytest.raises(LayerSetupError, match="strictly increasing"):
        make_layer('name: "s" type: "Slice" slice_param { slice_point: 3 slice_point: 2 }', [x], ntop=3)
    with pytest.raises(LayerSetupError, match="either axis or slice_dim"):
        make_layer('name: "s" type: "Slice" slice_param { axis: 1 slice_dim: 1 }', [x], ntop=2)


# ----------------------------------------------------------------------------- Flatten / Reshape
@pytest.mark.parametrize("spec,shape,want", [
    ("", (2, 3, 4, 5), (2, 60)),
    ("flatten_param { axis: 0 }", (2, 3, 4), (24,)),
    ("flatten_param { axis: 1 end_axis: 2 }", (2, 3, 4, 5), (2, 12, 5)),
    ("flatten_param { axis: -2 }", (2, 3, 4, 5), (2, 3, 20)),
    ("flatten_param { axis: 2 end_axis: -2 }", (2, 3, 4, 5, 6), (2, 3, 20, 6)),
])
def test_flatten_shapes(spec, shape, want):
    x = rand(shape, 8)
    layer, bottom, top = make_layer(f'name: "f" type: "Flatten" {spec}', [x])
    fwd_bwd(layer, bottom, top)
    assert top[0].shape == want
    np.testing.assert_array_equal(top[0].data.reshape(-1), x.reshape(-1))
    np.testing.assert_array_equal(bottom[0].diff.reshape(-1), top[0].diff.reshape(-1))


def reshape_oracle(shape, dims, axis=0, num_axes=-1):
    """ReshapeLayer::Reshape transcribed."""
    n = len(shape)
    start = axis if axis >= 0 else n + axis + 1
    end = n if num_axes == -1 else start + num_axes
    top = list(shape[:start]) + list(dims) + list(shape[end:])
    for i, d in enumerate(dims):
        if d == 0:
            top[start + i] = shape[start + i]
    if -1 in dims:
        known = count(shape) // max(1, count([d for d in top if d != -1]))
        top[start + dims.index(-1)] = known
    return tuple(top)


@pytest.mark.parametrize("dims,axis,num_axes,shape", [
    ([0, -1], 0, -1, (2, 3, 4, 5)),
    ([6, 2, 5], 0, -1, (3, 4, 5)),
    ([-1], 1, -1, (2, 3, 4, 5)),
    ([2, 2], 1, 1, (3, 4, 5)),
    ([1, 1, 1], 1, 0, (3, 4)),
    ([1], -1, 0, (3, 4)),
    ([0, 0, -1, 2], 0, -1, (2, 3, 4, 6)),
    ([-1, 3], -3, 1, (2, 6, 5)),
    ([], 0, 0, (3, 4)),
])
def test_reshape_shapes(dims, axis, num_axes, shape):
    x = rand(shape, 9)
    sd = " ".join(f"dim: {d}" for d in dims)
    spec = f"reshape_param {{ shape {{ {sd} }} axis: {axis} num_axes: {num_axes} }}"
    layer, bottom, top = make_layer(f'name: "r" type: "Reshape" {spec}', [x])
    fwd_bwd(layer, bottom, top)
    assert top[0].shape == reshape_oracle(shape, dims, axis, num_axes)
    assert np.shares_memory(top[0].data, bottom[0].data)
    np.testing.assert_array_equal(top[0].data.reshape(-1), x.reshape(-1))
    np.testing.assert_array_equal(bottom[0].diff.reshape(-1), top[0].diff.reshape(-1))


@pytest.mark.parametrize("spec,match", [
    ("reshape_param { shape { dim: -1 dim: -1 } }", "more than one -1"),
    ("reshape_param { shape { dim: 7 dim: -1 } }", "divisible"),
    ("reshape_param { shape { dim: 5 dim: 5 } }", "count"),
    ("reshape_param { shape { dim: 0 dim: 0 dim: 0 } }", "no axis"),
    ("reshape_param { shape { dim: 2 } axis: 3 }", "out of range"),
    ("reshape_param { shape { dim: 2 } axis: 1 num_axes: 3 }", "beyond"),
])
def test_reshape_errors(spec, match):
    with pytest.raises(LayerSetupError, match=match):
        make_layer(f'name: "r" type: "Reshape" {spec}', [rand((2, 6))])


# ----------------------------------------------------------------------------- Crop
def crop_oracle(x, ref_shape, axis, offsets):
    """CropLayer::Reshape + crop_copy with explicit index loops."""
    n = x.ndim
    offs, out = [0] * n, list(x.shape)
    for i in range(axis, n):
        offs[i] = offsets[0] if len(offsets) == 1 else (offsets[i - axis] if offsets else 0)
        out[i] = ref_shape[i]
    y = np.zeros(out, F)
    for idx in np.ndindex(*out):
        y[idx] = x[tuple(i + o for i, o in zip(idx, offs))]
    return y


@pytest.mark.parametrize("spec,axis,offsets,shape,ref", [
    ("", 2, [], (2, 3, 7, 6), (1, 1, 4, 3)),
    ("crop_param { axis: 1 offset: 1 }", 1, [1], (2, 4, 5, 5), (2, 2, 3, 3)),
    ("crop_param { axis: 2 offset: 2 offset: 1 }", 2, [2, 1], (2, 3, 7, 6), (5, 5, 4, 3)),
    ("crop_param { axis: -1 offset: 3 }", 2, [3], (2, 3, 7), (9, 9, 2)),
    ("crop_param { axis: 0 offset: 1 offset: 0 offset: 2 }", 0, [1, 0, 2], (3, 4, 5), (2, 4, 2)),
])
def test_crop_matches_loop(spec, axis, offsets, shape, ref):
    x = rand(shape, 10)
    layer, bottom, top = make_layer(f'name: "c" type: "Crop" {spec}', [x, np.zeros(ref, F)])
    fwd_bwd(layer, bottom, top)
    want = crop_oracle(x, ref, axis, offsets)
    np.testing.assert_array_equal(top[0].data, want)
    # backward scatters the top diff back into a zero bottom diff
    probe = crop_oracle(bottom[0].diff, ref, axis, offsets)
    np.testing.assert_array_equal(probe, top[0].diff)
    assert np.abs(bottom[0].diff).sum() == pytest.approx(np.abs(top[0].diff).sum(), rel=1e-5)
    assert check_gradients(layer, bottom, top, check_bottom=[0]) > 0


def test_crop_errors():
    with pytest.raises(LayerSetupError, match="out of bounds"):
        make_layer('name: "c" type: "Crop" crop_param { offset: 3 }', [rand((1, 1, 5, 5)), rand((1, 1, 3, 3))])
    with pytest.raises(LayerSetupError, match="offsets"):
        make_layer('name: "c" type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }',
                   [rand((1, 1, 5, 5)), rand((1, 1, 3, 3))])


# ----------------------------------------------------------------------------- Tile / Silence
@pytest.mark.parametrize("axis,tiles,shape", [(1, 3, (2, 3, 2)), (0, 2, (3, 2)), (-1, 4, (2, 2, 3)),
                                              (2, 1, (2, 1, 3, 2))])
def test_tile_matches_loop(axis, tiles, shape):
    x = rand(shape, 11)
    layer, bottom, top = make_layer(f'name: "t" type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}', [x])
    fwd_bwd(layer, bottom, top)
    ax = axis % len(shape)
    outer, inner = count(shape, 0, ax), count(shape, ax)
    want = np.zeros(outer * tiles * inner, F)
    flat = x.reshape(-1)
    dflat = top[0].diff.reshape(-1)
    dwant = np.zeros(flat.size, F)
    for i in range(outer):
        for t in range(tiles):
            want[(i * tiles + t) * inner:(i * tiles + t + 1) * inner] = flat[i * inner:(i + 1) * inner]
            dwant[i * inner:(i + 1) * inner] += dflat[(i * tiles + t) * inner:(i * tiles + t + 1) * inner]
    np.testing.assert_array_equal(top[0].data.reshape(-1), want)
    np.testing.assert_allclose(bottom[0].diff.reshape(-1), dwant, rtol=1e-6, atol=1e-7)
    assert check_gradients(layer, bottom, top) == x.size


def test_tile_needs_tiles():
    with pytest.raises(LayerSetupError, match="tiles"):
        make_layer('name: "t" type: "Tile"', [rand((2, 2))])


def test_silence():
    layer, bottom, top = make_layer('name: "s" type: "Silence"', [rand((2, 3)), rand((4,))], ntop=0)
    layer.forward(bottom, top)
    layer.backward(top, [True, True], bottom)
    assert not bottom[0].diff.any() and not bottom[1].diff.any()


# ----------------------------------------------------------------------------- against pycaffe
def net(shapes, layers: str) -> str:
    tops = " ".join(f'top: "{n}"' for n in shapes)
    dims = " ".join("shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes.values())
    return f'layer {{ name: "in" type: "Input" {tops} input_param {{ {dims} }} }}\n' + layers


CAFFE_CASES = [
    ({"a": (2, 3, 4), "b": (2, 5, 4)}, 'type: "Concat" bottom: "a" bottom: "b" top: "y"'),
    ({"a": (2, 3, 1, 3), "b": (2, 3, 4, 3), "c": (2, 3, 2, 3)},
     'type: "Concat" concat_param { axis: -2 } bottom: "a" bottom: "b" bottom: "c" top: "y"'),
    ({"a": (3, 4), "b": (1, 4)}, 'type: "Concat" concat_param { concat_dim: 0 } bottom: "a" bottom: "b" top: "y"'),
    ({"a": (2, 3, 5)}, 'type: "Concat" bottom: "a" top: "y"'),
    ({"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 3, 4)},
     'type: "Eltwise" eltwise_param { coeff: 0.5 coeff: -1 coeff: 2 } bottom: "a" bottom: "b" bottom: "c" top: "y"'),
    ({"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 3, 4)},
     'type: "Eltwise" eltwise_param { operation: PROD } bottom: "a" bottom: "b" bottom: "c" top: "y"'),
    ({"a": (3, 5), "b": (3, 5)},
     'type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false } bottom: "a" bottom: "b" top: "y"'),
    ({"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 3, 4)},
     'type: "Eltwise" eltwise_param { operation: MAX } bottom: "a" bottom: "b" bottom: "c" top: "y"'),
    ({"a": (2, 7, 3)}, 'type: "Slice" slice_param { slice_point: 2 slice_point: 3 } bottom: "a" '
                       'top: "y1" top: "y2" top: "y3"'),
    ({"a": (4, 3, 2)}, 'type: "Slice" slice_param { axis: 0 } bottom: "a" top: "y1" top: "y2"'),
    ({"a": (2, 3, 6)}, 'type: "Slice" slice_param { slice_dim: 2 slice_point: 5 } bottom: "a" top: "y1" top: "y2"'),
    ({"a": (2, 3, 5)}, 'type: "Slice" bottom: "a" top: "y1"'),
    ({"a": (2, 3, 4, 5)}, 'type: "Flatten" bottom: "a" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "Flatten" flatten_param { axis: 2 end_axis: 3 } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 4 } } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4, 5)}, 'type: "Reshape" reshape_param { shape { dim: 2 dim: 2 } axis: 2 num_axes: 1 } '
                          'bottom: "a" top: "y"'),
    ({"a": (2, 3, 7, 6), "b": (1, 1, 4, 3)}, 'type: "Crop" bottom: "a" bottom: "b" top: "y"'),
    ({"a": (2, 3, 7, 6), "b": (1, 2, 4, 3)},
     'type: "Crop" crop_param { axis: 1 offset: 1 offset: 2 offset: 0 } bottom: "a" bottom: "b" top: "y"'),
    ({"a": (2, 3, 4)}, 'type: "Tile" tile_param { tiles: 3 } bottom: "a" top: "y"'),
    ({"a": (2, 3, 4)}, 'type: "Tile" tile_param { axis: -1 tiles: 2 } bottom: "a" top: "y"'),
]


@pytest.mark.parametrize("shapes,spec", CAFFE_CASES)
def test_against_caffe(tmp_path, shapes, spec):
    check_against_caffe(tmp_path, net(shapes, f'layer {{ name: "l" {spec} }}\n'))


def test_against_caffe_eltwise_max_ties(tmp_path):
    rng = np.random.RandomState(4)
    xs = {n: (np.round(rng.standard_normal((2, 3, 5)) * 2) / 2).astype(F) for n in "abc"}
    check_against_caffe(tmp_path, net({n: (2, 3, 5) for n in "abc"},
                                      'layer { name: "l" type: "Eltwise" eltwise_param { operation: MAX } '
                                      'bottom: "a" bottom: "b" bottom: "c" top: "y" }\n'), xs)


def test_against_caffe_split_silence_and_views(tmp_path):
    """Explicit Split, a Flatten view used twice, a Silence sink and an in-place layer after a view."""
    text = net({"a": (2, 3, 2, 2), "s": (3,)}, """
layer { name: "split" type: "Split" bottom: "a" top: "a1" top: "a2" top: "a3" }
layer { name: "f" type: "Flatten" bottom: "a1" top: "f" }
layer { name: "p1" type: "Power" power_param { scale: 2 } bottom: "f" top: "g" }
layer { name: "r" type: "Reshape" reshape_param { shape { dim: -1 dim: 12 } } bottom: "a2" top: "r" }
layer { name: "sig" type: "Sigmoid" bottom: "r" top: "r" }
layer { name: "cat" type: "Concat" concat_param { axis: 0 } bottom: "g" bottom: "r" top: "cat" }
layer { name: "p3" type: "Power" power_param { power: 2 } bottom: "a3" top: "sq" }
layer { name: "silence" type: "Silence" bottom: "s" }
""")
    check_against_caffe(tmp_path, text)


@pytest.mark.parametrize("text,shapes,ntop", [
    ('name: "c" type: "Concat"', [(2, 3, 2), (2, 1, 2)], 1),
    ('name: "c" type: "Concat"', [(2, 3)], 1),
    ('name: "e" type: "Eltwise" eltwise_param { coeff: 2 coeff: -1 }', [(2, 3)] * 2, 1),
    ('name: "e" type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3)] * 3, 1),
    ('name: "e" type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3)] * 3, 1),
    ('name: "s" type: "Split"', [(2, 3)], 2),
    ('name: "s" type: "Split"', [(2, 3)], 1),
    ('name: "s" type: "Slice" slice_param { slice_point: 1 }', [(2, 3)], 2),
    ('name: "s" type: "Slice"', [(2, 3)], 1),
    ('name: "f" type: "Flatten"', [(2, 3, 2)], 1),
    ('name: "r" type: "Reshape" reshape_param { shape { dim: -1 } }', [(2, 3, 2)], 1),
    ('name: "c" type: "Crop"', [(2, 3, 4), (2, 3, 2)], 1),
    ('name: "t" type: "Tile" tile_param { tiles: 2 }', [(2, 3)], 1),
])
def test_backward_adds_into_bottom_diff(text, shapes, ntop):
    """Backward must add (+=) into bottom diffs, never overwrite them."""
    xs = [rand(s, 30 + i) for i, s in enumerate(shapes)]
    layer, bottom, top = make_layer(text, xs, ntop=ntop)
    fwd_bwd(layer, bottom, top)
    first = [b.diff.copy() for b in bottom]
    for b in bottom:
        b.diff[...] = 0.5
    layer.backward(top, [True] * len(bottom), bottom)
    for b, d in zip(bottom, first):
        want = d + 0.5
        if layer.type == "Crop" and b is bottom[1]:
            want = np.full(b.shape, 0.5, F)
        np.testing.assert_allclose(b.diff, want, rtol=1e-6, atol=1e-6)
