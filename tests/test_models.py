"""models/: the deploy, train_val and solver definitions of CaffeNet, GoogLeNet and VGG16."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from caffe_utils import netio
from caffe_utils.engine.numpy_net import Net
from caffe_utils.schema import caffe_pb2

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = ["caffenet", "googlenet", "vgg16"]

KEY_SHAPES = {
    "caffenet": {"data": (10, 3, 227, 227), "conv1": (10, 96, 55, 55), "pool5": (10, 256, 6, 6),
                 "fc8": (10, 1000), "prob": (10, 1000)},
    "googlenet": {"data": (10, 3, 224, 224), "inception_3a/output": (10, 256, 28, 28),
                  "inception_4e/output": (10, 832, 14, 14), "pool5/7x7_s1": (10, 1024, 1, 1),
                  "prob": (10, 1000)},
    "vgg16": {"data": (10, 3, 224, 224), "conv1_2": (10, 64, 224, 224), "pool5": (10, 512, 7, 7),
              "fc8": (10, 1000)},
}
AFFINE_COUNT = {"caffenet": 8, "googlenet": 58, "vgg16": 16}


def _shapes(name: str) -> dict:
    net = Net(MODELS / name / "deploy.prototxt", input_shapes=None)
    return {n: b.shape for n, b in net.blobs.items()}, net


@pytest.mark.parametrize("name", NAMES)
def test_deploy_blob_shapes(name):
    shapes, net = _shapes(name)
    for blob, shape in KEY_SHAPES[name].items():
        assert shapes[blob] == shape, blob
    assert sum(t in ("Convolution", "InnerProduct") for t in net.layer_types) == AFFINE_COUNT[name]
    assert net.net_param.layer[0].type == "Input"


@pytest.mark.parametrize("name", NAMES)
def test_train_val_phases(name):
    path = MODELS / name / "train_val.prototxt"
    deploy_params = {lp.name for lp in netio.read_net(MODELS / name / "deploy.prototxt").layer
                     if lp.type in ("Convolution", "InnerProduct")}
    for phase in ("TRAIN", "TEST"):
        net = netio.read_net(path, phase)
        types = [lp.type for lp in net.layer]
        assert types[0] == "Data" and sum(t == "Data" for t in types) == 1
        assert "SoftmaxWithLoss" in types
        assert ("Accuracy" in types) == (phase == "TEST")
        affine = {lp.name for lp in net.layer if lp.type in ("Convolution", "InnerProduct")}
        assert deploy_params <= affine  # the deploy net's weights load from a train_val snapshot
        for lp in net.layer:
            if lp.type in ("Convolution", "InnerProduct"):
                p = lp.convolution_param if lp.type == "Convolution" else lp.inner_product_param
                assert p.weight_filler.type in ("gaussian", "xavier"), lp.name
    if name == "googlenet":
        train = netio.read_net(path, "TRAIN")
        weights = {lp.name: list(lp.loss_weight) for lp in train.layer if lp.type == "SoftmaxWithLoss"}
        assert weights == {"loss1/loss": [pytest.approx(0.3)], "loss2/loss": [pytest.approx(0.3)],
                           "loss3/loss3": [1.0]}


@pytest.mark.parametrize("name", NAMES)
def test_solver_parses(name):
    solver = text_format.Parse((MODELS / name / "solver.prototxt").read_text(), caffe_pb2().SolverParameter())
    assert solver.net.endswith(f"models/{name}/train_val.prototxt")
    assert solver.base_lr > 0 and solver.momentum == pytest.approx(0.9)


@pytest.mark.pycaffe
@pytest.mark.parametrize("name", NAMES)
def test_caffe_builds_deploy_with_same_shapes(caffe, name):
    shapes, _ = _shapes(name)
    net = caffe.Net(str(MODELS / name / "deploy.prototxt"), caffe.TEST)
    theirs = {n: tuple(b.data.shape) for n, b in net.blobs.items() if "_split_" not in n}
    assert theirs == shapes
