"""Tests of the vision layers (caffe_utils/layers/vision.py), Pooling (layers/pooling.py), LRN
(layers/lrn.py) and im2col (layers/im2col.py).

Oracles: the loop transcriptions in ``tests/oracles.py`` (direct 7-loop convolution and its
backward, scatter loops for deconvolution, Caffe's pooling, LRN and im2col/col2im loops),
finite-difference gradient checks, and the real pycaffe (skipped when not importable, required
in CI).
"""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_utils.layers import Blob, create_layer
from caffe_utils.layers import im2col as i2c
from caffe_utils.layers.base import LayerSetupError
from caffe_utils.layers.vision import conv_geometry
from caffe_utils.schema import caffe_pb2
from tests.gradcheck import check_gradients
from tests.oracles import (col2im_naive, im2col_naive, naive_conv, naive_conv_backward, naive_deconv,
                           naive_lrn_across, naive_lrn_within, naive_pool, naive_pool_backward)
from tests.reference import check_against_caffe

TEST = 1
F = np.float32


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def make_layer(text: str, shapes, ntop: int = 1, seed: int = 0, init=None):
    param = text_format.Parse(text, caffe_pb2().LayerParameter())
    layer = create_layer(param, TEST)
    rng = np.random.RandomState(seed)
    bottom = []
    for s in shapes:
        b = Blob(s)
        b.data[...] = init(rng, s) if init else rng.standard_normal(s)
        bottom.append(b)
    top = [Blob() for _ in range(ntop)]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    for p in layer.blobs:
        p.data[...] = rng.standard_normal(p.shape)
    return layer, bottom, top


def fwd_bwd(layer, bottom, top, seed: int = 5):
    """Forward, then backward with random top diffs; returns (tops, top diffs)."""
    layer.forward(bottom, top)
    rng = np.random.RandomState(seed)
    dys = []
    for t in top:
        t.diff[...] = rng.standard_normal(t.shape)
        dys.append(t.diff.astype(np.float64))
    for b in bottom:
        b.diff[...] = 0
    for p in layer.blobs:
        p.diff[...] = 0
    layer.backward(top, [True] * len(bottom), bottom)
    return [t.data.astype(np.float64) for t in top], dys


def close(a, b, rtol=1e-4):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.abs(b).max() if b.size else 0.0, 1e-6)
    err = np.abs(a - b).max() if b.size else 0.0
    assert err <= rtol * scale, f"max err {err:.3g} > {rtol} * {scale:.3g}"


def pool_floor_text() -> str:
    """The schema's way to ask for floor rounding (BVLC round_mode or a fork's ceil_mode)."""
    fields = caffe_pb2().PoolingParameter.DESCRIPTOR.fields_by_name
    if "round_mode" in fields:
        return "round_mode: FLOOR"
    if "ceil_mode" in fields:
        return "ceil_mode: false"
    pytest.skip("schema has no pooling rounding option")


# ------------------------------------------------------------------------------------------
# im2col
# ------------------------------------------------------------------------------------------

IM2COL_CASES = [
    # (C, H, W, kernel, pad, stride, dilation)
    (3, 7, 9, 3, 1, 2, 1),
    (2, 8, 7, (3, 2), (2, 0), (3, 2), (2, 1)),
    (2, 5, 5, 4, 0, 3, 1),
    (3, 4, 6, 1, 0, 1, 1),
    (1, 6, 6, 3, 0, 1, 2),
    (2, 2, 3, 3, 0, 2, 1),   # kernel larger than the input: C truncation gives one output
]


@pytest.mark.parametrize("case", IM2COL_CASES)
def test_im2col_matches_caffe_loops(case):
    C, H, W, k, p, s, d = case
    rng = np.random.RandomState(1)
    x = rng.standard_normal((C, H, W)).astype(F)
    col = i2c.im2col(x, k, p, s, d)
    np.testing.assert_array_equal(col, im2col_naive(x, k, p, s, d))
    c = rng.standard_normal(col.shape).astype(F)
    img = i2c.col2im(c, (C, H, W), k, p, s, d)
    np.testing.assert_allclose(img, col2im_naive(c, (C, H, W), k, p, s, d), rtol=1e-5, atol=1e-5)
    # adjoint: <im2col(x), c> == <x, col2im(c)>
    lhs = float(np.sum(col.astype(np.float64) * c))
    rhs = float(np.sum(x.astype(np.float64) * img))
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs))


def test_im2col_layout_is_caffes():
    x = np.arange(2 * 3 * 3, dtype=F).reshape(2, 3, 3)
    col = i2c.im2col(x, 2, 0, 1)
    assert col.shape == (2 * 2 * 2, 4)
    # row (c=1, i=0, j=1), column (r=1, s=0) reads x[1, 1, 1]
    assert col[(1 * 2 + 0) * 2 + 1, 1 * 2 + 0] == x[1, 1, 1]


@pytest.mark.parametrize("n", [1, 3])
def test_im2col_batch_threaded(monkeypatch, n):
    """The threaded split (by image, or by channel for one image) gives the same result."""
    monkeypatch.setattr(i2c, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(i2c, "_num_threads", lambda: 2)
    rng = np.random.RandomState(2)
    x = rng.standard_normal((n, 3, 9, 8)).astype(F)
    col = i2c.im2col_batch(x, 3, 1, 2, 1)
    oh, ow = i2c.out_shape((9, 8), 3, 1, 2)
    ref = np.stack([im2col_naive(x[i], 3, 1, 2, 1) for i in range(n)], axis=1)  # (rows, N, P)
    np.testing.assert_array_equal(col, ref.reshape(col.shape))
    c = rng.standard_normal(col.shape).astype(F)
    img = i2c.col2im_batch(c, x.shape, 3, 1, 2, 1, out=np.empty(10_000, F))
    cc = c.reshape(-1, n, oh * ow)
    ref_img = np.stack([col2im_naive(cc[:, i], (3, 9, 8), 3, 1, 2, 1) for i in range(n)])
    np.testing.assert_allclose(img, ref_img, rtol=1e-5, atol=1e-5)


def test_scratch_buffers_reused_and_grown():
    a = i2c.scratch("test_buf", 10)
    b = i2c.scratch("test_buf", 5)
    assert np.shares_memory(a, b)
    c = i2c.scratch("test_buf", 100)
    assert c.size == 100
    with pytest.raises(ValueError):
        i2c.im2col_batch(np.zeros((1, 1, 4, 4), F), 3, out=np.empty(3, F))


# ------------------------------------------------------------------------------------------
# Convolution
# ------------------------------------------------------------------------------------------

CONV_CASES = [
    # (bottom shape, convolution_param text, kernel, pad, stride, dilation, group, bias)
    ((2, 3, 7, 8), "num_output: 4 kernel_size: 3", 3, 0, 1, 1, 1, True),
    ((2, 4, 9, 7), "num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2", 3, 1, 2, 1, 2, True),
    ((1, 2, 10, 9), "num_output: 3 kernel_size: 3 pad: 2 stride: 3 dilation: 2 bias_term: false",
     3, 2, 3, 2, 1, False),
    ((2, 3, 8, 9), "num_output: 2 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 0 stride_h: 2 stride_w: 3",
     (3, 2), (2, 0), (2, 3), 1, 1, True),
    ((1, 4, 7, 6), "num_output: 4 kernel_size: 2 kernel_size: 3 pad: 1 pad: 0 stride: 1 stride: 2 "
     "dilation: 1 dilation: 2 group: 4", (2, 3), (1, 0), (1, 2), (1, 2), 4, True),
    ((2, 3, 5, 5), "num_output: 5 kernel_size: 1", 1, 0, 1, 1, 1, True),
    ((1, 2, 2, 3), "num_output: 2 kernel_size: 3 stride: 2", 3, 0, 2, 1, 1, True),  # C truncation
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[1] for c in CONV_CASES])
def test_convolution_matches_direct_loops(case):
    shape, cp, k, p, s, d, group, bias = case
    layer, bottom, top = make_layer(f'name: "c" type: "Convolution" convolution_param {{ {cp} }}', [shape])
    w = layer.blobs[0].data.copy()
    b = layer.blobs[1].data.copy() if bias else None
    assert len(layer.blobs) == (2 if bias else 1)
    assert w.shape[1] == shape[1] // group
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    x = bottom[0].data
    ref = naive_conv(x, w, b, k, p, s, d, group)
    close(y, ref)
    dx, dwt, db = naive_conv_backward(x, w, dy, k, p, s, d, group)
    close(bottom[0].diff, dx)
    close(layer.blobs[0].diff, dwt)
    if bias:
        close(layer.blobs[1].diff, db)


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
def test_convolution_in_image_chunks(monkeypatch, kind):
    """A batch whose column matrix exceeds the budget is processed a few images at a time."""
    from caffe_utils.layers import vision
    text = f'name: "c" type: "{kind}" convolution_param {{ num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 }}'
    layer, bottom, top = make_layer(text, [(5, 2, 5, 6)])
    (y_ref,), _ = fwd_bwd(layer, bottom, top)
    ref = [bottom[0].diff.copy()] + [p.diff.copy() for p in layer.blobs]
    monkeypatch.setattr(vision, "COL_BUDGET", 100)   # one or two images per chunk
    assert len(layer._image_chunks(top[0].shape if kind == "Convolution" else bottom[0].shape)) > 2
    (y,), _ = fwd_bwd(layer, bottom, top)
    close(y, y_ref, 1e-6)
    for got, want in zip([bottom[0].diff] + [p.diff for p in layer.blobs], ref):
        close(got, want, 1e-5)


def test_convolution_param_diffs_accumulate_and_bottom_diff_adds():
    layer, bottom, top = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 pad: 1 }',
                                    [(1, 2, 5, 5)])
    fwd_bwd(layer, bottom, top)
    g_w, g_x = layer.blobs[0].diff.copy(), bottom[0].diff.copy()
    layer.backward(top, [True], bottom)
    close(layer.blobs[0].diff, 2 * g_w, 1e-6)
    close(bottom[0].diff, 2 * g_x, 1e-6)


def test_convolution_two_bottoms_share_weights():
    layer, bottom, top = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 3 kernel_size: 2 stride: 2 }',
                                    [(2, 2, 6, 5), (2, 2, 6, 5)], ntop=2)
    (y0, y1), (dy0, dy1) = fwd_bwd(layer, bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    close(y0, naive_conv(bottom[0].data, w, b, 2, 0, 2, 1, 1))
    close(y1, naive_conv(bottom[1].data, w, b, 2, 0, 2, 1, 1))
    _, dw0, db0 = naive_conv_backward(bottom[0].data, w, dy0, 2, 0, 2, 1, 1)
    _, dw1, db1 = naive_conv_backward(bottom[1].data, w, dy1, 2, 0, 2, 1, 1)
    close(layer.blobs[0].diff, dw0 + dw1)
    close(layer.blobs[1].diff, db0 + db1)


def test_convolution_skips_bottom_diff_when_not_propagating():
    layer, bottom, top = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
                                    [(1, 2, 5, 5)])
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [False], bottom)
    assert not bottom[0].diff.any()
    assert layer.blobs[0].diff.any()


@pytest.mark.parametrize("cp", ["num_output: 4 kernel_size: 3 pad: 1 stride: 2 group: 2",
                                "num_output: 3 kernel_h: 2 kernel_w: 3 dilation: 2 bias_term: false"])
def test_convolution_gradients(cp):
    layer, bottom, top = make_layer(f'name: "c" type: "Convolution" convolution_param {{ {cp} }}', [(2, 4, 6, 7)])
    assert check_gradients(layer, bottom, top, max_checks=60) > 0


@pytest.mark.parametrize("cp, msg", [
    ("num_output: 2 kernel_size: 3 axis: 2", "axis"),
    ("num_output: 2 kernel_size: 3 force_nd_im2col: true", "force_nd_im2col"),
    ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
    ("num_output: 2", "kernel_size"),
    ("num_output: 3 kernel_size: 3 group: 2", "group"),
    ("num_output: 2 kernel_size: 3 stride: 1 stride: 1 stride: 1", "stride"),
    ("num_output: 2 kernel_size: 9", "output"),
    ("num_output: 0 kernel_size: 1", "num_output"),
])
def test_convolution_invalid_params(cp, msg):
    with pytest.raises(LayerSetupError, match=msg):
        make_layer(f'name: "c" type: "Convolution" convolution_param {{ {cp} }}', [(1, 4, 5, 5)])


@pytest.mark.parametrize("cp, want", [
    ("", ((0, 0), (0, 0), (1, 1), (1, 1))),                       # Caffe's defaults; kernel 0
    ("kernel_size: 3 pad: 1 stride: 2 dilation: 2", ((3, 3), (1, 1), (2, 2), (2, 2))),
    ("kernel_size: 2 kernel_size: 3 pad: 0 pad: 1 stride: 1 stride: 2", ((2, 3), (0, 1), (1, 2), (1, 1))),
    ("kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2", ((2, 3), (1, 0), (1, 2), (1, 1))),
    ("kernel_size: 5 kernel_h: 2 kernel_w: 3", ((2, 3), (0, 0), (1, 1), (1, 1))),  # h/w win; setup refuses it
    ("kernel_size: 1 kernel_size: 2 kernel_size: 3 dilation: 2 dilation: 3 dilation: 4",
     ((1, 2), (0, 0), (1, 1), (2, 3))),                          # the first two; setup refuses it
])
def test_conv_geometry(cp, want):
    param = text_format.Parse(f"num_output: 1 {cp}", caffe_pb2().ConvolutionParameter())
    assert conv_geometry(param) == want


@pytest.mark.parametrize("cp, msg", [
    ("kernel_size: 3 kernel_h: 3 kernel_w: 3", "Either kernel_size or kernel_h/w should be specified; not both."),
    ("", "kernel_size must be specified once, or once per spatial dimension "
         "(kernel_size specified 0 times; 2 spatial dims)."),
    ("kernel_h: 0 kernel_w: 2", "Filter dimensions must be nonzero."),
    ("kernel_size: 3 stride: 2 stride_h: 1", "Either stride or stride_h/w should be specified; not both."),
    ("kernel_size: 3 stride_h: 0 stride_w: 2", "Stride dimensions must be nonzero."),
    ("kernel_size: 3 pad: 1 pad: 1 pad: 1", "pad must be specified once, or once per spatial dimension "
                                            "(pad specified 3 times; 2 spatial dims)."),
    ("kernel_size: 3 pad: 1 pad_w: 1", "Either pad or pad_h/w should be specified; not both."),
    ("kernel_size: 3 dilation: 0", "Dilation dimensions must be nonzero."),
])
def test_convolution_geometry_errors_are_caffes(cp, msg):
    with pytest.raises(LayerSetupError) as info:
        make_layer(f'name: "c" type: "Convolution" convolution_param {{ num_output: 2 {cp} }}', [(1, 2, 9, 9)])
    assert str(info.value).endswith(msg)


def test_convolution_rejects_nd_bottom():
    with pytest.raises(LayerSetupError, match="2-D"):
        make_layer('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
                   [(1, 2, 5, 5, 5)])


# ------------------------------------------------------------------------------------------
# Deconvolution
# ------------------------------------------------------------------------------------------

DECONV_CASES = [
    ((2, 3, 4, 5), "num_output: 2 kernel_size: 3", 3, 0, 1, 1, 1, True),
    ((2, 4, 3, 4), "num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2", 4, 1, 2, 1, 2, True),
    ((1, 2, 4, 3), "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 3 stride_w: 2 pad_h: 1 pad_w: 0 "
     "dilation: 2 bias_term: false", (3, 2), (1, 0), (3, 2), 2, 1, False),
]


@pytest.mark.parametrize("case", DECONV_CASES, ids=[c[1] for c in DECONV_CASES])
def test_deconvolution_matches_scatter_loops(case):
    shape, cp, k, p, s, d, group, bias = case
    layer, bottom, top = make_layer(f'name: "d" type: "Deconvolution" convolution_param {{ {cp} }}', [shape])
    w = layer.blobs[0].data.copy()
    assert w.shape[0] == shape[1]                   # (C_in, num_output/group, kh, kw)
    b = layer.blobs[1].data.copy() if bias else None
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    x = bottom[0].data
    close(y, naive_deconv(x, w, b, k, p, s, d, group))
    # deconvolution is the adjoint of convolution with the same weights:
    # d(bottom) = conv(dy), d(w) from the convolution of top with output bottom
    close(bottom[0].diff, naive_conv(dy, w, None, k, p, s, d, group))
    _, dwt, _ = naive_conv_backward(dy, w, x.astype(np.float64), k, p, s, d, group)
    close(layer.blobs[0].diff, dwt)
    if bias:
        close(layer.blobs[1].diff, dy.sum(axis=(0, 2, 3)))


def test_deconvolution_gradients():
    layer, bottom, top = make_layer('name: "d" type: "Deconvolution" convolution_param '
                                    '{ num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 }', [(2, 2, 3, 4)])
    assert check_gradients(layer, bottom, top, max_checks=60) > 0


# ------------------------------------------------------------------------------------------
# InnerProduct
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ipp, shape, axis", [
    ("num_output: 5", (3, 2, 2, 3), 1),
    ("num_output: 4 transpose: true", (2, 6), 1),
    ("num_output: 3 axis: 2 bias_term: false", (2, 3, 4, 2), 2),
    ("num_output: 3 axis: -1 transpose: true", (2, 3, 4), 2),
])
def test_inner_product(ipp, shape, axis):
    layer, bottom, top = make_layer(f'name: "ip" type: "InnerProduct" inner_product_param {{ {ipp} }}', [shape])
    transpose = "transpose" in ipp
    K = int(np.prod(shape[axis:]))
    N = layer.blobs[0].shape[1] if transpose else layer.blobs[0].shape[0]
    assert layer.blobs[0].shape == ((K, N) if transpose else (N, K))
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    assert y.shape == tuple(shape[:axis]) + (N,)
    x = bottom[0].data.reshape(-1, K).astype(np.float64)
    w = layer.blobs[0].data.astype(np.float64)
    wnk = w.T if transpose else w
    ref = np.zeros((x.shape[0], N))
    for m in range(x.shape[0]):
        for n in range(N):
            ref[m, n] = sum(x[m, k] * wnk[n, k] for k in range(K))
    if len(layer.blobs) > 1:
        ref += layer.blobs[1].data
    close(y.reshape(-1, N), ref)
    dy2 = dy.reshape(-1, N)
    close(bottom[0].diff.reshape(-1, K), dy2 @ wnk)
    close(layer.blobs[0].diff, (dy2.T @ x).T if transpose else dy2.T @ x)
    if len(layer.blobs) > 1:
        close(layer.blobs[1].diff, dy2.sum(0))
    assert check_gradients(layer, bottom, top, max_checks=40) > 0


def test_inner_product_rejects_changed_input_size():
    layer, bottom, top = make_layer('name: "ip" type: "InnerProduct" inner_product_param { num_output: 2 }', [(2, 6)])
    bottom[0].reshape((2, 7))
    with pytest.raises(LayerSetupError, match="incompatible"):
        layer.reshape(bottom, top)


# ------------------------------------------------------------------------------------------
# Pooling
# ------------------------------------------------------------------------------------------

POOL_CASES = [
    # (shape, pooling_param text, kernel, pad, stride)
    ((2, 2, 7, 7), "kernel_size: 3 stride: 2", 3, 0, 2),              # exact fit
    ((2, 2, 8, 9), "kernel_size: 3 stride: 2", 3, 0, 2),              # ceil adds a partial window
    ((1, 3, 10, 9), "kernel_size: 3 stride: 2 pad: 1", 3, 1, 2),      # ceil + pad
    ((1, 2, 6, 6), "kernel_size: 2 stride: 2 pad: 1", 2, 1, 2),       # last window would start in pad
    ((1, 2, 7, 8), "kernel_h: 4 kernel_w: 3 stride_h: 3 stride_w: 2 pad_h: 2 pad_w: 1", (4, 3), (2, 1), (3, 2)),
    ((2, 2, 5, 6), "kernel_size: 3 stride: 4", 3, 0, 4),              # stride > kernel
    ((1, 2, 5, 5), "kernel_size: 3", 3, 0, 1),                       # default stride 1
    ((1, 2, 13, 13), "kernel_size: 12 stride: 1 pad: 1", 12, 1, 1),  # > 127 window offsets
    ((2, 2, 4, 5), "kernel_h: 4 kernel_w: 5", (4, 5), 0, 1),          # whole plane, not global
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[c[1] for c in POOL_CASES])
def test_pooling_matches_caffe_loops(method, case):
    shape, pp, k, p, s = case
    layer, bottom, top = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} {pp} }}', [shape])
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    ref, mask = naive_pool(bottom[0].data, method, k, p, s)
    close(y, ref, 1e-6)
    close(bottom[0].diff, naive_pool_backward(shape, dy, method, k, p, s, mask), 1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_floor_rounding(method):
    text = f'name: "p" type: "Pooling" pooling_param {{ pool: {method} kernel_size: 3 stride: 2 pad: 1 {pool_floor_text()} }}'
    layer, bottom, top = make_layer(text, [(1, 2, 8, 9)])
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    ref, mask = naive_pool(bottom[0].data, method, 3, 1, 2, ceil=False)
    assert y.shape == ref.shape == (1, 2, 4, 5)
    close(y, ref, 1e-6)
    close(bottom[0].diff, naive_pool_backward((1, 2, 8, 9), dy, method, 3, 1, 2, mask), 1e-6)


def test_pooling_output_sizes():
    from caffe_utils.layers.pooling import pooled_size
    assert pooled_size(6, 2, 1, 2) == 4            # ceil((6+2-2)/2)+1 = 4; 3*2 = 6 < 7 keeps it
    assert pooled_size(5, 2, 1, 2) == 3            # ceil(5/2)+1 = 4, but 3*2 >= 5+1 -> 3
    assert pooled_size(8, 3, 0, 2) == 4            # ceil(5/2)+1
    assert pooled_size(8, 3, 0, 2, ceil_mode=False) == 3
    assert pooled_size(13, 3, 0, 2) == 6
    assert pooled_size(55, 3, 0, 2) == 27


def test_max_pooling_ties_pick_first_in_scan_order():
    layer, bottom, top = make_layer('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 1 }',
                                    [(1, 1, 3, 3)], init=lambda rng, s: np.ones(s))
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    # windows start at (r, q); the first max in h-then-w scan is the window's top-left element
    np.testing.assert_array_equal(bottom[0].diff[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


def test_global_max_pooling_ties_pick_first():
    layer, bottom, top = make_layer('name: "p" type: "Pooling" pooling_param { pool: MAX global_pooling: true }',
                                    [(1, 2, 3, 3)], init=lambda rng, s: np.ones(s))
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    expect = np.zeros((3, 3))
    expect[0, 0] = 1
    np.testing.assert_array_equal(bottom[0].diff[0, 1], expect)


def test_max_pooling_mask_top():
    layer, bottom, top = make_layer('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }',
                                    [(2, 2, 7, 6)], ntop=2)
    layer.forward(bottom, top)
    ref, mask = naive_pool(bottom[0].data, "MAX", 3, 1, 2)
    close(top[0].data, ref, 1e-6)
    np.testing.assert_array_equal(top[1].data, mask.astype(F))
    dy = np.random.RandomState(3).standard_normal(top[0].shape)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    close(bottom[0].diff, naive_pool_backward((2, 2, 7, 6), dy, "MAX", 3, 1, 2, mask), 1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    layer, bottom, top = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} global_pooling: true }}',
                                    [(2, 3, 4, 5)])
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    x = bottom[0].data.astype(np.float64)
    assert y.shape == (2, 3, 1, 1)
    close(y[..., 0, 0], x.max(axis=(2, 3)) if method == "MAX" else x.mean(axis=(2, 3)), 1e-6)
    # a new input size changes the global kernel
    bottom[0].reshape((2, 3, 3, 3))
    bottom[0].data[...] = 1.0
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    assert top[0].shape == (2, 3, 1, 1)
    np.testing.assert_allclose(top[0].data, 1.0)


def _distinct(rng, shape):
    """Values spaced 0.1 apart (random order) so a max never flips within a gradient step."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * 0.1 - 0.05 * n).reshape(shape)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_gradients(method):
    layer, bottom, top = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} kernel_size: 3 stride: 2 pad: 1 }}',
                                    [(1, 2, 7, 6)], init=_distinct)
    assert check_gradients(layer, bottom, top, step=1e-2, kink_range=0.0) > 0


@pytest.mark.parametrize("pp, ntop, msg", [
    ("pool: STOCHASTIC kernel_size: 2", 1, "STOCHASTIC"),
    ("pool: AVE kernel_size: 2", 2, "top"),
    ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", 1, "not both"),
    ("pool: MAX kernel_h: 2", 1, "kernel"),
    ("pool: MAX global_pooling: true kernel_size: 2", 1, "Global"),
    ("pool: MAX kernel_size: 2 pad: 2", 1, "pad"),
    ("pool: MAX kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1", 1, "pad"),
])
def test_pooling_invalid_params(pp, ntop, msg):
    with pytest.raises(LayerSetupError, match=msg):
        make_layer(f'name: "p" type: "Pooling" pooling_param {{ {pp} }}', [(1, 1, 5, 5)], ntop=ntop)


# ------------------------------------------------------------------------------------------
# LRN
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, alpha, beta, k, C", [(5, 1e-2, 0.75, 1.0, 7), (3, 0.5, 0.6, 2.0, 2), (1, 0.3, 1.2, 1.5, 3)])
def test_lrn_across_channels(size, alpha, beta, k, C):
    layer, bottom, top = make_layer(f'name: "n" type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} }}',
                                    [(2, C, 3, 4)])
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    ref, dx = naive_lrn_across(bottom[0].data, dy, size, alpha, beta, k)
    close(y, ref)
    close(bottom[0].diff, dx)
    assert check_gradients(layer, bottom, top, max_checks=60) > 0


@pytest.mark.parametrize("size, alpha, beta", [(3, 0.5, 0.75), (5, 2.0, 0.5)])
def test_lrn_within_channel(size, alpha, beta):
    # k is not used by Caffe's WITHIN_CHANNEL LRN: setting it must not change anything
    layer, bottom, top = make_layer(f'name: "n" type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} '
                                    f'k: 7 norm_region: WITHIN_CHANNEL }}', [(2, 2, 5, 6)])
    layer.forward(bottom, top)
    close(top[0].data, naive_lrn_within(bottom[0].data, size, alpha, beta))
    assert check_gradients(layer, bottom, top, max_checks=60) > 0


def test_lrn_even_size_rejected():
    with pytest.raises(LayerSetupError, match="odd"):
        make_layer('name: "n" type: "LRN" lrn_param { local_size: 4 }', [(1, 5, 3, 3)])


# ------------------------------------------------------------------------------------------
# against real pycaffe
# ------------------------------------------------------------------------------------------

def _net(shape, layer_text):
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'input: "x" input_shape {{ {dims} }}\n{layer_text}\n'


PYCAFFE_CASES = {
    "conv_basic": ((2, 3, 9, 8), 'layer { name: "c" type: "Convolution" bottom: "x" top: "y" '
                   'convolution_param { num_output: 4 kernel_size: 3 } }'),
    "conv_group_dil": ((2, 4, 9, 8), 'layer { name: "c" type: "Convolution" bottom: "x" top: "y" '
                       'convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2 dilation: 2 } }'),
    "conv_rect": ((2, 3, 10, 11), 'layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param '
                  '{ num_output: 5 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 0 stride_h: 3 stride_w: 2 bias_term: false } }'),
    "conv_repeated": ((1, 4, 8, 9), 'layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param '
                      '{ num_output: 4 kernel_size: 2 kernel_size: 3 pad: 1 pad: 0 stride: 1 stride: 2 '
                      'dilation: 2 dilation: 1 group: 4 } }'),
    "conv_1x1": ((2, 5, 4, 3), 'layer { name: "c" type: "Convolution" bottom: "x" top: "y" '
                 'convolution_param { num_output: 3 kernel_size: 1 } }'),
    "conv_two_bottoms": ((2, 3, 6, 6), 'layer { name: "s" type: "Split" bottom: "x" top: "x1" top: "x2" }\n'
                         'layer { name: "c" type: "Convolution" bottom: "x1" bottom: "x2" top: "y1" top: "y2" '
                         'convolution_param { num_output: 2 kernel_size: 3 stride: 2 pad: 1 } }'),
    "conv_caffenet_conv1": ((2, 3, 35, 35), 'layer { name: "c" type: "Convolution" bottom: "x" top: "y" '
                            'convolution_param { num_output: 8 kernel_size: 11 stride: 4 } }'),
    "deconv": ((2, 4, 5, 6), 'layer { name: "c" type: "Deconvolution" bottom: "x" top: "y" '
               'convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2 } }'),
    "deconv_rect_dil": ((1, 3, 4, 5), 'layer { name: "c" type: "Deconvolution" bottom: "x" top: "y" convolution_param '
                        '{ num_output: 2 kernel_h: 4 kernel_w: 3 stride_h: 2 stride_w: 3 pad_h: 1 dilation: 2 bias_term: false } }'),
    "ip": ((3, 4, 2, 2), 'layer { name: "c" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 7 } }'),
    "ip_axis_transpose": ((3, 4, 5, 2), 'layer { name: "c" type: "InnerProduct" bottom: "x" top: "y" '
                          'inner_product_param { num_output: 7 axis: 2 transpose: true } }'),
    "ip_nobias": ((4, 6), 'layer { name: "c" type: "InnerProduct" bottom: "x" top: "y" '
                  'inner_product_param { num_output: 3 bias_term: false } }'),
    "max_pool": ((2, 3, 10, 9), 'layer { name: "c" type: "Pooling" bottom: "x" top: "y" '
                 'pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }'),
    "max_pool_ceil": ((2, 3, 8, 9), 'layer { name: "c" type: "Pooling" bottom: "x" top: "y" '
                      'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }'),
    "max_pool_mask": ((2, 2, 7, 6), 'layer { name: "c" type: "Pooling" bottom: "x" top: "y" top: "m" '
                      'pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }'),
    "max_pool_last_window_rule": ((1, 2, 5, 5), 'layer { name: "c" type: "Pooling" bottom: "x" top: "y" '
                                  'pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }'),
    "ave_pool": ((2, 3, 10, 9), 'layer { name: "c" type: "Pooling" bottom: "x" top: "y" '
                 'pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }'),
    "ave_pool_rect": ((2, 3, 7, 8), 'layer { name: "c" type: "Pooling" bottom: "x" top: "y" pooling_param '
                      '{ pool: AVE kernel_h: 4 kernel_w: 3 stride_h: 3 stride_w: 2 pad_h: 2 pad_w: 1 } }'),
    "global_ave": ((2, 3, 5, 4), 'layer { name: "c" type: "Pooling" bottom: "x" top: "y" '
                   'pooling_param { pool: AVE global_pooling: true } }'),
    "global_max": ((2, 3, 5, 4), 'layer { name: "c" type: "Pooling" bottom: "x" top: "y" '
                   'pooling_param { pool: MAX global_pooling: true } }'),
    "lrn_across": ((2, 7, 4, 5), 'layer { name: "c" type: "LRN" bottom: "x" top: "y" '
                   'lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 } }'),
    "lrn_across_caffenet": ((2, 9, 3, 3), 'layer { name: "c" type: "LRN" bottom: "x" top: "y" '
                            'lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }'),
    "lrn_within": ((2, 3, 6, 5), 'layer { name: "c" type: "LRN" bottom: "x" top: "y" '
                   'lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL } }'),
    "lrn_within_5": ((1, 2, 7, 6), 'layer { name: "c" type: "LRN" bottom: "x" top: "y" '
                     'lrn_param { local_size: 5 alpha: 2 beta: 0.6 k: 3 norm_region: WITHIN_CHANNEL } }'),
}


@pytest.mark.pycaffe
@pytest.mark.parametrize("name", list(PYCAFFE_CASES))
def test_against_pycaffe(tmp_path, name):
    shape, layer_text = PYCAFFE_CASES[name]
    check_against_caffe(tmp_path, _net(shape, layer_text), seed=3)


@pytest.mark.pycaffe
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_floor_against_pycaffe(tmp_path, method):
    text = (f'layer {{ name: "c" type: "Pooling" bottom: "x" top: "y" pooling_param '
            f'{{ pool: {method} kernel_size: 3 stride: 2 pad: 1 {pool_floor_text()} }} }}')
    check_against_caffe(tmp_path, _net((1, 2, 8, 9), text), seed=4)


@pytest.mark.pycaffe
def test_small_alexnet_stack_against_pycaffe(tmp_path):
    """conv -> relu -> LRN -> pool -> grouped conv -> pool -> fc, as in CaffeNet (scaled down)."""
    layers = '''
layer { name: "conv1" type: "Convolution" bottom: "x" top: "conv1" convolution_param { num_output: 8 kernel_size: 5 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool2" top: "fc" inner_product_param { num_output: 5 } }
'''
    check_against_caffe(tmp_path, _net((2, 3, 31, 31), layers), seed=5)
