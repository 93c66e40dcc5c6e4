"""Acceptance checks of the initialization, measured in real Caffe."""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils import images, magic, netio
from caffe_utils.datasets import skimage_photos
from caffe_utils.pipeline import RunConfig, run

pytestmark = [pytest.mark.pycaffe, pytest.mark.slow]


def test_rescaling_open_nsfw_keeps_probabilities(caffe, nsfw_model, tmp_path):
    photos = skimage_photos()
    out = tmp_path / "nsfw_rescaled.caffemodel"
    res = run(RunConfig(prototxt=str(nsfw_model["prototxt"]), output=str(out),
                        weights=str(nsfw_model["caffemodel"]), data=str(photos[0].parent), images=8,
                        batch_size=8, engine="numpy"))
    rep = res.report
    assert all(l.initialized == "kept" for l in rep.layers)
    assert rep.function_preserved
    assert rep.flatness_after < rep.flatness_before / 3
    # held-out check in real Caffe: other crops of the photos, original vs rescaled weights
    prepared = magic.prepare_net(netio.read_net(nsfw_model["prototxt"]))
    c, h, w = prepared.input_shape
    x = images.load_sample(images.list_source(str(photos[0].parent)), 6, images.Transform(c, h, w),
                           np.random.RandomState(123)).data
    probs = []
    for weights in (nsfw_model["caffemodel"], out):
        net = caffe.Net(str(nsfw_model["prototxt"]), str(weights), caffe.TEST)
        net.blobs["data"].reshape(*x.shape)
        net.reshape()
        net.blobs["data"].data[...] = x
        probs.append(net.forward()["prob"].copy())
    assert np.max(np.abs(probs[0] - probs[1])) <= 1e-4
    assert np.std(probs[0][:, 1]) > 1e-3  # the photos give different outputs: a real test
