"""Acceptance of the initialization on the paper's nets, measured in real Caffe on held-out photos.

Initializes models/<net>/deploy.prototxt from 160 random crops of half of the photos that
Debian's opencv-doc and scikit-image carry (the CLI's defaults: k-means, 10 rounds), then
measures the change rates in real Caffe on crops of the other half (160; 64 for VGG16): every affine layer's
rate is within the issue's factor of every other's. With --no-between, every output channel
of every affine layer has std within 10% of 1 on the initialization images.
"""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils import images, magic, measure, netio
from caffe_utils.engine.caffe_net import CaffeNet
from caffe_utils.pipeline import RunConfig, SampleSpec, run
from scripts.support.datasets import held_out_split, opencv_doc_photos, skimage_photos

pytestmark = [pytest.mark.pycaffe, pytest.mark.slow, pytest.mark.acceptance]

#: issue 14's bounds (main measured 1.089, 1.236 and 1.340 on 2026-12-03); the looser 1.5 / 2.0 /
#: 2.0 of before let a k-means patch subset pass at VGG16 1.603 (README)
FLATNESS = {"caffenet": 1.3, "googlenet": 1.6, "vgg16": 1.6}
#: with the LRN alphas (not an issue target; 1.297 and 1.416 on 2026-12-03, 1.199 and 1.279 at e45a9f9)
LRN_ALPHA_FLATNESS = {"caffenet": 1.5, "googlenet": 2.0}
# VGG16 is initialized by the numpy engine (faster than pycaffe on 2 cores) and measured in real
# Caffe on 64 held-out crops (pycaffe needs about 3 s per VGG16 image forward and backward here)
ENGINE = {"caffenet": "caffe", "googlenet": "caffe", "vgg16": "numpy"}
HELD_OUT = {"caffenet": 160, "googlenet": 160, "vgg16": 64}


@pytest.fixture(scope="module")
def split_photos(tmp_path_factory):
    assert len(opencv_doc_photos() + skimage_photos()) >= 100
    return held_out_split(tmp_path_factory.mktemp("photos"))


def _sample(prototxt, source, n, seed):
    """The crops the pipeline takes from ``source`` with ``seed`` (same order of RNG draws)."""
    prepared = magic.prepare_net(netio.read_net(prototxt))
    c, h, w = prepared.input_shape
    return prepared, images.load_sample(images.list_source(str(source)), n,
                                        images.Transform(c, h, w), np.random.RandomState(seed)).data


def _caffe_net(prepared, weights, batch):
    c, h, w = prepared.input_shape
    net = CaffeNet(prepared.net_param, weights=weights)
    net.blobs[prepared.input_name].reshape(batch, c, h, w)
    net.reshape()
    return net


@pytest.mark.parametrize("model", ["caffenet", "googlenet", "vgg16"])
def test_rates_are_flat_on_held_out_photos(caffe, split_photos, tmp_path, model):
    proto = f"models/{model}/deploy.prototxt"
    out = tmp_path / f"{model}.caffemodel"
    res = run(RunConfig(prototxt=proto, output=str(out),
                        sample=SampleSpec(data=str(split_photos["init"]), images=160),
                        options=magic.InitOptions(init="kmeans"), engine=ENGINE[model]))
    assert res.report.flatness_before > 100
    prepared, held_out = _sample(proto, split_photos["held_out"], HELD_OUT[model], seed=99)
    net = _caffe_net(prepared, out, 16)
    stats = measure.measure(net, prepared.input_name, held_out, seed=5)
    rates = measure.rates_of(stats)
    assert len(rates) == len(res.report.layers)
    flat = measure.flatness(rates)
    print(f"{model}: flatness {res.report.flatness_before:.3g} -> {res.report.flatness_after:.3f} "
          f"(initialization batch), {flat:.3f} held out")
    assert flat <= FLATNESS[model], rates


@pytest.mark.parametrize("model", ["caffenet", "googlenet", "vgg16"])
def test_within_layer_gives_unit_std_channels(caffe, split_photos, tmp_path, model):
    proto = f"models/{model}/deploy.prototxt"
    out = tmp_path / f"{model}.caffemodel"
    run(RunConfig(prototxt=proto, output=str(out), sample=SampleSpec(data=str(split_photos["init"]), images=160),
                  options=magic.InitOptions(init="kmeans", between=False, seed=4), engine=ENGINE[model]))
    prepared, sample = _sample(proto, split_photos["init"], 160, seed=4)
    net = _caffe_net(prepared, out, 16)
    affine = [lp for lp in prepared.net_param.layer if lp.type in ("Convolution", "InnerProduct")]
    names = net.layer_names
    sums = {lp.name: 0.0 for lp in affine}
    sq = {lp.name: 0.0 for lp in affine}
    count = {lp.name: 0 for lp in affine}
    for start in range(0, 160, 16):
        net.set_data(prepared.input_name, sample[start:start + 16])
        pos = 1
        for lp in affine:
            idx = names.index(lp.name)
            net.forward(start=names[pos], end=names[idx])
            pos = idx + 1
            top = np.asarray(net.blobs[lp.top[0]].data, np.float64)
            top = top.reshape(top.shape[0], top.shape[1], -1)
            sums[lp.name] = sums[lp.name] + top.sum(axis=(0, 2))
            sq[lp.name] = sq[lp.name] + (top * top).sum(axis=(0, 2))
            count[lp.name] += top.shape[0] * top.shape[2]
    for lp in affine:
        mean = sums[lp.name] / count[lp.name]
        std = np.sqrt(sq[lp.name] / count[lp.name] - mean * mean)
        assert np.all(np.abs(std - 1) <= 0.1), (lp.name, std.min(), std.max())
        np.testing.assert_allclose(mean, 0.1, atol=0.1, err_msg=lp.name)


@pytest.mark.parametrize("model", ["caffenet", "googlenet"])
def test_lrn_alpha_rates_are_flat_on_held_out_photos(caffe, split_photos, tmp_path, model):
    """With ``--output-prototxt`` stage 3 rescales through LRN exactly, in one solve; the net
    it writes, built by real Caffe with the written weights, has flat rates on the held-out
    photos too, and computes what the net computed after the within-layer stage."""
    proto, adjusted = f"models/{model}/deploy.prototxt", tmp_path / f"{model}.prototxt"
    out, within = tmp_path / f"{model}.caffemodel", tmp_path / f"{model}.within.caffemodel"
    sample = SampleSpec(data=str(split_photos["init"]), images=160)
    res = run(RunConfig(prototxt=proto, output=str(out), sample=sample, options=magic.InitOptions(init="kmeans"),
                        engine="numpy", output_prototxt=str(adjusted)))
    rep = res.report
    # no inexact layer is left, so the outputs on the check batch move by float32 rounding alone
    # (GoogLeNet's within-stage net: 4e-5 between the two engines; the report's bound is 1e-4)
    assert rep.passes == 0 and not rep.inexact_layers and len(rep.lrn_alphas) == 2 and rep.output_deviation < 3e-4
    run(RunConfig(prototxt=proto, output=str(within), sample=sample,
                  options=magic.InitOptions(init="kmeans", between=False), engine="numpy"))
    prepared, held_out = _sample(str(adjusted), split_photos["held_out"], HELD_OUT[model], seed=99)
    net = _caffe_net(prepared, out, 16)
    flat = measure.flatness(measure.rates_of(measure.measure(net, prepared.input_name, held_out, seed=5)))
    print(f"{model} with the LRN alphas: flatness {rep.flatness_before:.3g} -> {rep.flatness_after:.3f} "
          f"(initialization batch), {flat:.3f} held out")
    assert flat <= LRN_ALPHA_FLATNESS[model]
    before = _caffe_net(magic.prepare_net(netio.read_net(proto)), within, 16)
    for a in (net, before):
        a.set_data(prepared.input_name, held_out[:16])
        a.forward()
    for o in net.outputs:
        ref = np.asarray(before.blobs[o].data)
        assert np.max(np.abs(net.blobs[o].data - ref)) <= 1.5e-4 * np.max(np.abs(ref)), o
