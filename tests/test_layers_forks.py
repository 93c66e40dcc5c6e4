"""Tests of the fork layers (caffe_utils/layers/forks.py, detection.py, the depthwise names in
vision.py) and of Pooling's ``ceil_mode: false``.

Oracles: the loop transcriptions of each fork's CPU code in ``tests/oracles.py``; finite
differences for every backward; the real pycaffe (brocolli-caffe 9.0.2, which has ReLU6,
Permute, Normalize, PriorBox, Upsample and Pooling's ceil_mode) forward and backward through
:func:`check_against_caffe`; and cv2.dnn forward for the layers OpenCV reads (ReLU6, Permute,
ShuffleChannel, Interp, Normalize, PriorBox, ROIPooling, ConvolutionDepthwise, Pooling).
"""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_utils import netio
from caffe_utils.layers.base import LayerSetupError
from caffe_utils.layers.detection import prior_aspect_ratios
from caffe_utils.schema import schemas
from tests import gradcheck
from tests.gradcheck import check_gradients
from reference import require_cv2
from tests.oracles import (naive_conv, naive_interp, naive_normalize, naive_prior_box, naive_roi_pool,
                           naive_roi_pool_backward, naive_shuffle_channel, naive_upsample)
from tests.reference import check_against_caffe

TEST = 1
F = np.float32


def make_layer(text: str, arrays, ntop: int = 1, seed: int = 0):
    """A set-up layer (see :func:`gradcheck.make_layer`) with parameters drawn in [0.5, 2]."""
    layer, bottom, top = gradcheck.make_layer(text, arrays, ntop=ntop)
    rng = np.random.RandomState(seed)
    for p in layer.blobs:
        p.data[...] = rng.uniform(0.5, 2.0, p.shape)
    return layer, bottom, top


def rand(shape, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal(shape).astype(F)


def forward(text: str, arrays, **kw) -> np.ndarray:
    layer, bottom, top = make_layer(text, arrays, **kw)
    layer.forward(bottom, top)
    return top[0].data.copy()


def backward_adds(text: str, arrays, check_bottom=(0,)) -> None:
    """Backward adds into the bottom diff (the engine's protocol)."""
    layer, bottom, top = make_layer(text, arrays)
    layer.forward(bottom, top)
    top[0].diff[...] = rand(top[0].shape, 3)
    for i in check_bottom:
        bottom[i].diff[...] = 0
    layer.backward(top, [True] * len(bottom), bottom)
    once = [bottom[i].diff.copy() for i in check_bottom]
    layer.backward(top, [True] * len(bottom), bottom)
    for i, g in zip(check_bottom, once):
        np.testing.assert_allclose(bottom[i].diff, 2 * g, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# cv2.dnn as the forward oracle
# ------------------------------------------------------------------------------------------

def against_cv2(tmp_path, text: str, out: str, inputs, params=None, rtol: float = 1e-4) -> None:
    """Our numpy engine and cv2.dnn give the same ``out`` for ``inputs`` (and ``params``)."""
    cv2 = require_cv2()
    from caffe_utils.engine import open_net
    proto = tmp_path / "net.prototxt"
    proto.write_text(text)
    model = None
    if params:
        model = tmp_path / "net.caffemodel"
        netio.write_caffemodel(model, netio.read_net(proto), params)
    ours = open_net(proto, model, engine="numpy")
    for name, a in inputs.items():
        ours.blobs[name].data[...] = a
    ours.forward()
    want = ours.blobs[out].data.copy()
    cv_net = cv2.dnn.readNetFromCaffe(str(proto), str(model)) if model else cv2.dnn.readNetFromCaffe(str(proto))
    for name, a in inputs.items():
        cv_net.setInput(a, name)
    got = cv_net.forward(out)
    assert got.size == want.size, f"cv2 gives {got.shape}, we give {want.shape}"
    scale = max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=0, atol=rtol * scale)


def _net(shape, body: str, name: str = "data") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n' + body


# ------------------------------------------------------------------------------------------
# ReLU6
# ------------------------------------------------------------------------------------------

RELU6 = 'type: "ReLU6" relu6_param {{ negative_slope: {} threshold: {} }}'


@pytest.mark.parametrize("slope,threshold", [(0.0, 6.0), (0.1, 1.0)])
def test_relu6_matches_formula_and_gradients(slope, threshold):
    x = 3 * rand((2, 3, 4, 4))
    y = forward(RELU6.format(slope, threshold), [x])
    want = [min(max(v, 0) + slope * min(v, 0), threshold) for v in x.ravel().tolist()]
    np.testing.assert_allclose(y.ravel(), want, rtol=1e-6)
    layer, bottom, top = make_layer(RELU6.format(slope, threshold), [x])
    assert check_gradients(layer, bottom, top, kink=0.0, kink_range=0.02) > 50
    backward_adds(RELU6.format(slope, threshold), [x])


@pytest.mark.parametrize("params", ["", "relu6_param { negative_slope: 0.2 threshold: 2 }"])
def test_relu6_against_caffe(tmp_path, params):
    net = _net((2, 3, 4, 5), f'layer {{ name: "c" type: "Convolution" bottom: "data" top: "c" '
                             f'convolution_param {{ num_output: 4 kernel_size: 1 }} }}\n'
                             f'layer {{ name: "r" type: "ReLU6" bottom: "c" top: "r" {params} }}')
    check_against_caffe(tmp_path, net, {"data": 6 * rand((2, 3, 4, 5))})


def test_relu6_against_cv2(tmp_path):
    net = _net((2, 3, 4, 5), 'layer { name: "r" type: "ReLU6" bottom: "data" top: "r" }')
    against_cv2(tmp_path, net, "r", {"data": 6 * rand((2, 3, 4, 5))})


# ------------------------------------------------------------------------------------------
# Permute and ShuffleChannel
# ------------------------------------------------------------------------------------------

def _permute(order) -> str:
    return 'type: "Permute" permute_param { ' + " ".join(f"order: {o}" for o in order) + " }"


@pytest.mark.parametrize("order,full", [((0, 2, 3, 1), (0, 2, 3, 1)), ((3, 1), (3, 1, 0, 2)), ((), (0, 1, 2, 3))])
def test_permute_matches_transpose_and_gradients(order, full):
    x = rand((2, 3, 4, 5))
    np.testing.assert_array_equal(forward(_permute(order), [x]), x.transpose(full))
    layer, bottom, top = make_layer(_permute(order), [x])
    assert check_gradients(layer, bottom, top) > 50
    backward_adds(_permute(order), [x])


@pytest.mark.parametrize("order", [(0, 4), (1, 1)])
def test_permute_bad_order(order):
    with pytest.raises(LayerSetupError, match="order"):
        make_layer(_permute(order), [rand((2, 3, 4, 5))])


def test_permute_against_caffe_and_cv2(tmp_path):
    net = _net((2, 3, 4, 5), 'layer { name: "p" type: "Permute" bottom: "data" top: "p" '
                             'permute_param { order: 0 order: 2 order: 3 order: 1 } }\n'
                             'layer { name: "ip" type: "InnerProduct" bottom: "p" top: "ip" inner_product_param { num_output: 3 } }')
    check_against_caffe(tmp_path, net)
    against_cv2(tmp_path, net.split("layer { name: \"ip\"")[0], "p", {"data": rand((2, 3, 4, 5))})


SHUFFLE = 'type: "ShuffleChannel" shuffle_channel_param {{ group: {} }}'


@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_shuffle_channel_matches_loop_and_gradients(group):
    x = rand((2, 6, 3, 2))
    np.testing.assert_array_equal(forward(SHUFFLE.format(group), [x]), naive_shuffle_channel(x, group))
    layer, bottom, top = make_layer(SHUFFLE.format(group), [x])
    assert check_gradients(layer, bottom, top) > 50
    backward_adds(SHUFFLE.format(group), [x])


def test_shuffle_channel_needs_a_divisor():
    with pytest.raises(LayerSetupError, match="multiple of group"):
        make_layer(SHUFFLE.format(4), [rand((1, 6, 2, 2))])


def test_shuffle_channel_against_cv2(tmp_path):
    net = _net((2, 6, 3, 4), 'layer { name: "s" type: "ShuffleChannel" bottom: "data" top: "s" '
                             'shuffle_channel_param { group: 3 } }')
    against_cv2(tmp_path, net, "s", {"data": rand((2, 6, 3, 4))})


# ------------------------------------------------------------------------------------------
# Upsample and Interp
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,scale,dims", [((2, 3, 3, 4), 2, 4), ((1, 2, 2, 3), 3, 4), ((2, 3, 5), 2, 3)])
def test_upsample_matches_loop_and_gradients(shape, scale, dims):
    text = f'type: "Upsample" upsample_param {{ scale: {scale} dims_num: {dims} }}'
    x = rand(shape)
    np.testing.assert_array_equal(forward(text, [x]), naive_upsample(x, scale))
    layer, bottom, top = make_layer(text, [x])
    assert check_gradients(layer, bottom, top) == x.size
    backward_adds(text, [x])


def test_upsample_against_caffe_forward(tmp_path):
    """brocolli's Upsample has an empty CPU backward (deploy only): forward is compared."""
    net = _net((2, 3, 3, 4), 'layer { name: "u" type: "Upsample" bottom: "data" top: "u" upsample_param { scale: 2 } }')
    check_against_caffe(tmp_path, net, backward=False)


INTERP = 'type: "Interp" interp_param {{ {} }}'


@pytest.mark.parametrize("spec,shape,out", [
    ("zoom_factor: 2", (2, 3, 4, 5), (7, 9)),
    ("shrink_factor: 2", (1, 2, 7, 8), (4, 4)),
    ("zoom_factor: 3 shrink_factor: 2", (1, 2, 7, 6), (10, 7)),
    ("height: 5 width: 1", (1, 2, 3, 4), (5, 1)),
    ("height: 6 width: 7 pad_beg: -1 pad_end: -1", (1, 2, 5, 6), (6, 7)),
    ("zoom_factor: 2 pad_end: -1", (1, 1, 4, 4), (5, 5)),
])
def test_interp_matches_loop_and_gradients(spec, shape, out):
    x = rand(shape)
    p = dict(zip(spec.split()[::2], spec.split()[1::2]))
    y = forward(INTERP.format(spec), [x])
    assert y.shape[2:] == out
    want = naive_interp(x, *out, int(p.get("pad_beg:", 0)), int(p.get("pad_end:", 0)))
    np.testing.assert_array_equal(y, want)
    layer, bottom, top = make_layer(INTERP.format(spec), [x])
    assert check_gradients(layer, bottom, top, max_checks=200) > 5
    backward_adds(INTERP.format(spec), [x])


@pytest.mark.parametrize("spec,match", [("", "zoom_factor"), ("pad_beg: 1 zoom_factor: 2", "non-pos"),
                                        ("zoom_factor: 0", "Zoom factor")])
def test_interp_errors(spec, match):
    with pytest.raises(LayerSetupError, match=match):
        make_layer(INTERP.format(spec), [rand((1, 1, 3, 3))])


@pytest.mark.parametrize("spec", ["zoom_factor: 2", "height: 9 width: 5", "height: 3 width: 4"])
def test_interp_against_cv2(tmp_path, spec):
    """(OpenCV's Interp has no shrink_factor.)"""
    net = _net((2, 3, 5, 6), f'layer {{ name: "i" type: "Interp" bottom: "data" top: "i" interp_param {{ {spec} }} }}')
    against_cv2(tmp_path, net, "i", {"data": rand((2, 3, 5, 6))})


# ------------------------------------------------------------------------------------------
# Normalize
# ------------------------------------------------------------------------------------------

NORM = 'type: "Normalize" norm_param {{ across_spatial: {} channel_shared: {} eps: {} }}'
NORM_CASES = [(a, c) for a in ("true", "false") for c in ("true", "false")]


@pytest.mark.parametrize("across,shared", NORM_CASES)
def test_normalize_matches_loop(across, shared):
    x = rand((2, 3, 2, 3))
    layer, bottom, top = make_layer(NORM.format(across, shared, 0.01), [x])
    layer.forward(bottom, top)
    want = naive_normalize(x, layer.blobs[0].data.reshape(-1), across == "true", shared == "true", 0.01)
    np.testing.assert_allclose(top[0].data, want, rtol=1e-5)


@pytest.mark.parametrize("across,shared", NORM_CASES)
def test_normalize_gradients(across, shared):
    """The true gradient where SSD's backward is one (shared or uniform scale); with a
    per-channel scale SSD's bottom gradient is not differentiated through it (checked against
    pycaffe below), and the scale's own gradient is exact."""
    x = rand((2, 3, 2, 3))
    layer, bottom, top = make_layer(NORM.format(across, shared, 0.01), [x])
    assert check_gradients(layer, bottom, top, check_bottom=[] if shared == "false" else None) >= 3
    layer.blobs[0].data[...] = 1.7
    assert check_gradients(layer, bottom, top) > 30
    backward_adds(NORM.format(across, shared, 0.01), [x])


@pytest.mark.parametrize("across,shared", NORM_CASES)
def test_normalize_against_caffe(tmp_path, across, shared):
    net = _net((2, 3, 4, 3), f'layer {{ name: "n" type: "Normalize" bottom: "data" top: "n" norm_param {{ '
                             f'across_spatial: {across} channel_shared: {shared} scale_filler {{ type: "constant" value: 20 }} }} }}')
    check_against_caffe(tmp_path, net)


@pytest.mark.parametrize("across,shared", [("false", "false")])
def test_normalize_against_cv2(tmp_path, across, shared):
    """(OpenCV refuses a per-channel scale with across_spatial, and cannot read Caffe's 0-axis
    blob of a shared scale: only SSD's usual conv4_3_norm setting is compared.)"""
    net = _net((2, 3, 4, 3), f'layer {{ name: "n" type: "Normalize" bottom: "data" top: "n" norm_param {{ '
                             f'across_spatial: {across} channel_shared: {shared} }} }}')
    scale = np.array(2.5, F) if shared == "true" else np.array([0.5, 2.0, 3.0], F)
    against_cv2(tmp_path, net, "n", {"data": rand((2, 3, 4, 3))}, {"n": [scale]})


def test_normalize_shared_scale_round_trips(tmp_path):
    """A shared scale is a 0-axis blob, as in Caffe, and is written and read back as one."""
    from caffe_utils.engine import open_net
    p = tmp_path / "n.prototxt"
    p.write_text(_net((1, 3, 2, 2), 'layer { name: "n" type: "Normalize" bottom: "data" top: "n" }'))
    model = tmp_path / "n.caffemodel"
    netio.write_caffemodel(model, netio.read_net(p), {"n": [np.array(2.5, F)]})
    assert netio.read_caffemodel(model)["n"].blobs[0].shape == ()
    assert open_net(p, model, engine="numpy").params["n"][0].data.tolist() == 2.5


def test_normalize_default_scale_is_one(tmp_path):
    from caffe_utils.engine import open_net
    p = tmp_path / "n.prototxt"
    p.write_text(_net((1, 3, 2, 2), 'layer { name: "n" type: "Normalize" bottom: "data" top: "n" }'))
    assert open_net(p, engine="numpy").params["n"][0].data.tolist() == 1.0


# ------------------------------------------------------------------------------------------
# PriorBox
# ------------------------------------------------------------------------------------------

PRIOR_CASES = [
    "min_size: 10.7 max_size: 21 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: true "
    "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2",
    "min_size: 10 min_size: 20 aspect_ratio: 2 aspect_ratio: 2 flip: false step: 8 offset: 0.25 variance: 0.1",
    "min_size: 30 max_size: 60 aspect_ratio: 2 img_h: 50 img_w: 60 step_h: 9 step_w: 11 variance: 0.2",
]


def _prior_args(spec: str):
    from caffe_utils.engine.numpy_net import Net  # noqa: F401  (schema loaded)
    for pb2 in schemas():
        try:
            return text_format.Parse(spec, pb2.PriorBoxParameter())
        except text_format.ParseError:
            continue


@pytest.mark.parametrize("spec", PRIOR_CASES)
def test_prior_box_matches_loop(spec):
    feat, img = rand((3, 2, 4, 5)), rand((3, 3, 40, 48))
    y = forward(f'type: "PriorBox" prior_box_param {{ {spec} }}', [feat, img])
    p = _prior_args(spec)
    ih, iw = (p.img_h, p.img_w) if p.img_h else (40, 48)
    step = (p.step_h, p.step_w) if p.step_h else ((p.step, p.step) if p.step else None)
    want = naive_prior_box((4, 5), (ih, iw), list(p.min_size), list(p.max_size),
                           prior_aspect_ratios(p.aspect_ratio, p.flip), p.clip, list(p.variance) or [0.1],
                           step, p.offset)
    assert y.shape[0] == 1  # whatever the batch
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)


def test_prior_box_no_gradient_and_errors():
    layer, bottom, top = make_layer('type: "PriorBox" prior_box_param { min_size: 4 }', [rand((1, 1, 2, 2)), rand((1, 3, 8, 8))])
    assert not layer.can_propagate(0) and not layer.can_propagate(1)
    for spec, match in [("max_size: 3", "min_size"), ("min_size: 4 max_size: 3", "greater"),
                        ("min_size: 4 variance: 0.1 variance: 0.2", "variance"), ("min_size: 4 step: 2 step_h: 3", "not both")]:
        with pytest.raises(LayerSetupError, match=match):
            make_layer(f'type: "PriorBox" prior_box_param {{ {spec} }}', [rand((1, 1, 2, 2)), rand((1, 3, 8, 8))])


def _prior_net(spec: str) -> str:
    return (_net((2, 3, 4, 5), "") + _net((2, 3, 40, 48), "", "im")
            + f'layer {{ name: "pb" type: "PriorBox" bottom: "data" bottom: "im" top: "pb" prior_box_param {{ {spec} }} }}')


@pytest.mark.parametrize("spec", PRIOR_CASES)
def test_prior_box_against_caffe(tmp_path, spec):
    check_against_caffe(tmp_path, _prior_net(spec), backward=False)


@pytest.mark.parametrize("spec", [PRIOR_CASES[1], "min_size: 30 max_size: 60 aspect_ratio: 2 step_h: 9 step_w: 11 variance: 0.2"])
def test_prior_box_against_cv2(tmp_path, spec):
    """(OpenCV ignores img_h/img_w, which pycaffe and SSD honour: not compared here.)"""
    inputs = {"data": rand((2, 3, 4, 5)), "im": rand((2, 3, 40, 48))}
    against_cv2(tmp_path, _prior_net(spec + " clip: false"), "pb", inputs, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# ROIPooling
# ------------------------------------------------------------------------------------------

ROIS = np.array([[0, 0, 0, 15, 15], [1, 8, 4, 40, 30], [1, -10, -6, 12, 9.5], [0, 17.6, 9, 18, 9],
                 [1, 2.5, 6.5, 55, 70], [0, 50, 50, 60, 60]], F)
ROI = 'type: "ROIPooling" roi_pooling_param {{ pooled_h: {} pooled_w: {} spatial_scale: {} }}'


@pytest.mark.parametrize("ph,pw,scale", [(2, 2, 0.25), (3, 2, 0.5), (1, 1, 1.0)])
def test_roi_pooling_matches_loop(ph, pw, scale):
    x = rand((2, 3, 9, 11))
    layer, bottom, top = make_layer(ROI.format(ph, pw, scale), [x, ROIS])
    layer.forward(bottom, top)
    want, arg = naive_roi_pool(x, ROIS, ph, pw, scale)
    np.testing.assert_array_equal(top[0].data, want)
    dy = rand(top[0].shape, 4)
    top[0].diff[...] = dy
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, naive_roi_pool_backward(x.shape, ROIS, dy, arg), rtol=1e-6, atol=1e-6)
    assert not bottom[1].diff.any() and not layer.can_propagate(1)


def test_roi_pooling_gradients():
    x = rand((2, 3, 9, 11))
    layer, bottom, top = make_layer(ROI.format(2, 3, 0.25), [x, ROIS])
    assert check_gradients(layer, bottom, top, step=1e-3, kink_range=0.0) > 50
    backward_adds(ROI.format(2, 3, 0.25), [x, ROIS])


def test_roi_pooling_errors():
    with pytest.raises(LayerSetupError, match="pooled_h"):
        make_layer(ROI.format(0, 2, 1), [rand((1, 1, 4, 4)), ROIS[:1]])
    layer, bottom, top = make_layer(ROI.format(2, 2, 1), [rand((1, 1, 4, 4)), ROIS[1:2]])
    with pytest.raises(LayerSetupError, match="batch index"):
        layer.forward(bottom, top)


def test_roi_pooling_against_cv2(tmp_path):
    net = (_net((2, 3, 9, 11), "") + _net((len(ROIS), 5), "", "rois")
           + 'layer { name: "roi" type: "ROIPooling" bottom: "data" bottom: "rois" top: "roi" '
             'roi_pooling_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.25 } }')
    against_cv2(tmp_path, net, "roi", {"data": rand((2, 3, 9, 11)), "rois": ROIS})


# ------------------------------------------------------------------------------------------
# Grouped and depthwise convolution
# ------------------------------------------------------------------------------------------

def _conv(ltype: str, num_output: int, group=None, extra: str = "") -> str:
    g = f" group: {group}" if group else ""
    return (f'type: "{ltype}" convolution_param {{ num_output: {num_output} kernel_size: 3 pad: 1 stride: 2'
            f'{g} {extra} }}')


@pytest.mark.parametrize("ltype", ["Convolution", "DepthwiseConvolution"])
@pytest.mark.parametrize("group,num_output", [(1, 4), (2, 4), (3, 6), (6, 6), (6, 12)])
def test_convolution_at_every_group_count(ltype, group, num_output):
    x = rand((2, 6, 5, 4))
    layer, bottom, top = make_layer(_conv(ltype, num_output, group), [x])
    layer.forward(bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(top[0].data, naive_conv(x, w, b, 3, 1, 2, 1, group), rtol=1e-5, atol=1e-5)
    assert check_gradients(layer, bottom, top, max_checks=60) > 100


def test_convolution_depthwise_ignores_group():
    """ConvolutionDepthwise convolves each channel alone, whatever ``group`` says."""
    x = rand((2, 4, 5, 5))
    for group in (None, 1, 4):
        layer, bottom, top = make_layer(_conv("ConvolutionDepthwise", 4, group, "dilation: 2"), [x])
        assert layer.blobs[0].shape == (4, 1, 3, 3) and layer.group == 4
        layer.forward(bottom, top)
        want = naive_conv(x, layer.blobs[0].data, layer.blobs[1].data, 3, 1, 2, 2, 4)
        np.testing.assert_allclose(top[0].data, want, rtol=1e-5, atol=1e-5)
    assert check_gradients(layer, bottom, top, max_checks=60) == 100
    with pytest.raises(LayerSetupError, match="num_output"):
        make_layer(_conv("ConvolutionDepthwise", 8), [x])


def test_grouped_convolution_against_caffe(tmp_path):
    net = _net((2, 6, 7, 6), 'layer { name: "a" type: "Convolution" bottom: "data" top: "a" '
                             'convolution_param { num_output: 12 kernel_size: 3 group: 6 } }\n'
                             'layer { name: "b" type: "Convolution" bottom: "a" top: "b" '
                             'convolution_param { num_output: 6 kernel_size: 1 group: 3 } }')
    check_against_caffe(tmp_path, net)


def test_convolution_depthwise_against_cv2(tmp_path):
    """OpenCV reads ConvolutionDepthwise as Convolution (so ``group`` must be given to it)."""
    net = _net((2, 4, 6, 5), 'layer { name: "dw" type: "ConvolutionDepthwise" bottom: "data" top: "dw" '
                             'convolution_param { num_output: 4 group: 4 kernel_size: 3 pad: 1 } }')
    params = {"dw": [rand((4, 1, 3, 3), 1), rand((4,), 2)]}
    against_cv2(tmp_path, net, "dw", {"data": rand((2, 4, 6, 5))}, params)


# ------------------------------------------------------------------------------------------
# Pooling with ceil_mode: false
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["pool: MAX kernel_size: 3 stride: 2", "pool: AVE kernel_size: 3 stride: 2 pad: 1",
                                  "pool: MAX kernel_size: 2 stride: 3 pad: 1"])
def test_pooling_floor_against_caffe_and_cv2(tmp_path, spec):
    net = _net((2, 3, 8, 10), f'layer {{ name: "p" type: "Pooling" bottom: "data" top: "p" '
                              f'pooling_param {{ {spec} ceil_mode: false }} }}')
    check_against_caffe(tmp_path, net)
    against_cv2(tmp_path, net, "p", {"data": rand((2, 3, 8, 10))})


