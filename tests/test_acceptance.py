"""Acceptance checks of the initialization, measured in real Caffe."""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils import images, magic, netio
from caffe_utils.pipeline import RunConfig, SampleSpec, run
from scripts.support.datasets import skimage_photos

pytestmark = [pytest.mark.pycaffe, pytest.mark.slow]


def test_rescaling_open_nsfw_keeps_probabilities(caffe, nsfw_model, tmp_path):
    photos = skimage_photos()
    out = tmp_path / "nsfw_rescaled.caffemodel"
    res = run(RunConfig(prototxt=str(nsfw_model["prototxt"]), output=str(out), weights=str(nsfw_model["caffemodel"]),
                        sample=SampleSpec(data=str(photos[0].parent), images=8),
                        options=magic.InitOptions(batch_size=8), engine="numpy"))
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


@pytest.mark.parametrize("init", ["kmeans", "gaussian", "xavier", "msra", "orthogonal", "pca", "zca"])
def test_numpy_and_caffe_engines_give_the_same_model(caffe, tmp_path, init):
    """The continuous initializations give the same caffemodel on both engines within rtol 1e-3
    (issue 4's decision); on this small net k-means does too."""
    from nets import SMALL
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL)
    photos = str(skimage_photos()[0].parent)
    outs = {}
    for engine in ("numpy", "caffe"):
        out = tmp_path / f"{engine}.caffemodel"
        run(RunConfig(prototxt=str(proto), output=str(out), sample=SampleSpec(data=photos, images=16),
                      options=magic.InitOptions(batch_size=8, init=init, seed=3), engine=engine))
        outs[engine] = netio.read_caffemodel(out)
        net = caffe.Net(str(proto), str(out), caffe.TEST)  # loads in real Caffe
        assert set(net.params) == {"conv1", "conv2", "fc1", "fc2"}
    for name in ("conv1", "conv2", "fc1", "fc2"):
        for a, b in zip(outs["numpy"][name].blobs, outs["caffe"][name].blobs):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(b))), err_msg=name)


@pytest.mark.slow
@pytest.mark.acceptance
def test_numpy_and_caffe_engines_agree_on_caffenet(caffe, tmp_path):
    """CaffeNet, Gaussian weights, both stages (10 between-layer rounds), same seed: the two
    engines' caffemodels agree within rtol 1e-3. (With k-means they agree on conv1-conv3 only:
    float32 differences of ~1e-6 between the engines' activations flip k-means assignments from
    conv4 on, so the clusters, not the method, differ; see README.)"""
    photos = str(skimage_photos()[0].parent)
    outs = {}
    for engine in ("numpy", "caffe"):
        out = tmp_path / f"{engine}.caffemodel"
        run(RunConfig(prototxt="models/caffenet/deploy.prototxt", output=str(out),
                      sample=SampleSpec(data=photos, images=64), options=magic.InitOptions(init="gaussian", seed=3),
                      engine=engine))
        outs[engine] = netio.read_caffemodel(out)
    names = [n for n, lw in outs["caffe"].items() if lw.blobs]
    assert names == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    for name in names:
        for a, b in zip(outs["numpy"][name].blobs, outs["caffe"][name].blobs):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(b))), err_msg=name)
