"""Faster R-CNN-style nets end to end: the second input ``im_info``, the Python proposal layer
as a head whose inputs get the random top gradient, and ROIPooling over its rois."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from caffe_utils import netio
from caffe_utils.errors import PrototxtError
from caffe_utils.magic import prepare_net

PYLAYERS = Path(__file__).resolve().parent / "pylayers"

#: py-faster-rcnn's test-net layout at toy size: legacy inputs data and im_info, a stride-16
#: trunk, the RPN, our proposal layer, ROIPooling and the two fc heads
FRCNN = """name: "tiny_frcnn"
input: "data"
input_shape {{ dim: 1 dim: 3 dim: 48 dim: 48 }}
input: "{aux}"
input_shape {{ {aux_dims} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param {{ num_output: 6 kernel_size: 3 stride: 2 pad: 1 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param {{ num_output: 8 kernel_size: 3 stride: 2 pad: 1 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "conv5" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "rpn_conv/3x3" type: "Convolution" bottom: "conv5" top: "rpn/output"
        convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "rpn_relu/3x3" type: "ReLU" bottom: "rpn/output" top: "rpn/output" }}
layer {{ name: "rpn_cls_score" type: "Convolution" bottom: "rpn/output" top: "rpn_cls_score"
        convolution_param {{ num_output: 18 kernel_size: 1 }} }}
layer {{ name: "rpn_bbox_pred" type: "Convolution" bottom: "rpn/output" top: "rpn_bbox_pred"
        convolution_param {{ num_output: 36 kernel_size: 1 }} }}
layer {{ name: "rpn_cls_score_reshape" type: "Reshape" bottom: "rpn_cls_score" top: "rpn_cls_score_reshape"
        reshape_param {{ shape {{ dim: 0 dim: 2 dim: -1 dim: 0 }} }} }}
layer {{ name: "rpn_cls_prob" type: "Softmax" bottom: "rpn_cls_score_reshape" top: "rpn_cls_prob" }}
layer {{ name: "rpn_cls_prob_reshape" type: "Reshape" bottom: "rpn_cls_prob" top: "rpn_cls_prob_reshape"
        reshape_param {{ shape {{ dim: 0 dim: 18 dim: -1 dim: 0 }} }} }}
layer {{ name: "proposal" type: "Python" bottom: "rpn_cls_prob_reshape" bottom: "rpn_bbox_pred" bottom: "{aux}"
        top: "rois" python_param {{ module: "rpn.proposal_layer" layer: "{proposal}"
        param_str: "'feat_stride': 16, 'scales': [1, 2, 4], 'rois_per_image': 4" }} }}
layer {{ name: "roi_pool5" type: "ROIPooling" bottom: "conv5" bottom: "rois" top: "pool5"
        roi_pooling_param {{ pooled_w: 2 pooled_h: 2 spatial_scale: 0.0625 }} }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param {{ num_output: 16 }} }}
layer {{ name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }}
layer {{ name: "cls_score" type: "InnerProduct" bottom: "fc6" top: "cls_score" inner_product_param {{ num_output: 3 }} }}
layer {{ name: "bbox_pred" type: "InnerProduct" bottom: "fc6" top: "bbox_pred" inner_product_param {{ num_output: 12 }} }}
layer {{ name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" }}
"""


def _write(tmp_path: Path, aux: str = "im_info", aux_dims: str = "dim: 1 dim: 3", proposal: str = "ProposalLayer") -> Path:
    p = tmp_path / "tiny_frcnn.prototxt"
    p.write_text(FRCNN.format(aux=aux, aux_dims=aux_dims, proposal=proposal))
    return p


@pytest.fixture
def on_path(monkeypatch):
    """``rpn.proposal_layer`` importable, as on a py-faster-rcnn user's PYTHONPATH."""
    monkeypatch.syspath_prepend(str(PYLAYERS))


def _cli(args):
    from click.testing import CliRunner
    from magic_init import cli
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_initializes_a_two_input_faster_rcnn_net(tmp_path, photos, on_path):
    """py-faster-rcnn's test net (batch 1, im_info (1, 3)) at batch 2: im_info gets a row per
    image, the proposal layer is listed as a head, and every affine layer got a finite rate."""
    p, out, report = _write(tmp_path), tmp_path / "init.caffemodel", tmp_path / "report.json"
    res = _cli([p, "-o", out, "-d", photos, "-n", 4, "--batch-size", 2, "--iterations", 2, "--engine", "numpy",
                "--report", report])
    assert res.exit_code == 0, res.output
    assert "heads the method ends at (their inputs get the random top gradient): proposal" in res.output
    rep = json.loads(report.read_text())
    assert rep["heads"] == ["proposal"]
    layers = {l["name"]: l for l in rep["layers"]}
    assert set(layers) == {"conv1", "conv2", "rpn_conv/3x3", "rpn_cls_score", "rpn_bbox_pred", "fc6", "cls_score",
                           "bbox_pred"}
    assert all(np.isfinite(l["rate_after"]) and l["rate_after"] > 0 for l in layers.values()), layers
    assert {name for name, layer in netio.read_caffemodel(out).items() if layer.blobs} == set(layers)


def test_a_proposal_layer_for_one_image_per_batch_asks_for_batch_size_1(tmp_path, photos, on_path):
    """py-faster-rcnn's own proposal layer asserts batches of one image: at --batch-size 2 its
    failure is one line that says what to do; at --batch-size 1 the net initializes."""
    p, out = _write(tmp_path, proposal="SingleImageProposalLayer"), tmp_path / "one.caffemodel"
    args = [p, "-o", out, "-d", photos, "-n", 2, "--iterations", 1, "--engine", "numpy", "-q", "--batch-size"]
    res = _cli(args + [2])
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert res.exit_code != 0 and len(lines) == 1, res.output
    assert "'proposal'" in lines[0] and "Only single item batches" in lines[0] and "--batch-size 1" in lines[0]
    res = _cli(args + [1])
    assert res.exit_code == 0 and out.exists(), res.output


def test_im_info_is_filled_per_batch_with_the_input_size(tmp_path):
    """The prepared net keeps im_info beside the images; opened at batch 3 it holds
    [H, W, 1.0] per image, and the proposal layer's inputs are gradient starts."""
    from caffe_utils.engine.numpy_net import net_outputs
    from caffe_utils.pipeline import _open_prepared
    prepared = prepare_net(netio.read_net(str(_write(tmp_path))))
    assert prepared.aux_inputs == {"im_info": (3,)} and prepared.heads == ["proposal"]
    proposal = next(lp for lp in prepared.net_param.layer if lp.name == "proposal")
    assert list(proposal.propagate_down) == [False, False, False]
    assert net_outputs(prepared.net_param) == ["cls_score", "bbox_pred", "rpn_bbox_pred", "rpn_cls_prob_reshape"]
    net = _open_prepared(prepared, "numpy", None, 3, 0)
    np.testing.assert_array_equal(net.blobs["im_info"].data, [[48, 48, 1]] * 3)


def test_an_input_the_tool_cannot_fill_is_one_line(tmp_path, photos, on_path):
    p = _write(tmp_path, aux="gt_boxes")
    with pytest.raises(PrototxtError, match=r"\['gt_boxes'\] besides the images 'data'.*im_info"):
        prepare_net(netio.read_net(str(p)))
    res = _cli([p, "-o", tmp_path / "x.caffemodel", "-d", photos, "-n", 2, "--batch-size", 2, "--engine", "numpy"])
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and "gt_boxes" in lines[0], res.output


def test_im_info_of_another_shape_is_one_line(tmp_path):
    with pytest.raises(PrototxtError, match=r"input 'im_info' .* shape \(1, 4\).*\(N, 3\)"):
        prepare_net(netio.read_net(str(_write(tmp_path, aux_dims="dim: 1 dim: 4"))))


GRADIENT_START = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 2 dim: 5 dim: 5 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "head" type: "Convolution" bottom: "conv1" top: "head" propagate_down: false
        convolution_param { num_output: 2 kernel_size: 1 } }
"""
#: two heads read the gradient start: pycaffe copies it through a Split, skipped too
TWO_HEADS = GRADIENT_START + """
layer { name: "head2" type: "Pooling" bottom: "conv1" top: "head2" propagate_down: false
        pooling_param { pool: MAX kernel_size: 2 } }
"""


@pytest.mark.pycaffe
@pytest.mark.parametrize("text", [GRADIENT_START, TWO_HEADS], ids=["one_head", "two_heads"])
def test_both_engines_start_the_gradient_at_a_heads_inputs(caffe, tmp_path, text):
    """A blob read only with ``propagate_down: false`` is an output on both engines, and the
    diff put on it reaches the layer below unchanged (pycaffe's force_backward would overwrite
    it from the head's backward: the adapter skips that layer)."""
    from caffe_utils.engine import open_net
    p = tmp_path / "start.prototxt"
    p.write_text(text)
    rng = np.random.RandomState(0)
    nets = [open_net(str(p), engine=e) for e in ("numpy", "caffe")]
    data, eta = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((2, 3, 3, 3))
    ref = open_net(str(p), engine="numpy")
    for net in nets + [ref]:
        net.params["conv1"][0].data[...] = nets[0].params["conv1"][0].data
        net.params["head"][0].data[...] = nets[0].params["head"][0].data
        net.set_data("data", data)
        net.forward()
        net.clear_param_diffs()
    for net in nets:
        assert net.outputs == (["head", "head2", "conv1"] if "head2" in text else ["head", "conv1"])
        for o in net.outputs:
            net.blobs[o].diff[...] = 1
        net.blobs["conv1"].diff[...] = eta
        net.backward()
    ref.backward(start="conv1", conv1=eta.astype(np.float32))  # conv1's gradient from eta alone
    for net in nets:
        np.testing.assert_allclose(net.params["conv1"][0].diff, ref.params["conv1"][0].diff, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nets[1].params["head"][0].diff, nets[0].params["head"][0].diff, rtol=1e-4, atol=1e-6)


PROPOSALS = """
layer {{ name: "in" type: "Input" top: "scores" top: "deltas" top: "im_info"
        input_param {{ shape {{ dim: 2 dim: 6 dim: 2 dim: 3 }} shape {{ dim: 2 dim: 12 dim: 2 dim: 3 }}
                      shape {{ dim: {rows} dim: 3 }} }} }}
layer {{ name: "proposal" type: "Python" bottom: "scores" bottom: "deltas" bottom: "im_info" top: "rois" top: "p"
        python_param {{ module: "rpn.proposal_layer" layer: "ProposalLayer"
                       param_str: "'feat_stride': 16, 'scales': [1], 'rois_per_image': 2" }} }}
"""


@pytest.mark.parametrize("rows", [1, 2])
def test_our_proposal_layer_keeps_the_best_anchors_moved_and_clipped(tmp_path, on_path, rows):
    """3 anchors (ratios 0.5, 1, 2 of a 16-pixel box) per cell of a 2 x 3 map: the two best
    foreground scores of each image, their anchors moved by the deltas and clipped to im_info's
    size (one row for all images, or one each), behind the batch index."""
    from caffe_utils.engine.numpy_net import Net
    p = tmp_path / "proposals.prototxt"
    p.write_text(PROPOSALS.format(rows=rows))
    net = Net(p)
    scores = np.zeros((2, 6, 2, 3), np.float32)
    scores[0, 3 + 1, 1, 2] = 0.9  # image 0: anchor 1 (ratio 1) at cell (y 1, x 2) best
    scores[0, 3 + 0, 0, 0] = 0.8  # then anchor 0 (ratio 0.5) at cell (0, 0)
    scores[1, 3 + 2, 0, 1] = 0.7  # image 1: anchor 2 (ratio 2) at cell (0, 1), then the first anchor
    deltas = np.zeros((2, 12, 2, 3), np.float32)
    deltas[0, 4 * 1 + 0, 1, 2] = 0.5  # moves image 0's best box right by half its width (16 px)
    net.blobs["scores"].data[...] = scores
    net.blobs["deltas"].data[...] = deltas
    net.blobs["im_info"].data[...] = [[40, 45, 1.0], [30, 20, 1.0]][:rows]
    net.forward()
    rois, kept = net.blobs["rois"].data, net.blobs["p"].data
    np.testing.assert_array_equal(rois[:, 0], [0, 0, 1, 1])
    np.testing.assert_allclose(kept[:, 0], [0.9, 0.8, 0.7, 0.0])
    # image 0: the 16 x 16 box around (16 * 2 + 7.5 + 8, 16 + 7.5), clipped to x <= 44
    np.testing.assert_allclose(rois[0, 1:], [40, 16, 44, 31], atol=1e-4)
    w, h = 16 / np.sqrt(0.5), 16 * np.sqrt(0.5)  # ratio 0.5 (h / w) at cell (0, 0), clipped at 0
    np.testing.assert_allclose(rois[1, 1:], [0, 7.5 - (h - 1) / 2, 7.5 + (w - 1) / 2, 7.5 + (h - 1) / 2], atol=1e-4)
    height, width = (40, 45) if rows == 1 else (30, 20)
    w, h = 16 / np.sqrt(2), 16 * np.sqrt(2)  # ratio 2 at cell (0, 1) of image 1
    want = [16 + 7.5 - (w - 1) / 2, 0, min(16 + 7.5 + (w - 1) / 2, width - 1), min(7.5 + (h - 1) / 2, height - 1)]
    np.testing.assert_allclose(rois[2, 1:], want, atol=1e-4)


def test_pycaffe_engine_refuses_roipooling_backward_on_the_cpu():
    """caffe-fast-rcnn's ROIPooling has no CPU backward (Caffe would abort): refused in one
    error naming the layer, on the CPU only. (brocolli's pycaffe has no ROIPooling to build, so
    the adapter is given a stand-in of the Caffe net it wraps.)"""
    from types import SimpleNamespace
    from caffe_utils.engine.caffe_net import CaffeNet
    from caffe_utils.errors import EngineError
    net = CaffeNet.__new__(CaffeNet)
    net._net = SimpleNamespace(_layer_names=["data", "roi_pool5", "fc6"],
                               layers=[SimpleNamespace(type=t) for t in ("Input", "ROIPooling", "InnerProduct")])
    net.no_gradient_layers, net.gpu = [], None
    with pytest.raises(EngineError, match=r"'roi_pool5' \(ROIPooling\) has no CPU backward.*--gpu.*--engine numpy"):
        net.check_backward()
    net.check_backward(start="fc6", end="fc6")
    net.gpu = 0
    net.check_backward()
