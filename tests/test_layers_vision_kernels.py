"""Tests of the numpy engine's fast kernels: the convolution paths of
caffe_utils/layers/conv_kernels.py, the stacked group GEMM of the im2col path, the threaded
BLAS splits (layers/blas.py), Pooling's clipped window taps and LRN's blocked running sums.
Each is checked against the direct loops of ``tests/oracles.py`` and by finite differences, at
several geometries, group counts, channel multipliers, paddings and roundings, with the block
and thread splits forced on.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from caffe_utils.layers import blas, conv_kernels, lrn, pooling, vision
from caffe_utils.layers import im2col as i2c
from tests.gradcheck import check_gradients
from tests.oracles import (naive_conv, naive_conv_backward, naive_lrn_across, naive_lrn_within, naive_pool,
                           naive_pool_backward)
from tests.test_layers_vision import F, POOL_CASES, _distinct, close, fwd_bwd, make_layer, pool_floor_text


def _check_conv(shape, cp, k, p, s, d, group, path, kind="Convolution"):
    """Forward, backward data and backward weight against the 7-loop oracle."""
    layer, bottom, top = make_layer(f'name: "c" type: "{kind}" convolution_param {{ {cp} }}', [shape])
    assert layer.path == path
    w = layer.blobs[0].data.copy()
    b = layer.blobs[1].data.copy() if len(layer.blobs) > 1 else None
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    x = bottom[0].data
    close(y, naive_conv(x, w, b, k, p, s, d, group))
    dx, dwt, db = naive_conv_backward(x, w, dy, k, p, s, d, group)
    close(bottom[0].diff, dx)
    close(layer.blobs[0].diff, dwt)
    if b is not None:
        close(layer.blobs[1].diff, db)
    return layer, bottom, top


POINTWISE_CASES = [
    # (bottom shape, convolution_param text, stride, group)
    ((2, 6, 5, 4), "num_output: 4 kernel_size: 1", 1, 1),
    ((3, 4, 7, 6), "num_output: 5 kernel_size: 1 stride: 2", 2, 1),
    ((2, 3, 8, 7), "num_output: 2 kernel_size: 1 stride_h: 2 stride_w: 3 bias_term: false", (2, 3), 1),
    ((2, 6, 5, 5), "num_output: 4 kernel_size: 1 group: 2", 1, 2),
    ((2, 6, 6, 5), "num_output: 9 kernel_size: 1 group: 3 stride: 2", 2, 3),
    ((1, 3, 4, 4), "num_output: 2 kernel_size: 1 dilation: 3", 1, 1),
]


@pytest.mark.parametrize("budget", [1, 1 << 25])
@pytest.mark.parametrize("case", POINTWISE_CASES, ids=[c[1] for c in POINTWISE_CASES])
def test_pointwise_matches_direct_loops(monkeypatch, case, budget):
    """The 1x1 path, on the whole batch at once and (budget 1) one image at a time."""
    monkeypatch.setattr(vision, "COL_BUDGET", budget)
    shape, cp, s, group = case
    _check_conv(shape, cp, 1, 0, s, 1, group, "pointwise")


def test_one_by_one_with_padding_is_not_pointwise():
    _check_conv((2, 3, 4, 5), "num_output: 2 kernel_size: 1 pad: 1", 1, 1, 1, 1, 1, "im2col")


DEPTHWISE_CASES = [
    # (bottom shape, convolution_param text, kernel, pad, stride, dilation, group)
    ((2, 4, 7, 6), "num_output: 4 kernel_size: 3 pad: 1 group: 4", 3, 1, 1, 1, 4),
    ((2, 5, 9, 8), "num_output: 5 kernel_size: 3 pad: 1 stride: 2 group: 5 bias_term: false", 3, 1, 2, 1, 5),
    ((2, 3, 6, 7), "num_output: 6 kernel_size: 3 pad: 1 group: 3", 3, 1, 1, 1, 3),          # multiplier 2
    ((1, 2, 9, 7), "num_output: 6 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 0 stride_h: 2 stride_w: 1 "
     "dilation: 2 group: 2", (3, 2), (2, 0), (2, 1), 2, 2),                                   # multiplier 3
    ((2, 3, 5, 5), "num_output: 3 kernel_size: 3 pad: 2 group: 3", 3, 2, 1, 1, 3),           # taps all in pad
    ((1, 3, 2, 3), "num_output: 3 kernel_size: 3 stride: 2 group: 3", 3, 0, 2, 1, 3),       # C truncation
    ((2, 4, 5, 6), "num_output: 4 kernel_size: 1 stride: 2 group: 4", 1, 0, 2, 1, 4),       # 1x1 depthwise
    ((2, 3, 6, 6), "num_output: 3 kernel_size: 5 pad: 2 stride: 3 group: 3", 5, 2, 3, 1, 3),
]


@pytest.mark.parametrize("split", ["whole", "blocks"])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=[c[1] for c in DEPTHWISE_CASES])
def test_depthwise_matches_direct_loops(monkeypatch, case, split):
    """The direct stencil; with ``blocks``, tiny blocks (images and channel ranges) in 2 threads."""
    if split == "blocks":
        monkeypatch.setattr(conv_kernels, "BLOCK", 7)
        monkeypatch.setattr(i2c, "_PARALLEL_MIN", 0)
        monkeypatch.setattr(i2c, "_num_threads", lambda: 2)
    shape, cp, k, p, s, d, group = case
    _check_conv(shape, cp, k, p, s, d, group, "depthwise")


@pytest.mark.parametrize("channels_last", [False, True], ids=["channels first", "channels last"])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=[c[1] for c in DEPTHWISE_CASES])
def test_depthwise_with_the_channels_innermost(monkeypatch, case, channels_last):
    """Each case with 12 channels (more than any case's output row, the multiplier kept), in
    tiny blocks and 2 threads: as stored and, where a tap is clipped, with each block copied
    channels innermost (``CHANNELS_LAST_BELOW`` set so that the rule picks each)."""
    monkeypatch.setattr(conv_kernels, "BLOCK", 7)
    monkeypatch.setattr(i2c, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(i2c, "_num_threads", lambda: 2)
    monkeypatch.setattr(conv_kernels, "CHANNELS_LAST_BELOW", 1000 if channels_last else 0)
    (n, c, h, w), cp, k, p, s, d, group = case
    mult = int(re.search(r"num_output: (\d+)", cp).group(1)) // group
    cp = re.sub(r"group: \d+", "group: 12", re.sub(r"num_output: \d+", f"num_output: {12 * mult}", cp))
    layer, _, _ = _check_conv((n, 12, h, w), cp, k, p, s, d, 12, "depthwise")
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = layer._conv_args()
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    clipped = ph or pw or (oh - 1) * sh + dh * (kh - 1) >= h or (ow - 1) * sw + dw * (kw - 1) >= w
    taps = conv_kernels._taps((n, 12, h, w), (oh, ow), *layer._conv_args())
    assert conv_kernels.depthwise_channels_last(taps, (oh, ow), 12) == bool(channels_last and clipped)


@pytest.mark.parametrize("kind", ["DepthwiseConvolution", "ConvolutionDepthwise"])
def test_depthwise_fork_types_take_the_stencil(kind):
    _check_conv((2, 3, 6, 5), "num_output: 3 kernel_size: 3 pad: 1 stride: 2 group: 3", 3, 1, 2, 1, 3,
                "depthwise", kind)


GROUPED_CASES = [
    # (bottom shape, convolution_param text, kernel, pad, stride, dilation, group): im2col path
    ((2, 6, 6, 5), "num_output: 6 kernel_size: 3 pad: 1 group: 3", 3, 1, 1, 1, 3),           # 2 in/group
    ((2, 8, 5, 6), "num_output: 12 kernel_size: 3 stride: 2 pad: 1 group: 4", 3, 1, 2, 1, 4),
    ((1, 4, 7, 7), "num_output: 2 kernel_size: 2 dilation: 2 group: 2", 2, 0, 1, 2, 2),
    ((2, 3, 5, 5), "num_output: 6 kernel_size: 3 group: 1", 3, 0, 1, 1, 1),
]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=[c[1] for c in GROUPED_CASES])
def test_grouped_im2col_matches_direct_loops(case):
    """Groups of several input channels: one stacked GEMM over the group axis."""
    shape, cp, k, p, s, d, group = case
    _check_conv(shape, cp, k, p, s, d, group, "im2col")


@pytest.mark.parametrize("cp, shape, path", [
    ("num_output: 4 kernel_size: 1 stride: 2 group: 2", (2, 4, 5, 6), "pointwise"),
    ("num_output: 6 kernel_size: 1", (2, 3, 4, 4), "pointwise"),
    ("num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 3", (2, 3, 6, 5), "depthwise"),
    ("num_output: 3 kernel_h: 3 kernel_w: 2 dilation: 2 pad: 1 group: 3 bias_term: false", (1, 3, 6, 5),
     "depthwise"),
    ("num_output: 6 kernel_size: 3 pad: 1 group: 3", (2, 6, 5, 4), "im2col"),
])
def test_fast_path_gradients(cp, shape, path):
    layer, bottom, top = make_layer(f'name: "c" type: "Convolution" convolution_param {{ {cp} }}', [shape])
    assert layer.path == path
    assert check_gradients(layer, bottom, top, max_checks=60) > 0


@pytest.mark.parametrize("cp, shape", [
    ("num_output: 4 kernel_size: 1 stride: 2", (2, 3, 5, 5)),
    ("num_output: 6 kernel_size: 3 pad: 1 group: 3", (2, 3, 5, 5)),
])
def test_fast_paths_add_into_diffs(cp, shape):
    """Backward adds (+=): a second backward doubles the diffs; without propagate_down the
    bottom diff stays as it was while the weight diff still grows."""
    layer, bottom, top = make_layer(f'name: "c" type: "Convolution" convolution_param {{ {cp} }}', [shape])
    fwd_bwd(layer, bottom, top)
    g_w, g_x = layer.blobs[0].diff.copy(), bottom[0].diff.copy()
    layer.backward(top, [True], bottom)
    close(layer.blobs[0].diff, 2 * g_w, 1e-6)
    close(bottom[0].diff, 2 * g_x, 1e-6)
    layer.backward(top, [False], bottom)
    close(layer.blobs[0].diff, 3 * g_w, 1e-6)
    close(bottom[0].diff, 2 * g_x, 1e-6)


def test_tap_range_clips_to_the_input():
    # size 5, 3 outputs at stride 2 from offset -1: inputs -1, 1, 3 -> outputs 1..2 read 1, 3
    assert i2c.tap_range(5, 3, -1, 2) == (slice(1, 3), slice(1, 4, 2))
    assert i2c.tap_range(5, 3, 1, 2) == (slice(0, 2), slice(1, 4, 2))   # inputs 1, 3, 5 (5 outside)
    o, _ = i2c.tap_range(2, 2, 4, 1)
    assert o.stop <= o.start                                           # all outside: empty
    for size, out, offset, stride in [(7, 4, -2, 2), (6, 6, 0, 1), (3, 5, -3, 1), (9, 3, 2, 3)]:
        o, i = i2c.tap_range(size, out, offset, stride)
        want = [r for r in range(out) if 0 <= r * stride + offset < size]
        assert list(range(out))[o] == want
        assert list(range(size))[i] == [r * stride + offset for r in want]


# ------------------------------------------------------------------------------------------
# Pooling: clipped window taps, block by block
# ------------------------------------------------------------------------------------------

def _check_pool(shape, pp, method, k, p, s, ceil=True, ntop=1):
    layer, bottom, top = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} {pp} }}',
                                    [shape], ntop=ntop)
    tops, dys = fwd_bwd(layer, bottom, top)
    ref, mask = naive_pool(bottom[0].data, method, k, p, s, ceil)
    close(tops[0], ref, 1e-6)
    if ntop > 1:
        np.testing.assert_array_equal(tops[1], mask)
    close(bottom[0].diff, naive_pool_backward(shape, dys[0], method, k, p, s, mask), 1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[c[1] for c in POOL_CASES])
def test_pooling_in_blocks_and_threads(monkeypatch, method, case):
    """Tiny blocks (channel ranges of one image, and several images) split over 2 threads."""
    monkeypatch.setattr(pooling, "BLOCK", 5)
    monkeypatch.setattr(i2c, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(i2c, "_num_threads", lambda: 2)
    shape, pp, k, p, s = case
    _check_pool(shape, pp, method, k, p, s)


@pytest.mark.parametrize("case", POOL_CASES, ids=[c[1] for c in POOL_CASES])
@pytest.mark.parametrize("values", ["normal", "ties"])
def test_max_pooling_without_backward_expected(monkeypatch, case, values):
    """A forward with no backward expected keeps only the maxima; a backward after all finds
    their places from the bottom data: both as Caffe's loops, also where many values tie (a
    ReLU's zeros: the first in scan order takes the gradient) and windows read only -FLT_MAX
    or the padding, in blocks and threads."""
    monkeypatch.setattr(pooling, "BLOCK", 5)
    monkeypatch.setattr(i2c, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(i2c, "_num_threads", lambda: 2)
    shape, pp, k, p, s = case

    def init(rng, sh):
        if values == "normal":
            return rng.standard_normal(sh)
        x = np.maximum(rng.randint(-2, 3, size=sh), 0).astype(np.float32)  # many zeros, some twos
        x[..., 0, :] = -np.finfo(np.float32).max                         # a row nothing beats
        return x

    layer, bottom, top = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: MAX {pp} }}', [shape],
                                    init=init)
    layer.expect_backward(False)
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    assert (layer._code is None) != layer._is_global(shape)             # no places kept (but a plane's)
    ref, mask = naive_pool(bottom[0].data, "MAX", k, p, s)
    np.testing.assert_array_equal(y, ref.astype(np.float32))
    close(bottom[0].diff, naive_pool_backward(shape, dy, "MAX", k, p, s, mask), 1e-6)
    layer.expect_backward(True)
    fwd_bwd(layer, bottom, top)
    assert layer._code is not None


def _ties(rng, shape):
    """Many ties (a ReLU's zeros, some twos) and a row that nothing beats (-FLT_MAX)."""
    x = np.maximum(rng.randint(-2, 3, size=shape), 0).astype(np.float32)
    x[..., 0, :] = -np.finfo(np.float32).max
    return x


@pytest.mark.parametrize("channels_last", [False, True], ids=["channels first", "channels last"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[c[1] for c in POOL_CASES])
def test_pooling_with_the_channels_innermost(monkeypatch, case, channels_last):
    """12 channels, more than any case's output row: worked on as stored and, where a window is
    clipped, with each block copied channels innermost (``CHANNELS_LAST_BELOW`` set so that
    the rule picks each), in tiny blocks and 2 threads. MAX (its places kept; its places found
    again from the data, with ties; the mask top) and AVE all as Caffe's loops."""
    monkeypatch.setattr(pooling, "BLOCK", 7)
    monkeypatch.setattr(i2c, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(i2c, "_num_threads", lambda: 2)
    monkeypatch.setattr(pooling, "CHANNELS_LAST_BELOW", 1000 if channels_last else 0)
    (n, _, h, w), pp, k, p, s = case
    shape = (n, 12, h, w)
    for method, ntop, expect, init in [("MAX", 1, True, None), ("MAX", 2, True, None), ("MAX", 1, False, _ties),
                                       ("AVE", 1, True, None)]:
        layer, bottom, top = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} {pp} }}',
                                        [shape], ntop=ntop, init=init)
        (kh, kw), (ph, pw), (sh, sw), (oh, ow) = layer.kernel, layer.pad, layer.stride, layer.out
        clipped = ph or pw or (oh - 1) * sh + kh > h or (ow - 1) * sw + kw > w
        taps = pooling.window_taps((h, w), layer.out, layer.kernel, layer.pad, layer.stride)
        assert pooling._channels_innermost(taps, layer.out, 12) == bool(channels_last and clipped)
        layer.expect_backward(expect)
        tops, dys = fwd_bwd(layer, bottom, top)
        ref, mask = naive_pool(bottom[0].data, method, k, p, s)
        close(tops[0], ref, 1e-6)
        if ntop > 1:
            np.testing.assert_array_equal(tops[1], mask)
        close(bottom[0].diff, naive_pool_backward(shape, dys[0], method, k, p, s, mask), 1e-6)


FLOOR_CASES = [
    # (shape, kernel, pad, stride) with floor rounding
    ((2, 3, 7, 7), 2, 1, 2),
    ((1, 2, 9, 8), 4, 2, 2),
    ((2, 2, 8, 9), 3, 0, 2),
    ((1, 3, 6, 7), (3, 2), (1, 1), (2, 3)),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("case", FLOOR_CASES, ids=[str(c) for c in FLOOR_CASES])
def test_pooling_floor_rounding_with_pads(method, case):
    shape, k, p, s = case
    kh, kw = (k, k) if isinstance(k, int) else k
    ph, pw = (p, p) if isinstance(p, int) else p
    sh, sw = (s, s) if isinstance(s, int) else s
    pp = (f"kernel_h: {kh} kernel_w: {kw} pad_h: {ph} pad_w: {pw} stride_h: {sh} stride_w: {sw} "
          f"{pool_floor_text()}")
    _check_pool(shape, pp, method, (kh, kw), (ph, pw), (sh, sw), ceil=False)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling_matches_caffe_loops(method):
    _check_pool((2, 3, 4, 5), "global_pooling: true", method, (4, 5), 0, 1)


def test_max_pooling_mask_top_routes_the_gradient():
    _check_pool((2, 2, 7, 6), "kernel_size: 3 stride: 2 pad: 1", "MAX", 3, 1, 2, ntop=2)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_backward_adds_into_the_bottom_diff(method):
    layer, bottom, top = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: {method} kernel_size: 3 '
                                    f'stride: 2 pad: 1 }}', [(2, 3, 7, 8)])
    fwd_bwd(layer, bottom, top)
    g = bottom[0].diff.copy()
    layer.backward(top, [True], bottom)
    close(bottom[0].diff, 2 * g, 1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_floor_gradients(method):
    text = (f'name: "p" type: "Pooling" pooling_param {{ pool: {method} kernel_size: 3 stride: 2 pad: 1 '
            f'{pool_floor_text()} }}')
    layer, bottom, top = make_layer(text, [(1, 2, 8, 9)], init=_distinct)
    assert check_gradients(layer, bottom, top, step=1e-2, kink_range=0.0) > 0


# ------------------------------------------------------------------------------------------
# BLAS helpers: products split over threads, one BLAS thread each
# ------------------------------------------------------------------------------------------

@pytest.fixture
def split_blas(monkeypatch):
    """Every product goes through the threaded split, on 2 threads."""
    monkeypatch.setattr(blas, "LONG_MIN", 0)
    monkeypatch.setattr(blas, "_num_threads", lambda: 2)
    monkeypatch.setattr(i2c, "_num_threads", lambda: 2)


def test_split_products_match_matmul(split_blas):
    rng = np.random.RandomState(7)
    a, b = rng.standard_normal((5, 1030)).astype(F), rng.standard_normal((3, 1030)).astype(F)
    close(blas.matmul_nt_long(a, b, np.empty((5, 3), F)), a.astype(np.float64) @ b.T.astype(np.float64), 1e-5)
    w, x = rng.standard_normal((4, 6)).astype(F), rng.standard_normal((6, 1100)).astype(F)
    close(blas.matmul_cols(w, x, np.empty((4, 1100), F)), w.astype(np.float64) @ x, 1e-5)
    dy = rng.standard_normal((4, 1100)).astype(F)
    close(blas.matmul_cols(w.T, dy, np.empty((6, 1100), F)), w.T.astype(np.float64) @ dy, 1e-5)


@pytest.mark.parametrize("groups", [2, 6])
def test_grouped_products_match_matmul(split_blas, groups):
    """Few groups: one split product each; many: one stacked matmul."""
    rng = np.random.RandomState(8)
    a, b = rng.standard_normal((groups, 3, 5)).astype(F), rng.standard_normal((groups, 5, 600)).astype(F)
    close(blas.matmul_groups(a, b, np.empty((groups, 3, 600), F)), a.astype(np.float64) @ b, 1e-5)


def test_one_blas_thread_restores_the_count():
    api = blas._numpy_openblas()
    if api is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS found in this process")
    before = api[1]()
    with pytest.raises(RuntimeError):
        with blas.one_blas_thread() as single:
            assert single and api[1]() == 1
            raise RuntimeError
    assert api[1]() == before


@pytest.mark.parametrize("cp, shape, path, group", [
    ("num_output: 5 kernel_size: 3 pad: 1 stride: 2", (3, 4, 40, 36), "im2col", 1),
    ("num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2", (3, 4, 40, 36), "im2col", 2),
    ("num_output: 6 kernel_size: 1", (2, 5, 30, 31), "pointwise", 1),
    ("num_output: 6 kernel_size: 1 group: 3", (2, 6, 30, 31), "pointwise", 3),
])
def test_convolution_with_split_products(split_blas, cp, shape, path, group):
    layer, bottom, top = make_layer(f'name: "c" type: "Convolution" convolution_param {{ {cp} }}', [shape])
    assert layer.path == path
    w, b = layer.blobs[0].data.copy(), layer.blobs[1].data.copy()
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    k, p, s = (3, 1, 2) if path == "im2col" else (1, 0, 1)
    close(y, naive_conv(bottom[0].data, w, b, k, p, s, 1, group))
    dx, dwt, _ = naive_conv_backward(bottom[0].data, w, dy, k, p, s, 1, group)
    close(bottom[0].diff, dx)
    close(layer.blobs[0].diff, dwt)


# ------------------------------------------------------------------------------------------
# LRN: running channel sums, block by block
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["whole", "blocks"])
@pytest.mark.parametrize("size, alpha, beta, k, C", [(5, 1e-2, 0.75, 1.0, 7), (3, 0.5, 0.6, 2.0, 2),
                                                     (5, 0.3, 0.75, 1.0, 3), (1, 0.3, 1.2, 1.5, 3),
                                                     (7, 2.0, 0.5, 0.5, 9)])
def test_lrn_across_channels_in_blocks(monkeypatch, split, size, alpha, beta, k, C):
    """ACROSS_CHANNELS against the loop oracle, whole-batch and one image per block in 2 threads
    (windows wider than the channel count included)."""
    if split == "blocks":
        monkeypatch.setattr(lrn, "LRN_BLOCK", 1)
        monkeypatch.setattr(i2c, "_PARALLEL_MIN", 0)
        monkeypatch.setattr(i2c, "_num_threads", lambda: 2)
    layer, bottom, top = make_layer(f'name: "n" type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} '
                                    f'beta: {beta} k: {k} }}', [(3, C, 4, 5)])
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    ref, dx = naive_lrn_across(bottom[0].data, dy, size, alpha, beta, k)
    close(y, ref)
    close(bottom[0].diff, dx)
    g = bottom[0].diff.copy()
    layer.backward(top, [True], bottom)                  # adds into the bottom diff
    close(bottom[0].diff, 2 * g, 1e-6)
    assert check_gradients(layer, bottom, top, max_checks=60) > 0


@pytest.mark.parametrize("size, alpha, beta", [(3, 0.5, 0.75), (5, 2.0, 0.5)])
def test_lrn_within_channel_in_blocks(monkeypatch, size, alpha, beta):
    """WITHIN_CHANNEL rides on AVE pooling's blocks: forced tiny, in 2 threads."""
    monkeypatch.setattr(pooling, "BLOCK", 3)
    monkeypatch.setattr(i2c, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(i2c, "_num_threads", lambda: 2)
    layer, bottom, top = make_layer(f'name: "n" type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} '
                                    f'beta: {beta} norm_region: WITHIN_CHANNEL }}', [(2, 3, 5, 6)])
    layer.forward(bottom, top)
    close(top[0].data, naive_lrn_within(bottom[0].data, size, alpha, beta))
    assert check_gradients(layer, bottom, top, max_checks=60) > 0


@pytest.mark.parametrize("ipp", ["num_output: 7", "num_output: 5 transpose: true"])
def test_inner_product_in_threaded_row_blocks(monkeypatch, split_blas, ipp):
    """InnerProduct's products (forward as (w @ x.T).T, gradients in row blocks on threads)."""
    monkeypatch.setattr(vision, "_GEMM_CHUNK", 8)
    monkeypatch.setattr(i2c, "_PARALLEL_MIN", 0)
    layer, bottom, top = make_layer(f'name: "ip" type: "InnerProduct" inner_product_param {{ {ipp} }}',
                                    [(3, 4, 2, 3)])
    (y,), (dy,) = fwd_bwd(layer, bottom, top)
    x = bottom[0].data.reshape(3, -1).astype(np.float64)
    w = layer.blobs[0].data.astype(np.float64)
    wnk = w.T if "transpose" in ipp else w
    close(y, x @ wnk.T + layer.blobs[1].data)
    close(bottom[0].diff.reshape(3, -1), dy @ wnk)
    close(layer.blobs[0].diff, (dy.T @ x).T if "transpose" in ipp else dy.T @ x)
