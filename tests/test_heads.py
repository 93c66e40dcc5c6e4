"""Heads the method ends at: an SSD-style detector's DetectionOutput (no backward in Caffe) and
its PriorBoxes (functions of shapes only) are dropped, and the random top gradient goes on the
loc/conf predictions instead, on both engines."""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils import netio
from caffe_utils.magic import InitOptions, prepare_net
from caffe_utils.pipeline import RunConfig, SampleSpec, format_report, run

SSD = """
name: "ssd-tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "norm" type: "Normalize" bottom: "conv2" top: "norm"
        norm_param { across_spatial: false channel_shared: false scale_filler { type: "constant" value: 20 } } }
layer { name: "loc" type: "Convolution" bottom: "norm" top: "loc" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" flatten_param { axis: 1 } }
layer { name: "conf" type: "Convolution" bottom: "norm" top: "conf" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" flatten_param { axis: 1 } }
layer { name: "prior" type: "PriorBox" bottom: "norm" bottom: "data" top: "prior"
        prior_box_param { min_size: 8 max_size: 16 clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: "conf_reshape" type: "Reshape" bottom: "conf_flat" top: "conf_reshape"
        reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" softmax_param { axis: 2 } }
layer { name: "conf_out" type: "Flatten" bottom: "conf_softmax" top: "conf_out" flatten_param { axis: 1 } }
layer { name: "det" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_out" bottom: "prior" top: "det"
        detection_output_param { num_classes: 3 share_location: true background_label_id: 0
          nms_param { nms_threshold: 0.45 top_k: 10 } keep_top_k: 5 confidence_threshold: 0.01 code_type: CENTER_SIZE } }
"""


def test_prepare_drops_heads_and_priors(tmp_path):
    p = tmp_path / "ssd.prototxt"
    p.write_text(SSD)
    prepared = prepare_net(netio.read_net(str(p)))
    assert prepared.heads == ["det", "prior"]
    kept = [lp.name for lp in prepared.net_param.layer]
    assert "det" not in kept and "prior" not in kept and "loc_flat" in kept and "conf_out" in kept


@pytest.mark.parametrize("engine", ["numpy", "caffe"])
def test_ssd_style_net_initializes_on_both_engines(request, tmp_path, photos, engine):
    if engine == "caffe":
        request.getfixturevalue("caffe")
    p = tmp_path / "ssd.prototxt"
    p.write_text(SSD)
    out = tmp_path / "ssd.caffemodel"
    res = run(RunConfig(prototxt=str(p), output=str(out), sample=SampleSpec(data=photos, images=8),
                        options=InitOptions(init="kmeans", batch_size=4, iterations=3), engine=engine))
    rep = res.report
    assert rep.heads == ["det", "prior"]
    assert "heads the method ends at" in format_report(res)
    assert all(np.isfinite(l.rate_after) for l in rep.layers)
    assert rep.function_preserved, rep.output_deviation
    weights = netio.read_caffemodel(out)
    assert {"conv1", "conv2", "norm", "loc", "conf"} <= set(weights)


def test_pycaffe_engine_guards_a_backward_caffe_lacks(caffe, tmp_path):
    """Built whole (heads not dropped), the net's DetectionOutput has no backward in Caffe: the
    engine refuses the backward pass, naming the layer, where Caffe would abort."""
    from caffe_utils.engine import open_net
    from caffe_utils.errors import MagicInitError
    p = tmp_path / "ssd.prototxt"
    p.write_text(SSD)
    net = open_net(str(p), engine="caffe")
    net.forward()
    with pytest.raises(MagicInitError) as err:
        net.backward()
    msg = str(err.value)
    assert "'det' (DetectionOutput)" in msg and "\n" not in msg


def test_pycaffe_probe_accepts_a_net_that_needs_its_batch(caffe, tmp_path):
    """A Reshape to fixed dims fails on one image but not at the batch the net is built for: the
    probe tries the net as built before calling it broken."""
    from caffe_utils.engine import open_net
    p = tmp_path / "fixed.prototxt"
    p.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }\n'
                 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                 'convolution_param { num_output: 2 kernel_size: 3 } }\n'
                 'layer { name: "r" type: "Reshape" bottom: "c" top: "r" reshape_param { shape { dim: 4 dim: 72 } } }\n'
                 'layer { name: "fc" type: "InnerProduct" bottom: "r" top: "fc" inner_product_param { num_output: 3 } }\n')
    net = open_net(str(p), engine="caffe")
    assert net.blobs["r"].data.shape == (4, 72)


UPSAMPLED = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "up" type: "Upsample" bottom: "conv1" top: "up" upsample_param { scale: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "up" top: "conv2" convolution_param { num_output: 2 kernel_size: 1 } }
"""


def test_pycaffe_engine_refuses_a_backward_that_passes_no_gradient(caffe, tmp_path):
    """brocolli-caffe's Upsample has an empty CPU backward (``Backward_cpu(...) {}`` in its
    upsample_layer.hpp): no abort, but conv1 would get no gradient through it. The engine finds
    it by running that layer's backward alone at build time and refuses a backward through it;
    the numpy engine has the gradient."""
    from caffe_utils.engine import open_net
    from caffe_utils.errors import EngineError
    p = tmp_path / "up.prototxt"
    p.write_text(UPSAMPLED)
    net = open_net(str(p), engine="caffe")
    assert net.no_gradient_layers == ["up"]
    net.forward()  # forward-only use stays allowed
    with pytest.raises(EngineError) as err:
        net.backward()
    msg = str(err.value)
    assert "'up' (Upsample)" in msg and "--engine numpy" in msg and "\n" not in msg
    net.check_backward(start="conv2", end="conv2")  # a backward that stops above it is fine
    ours = open_net(str(p), engine="numpy")
    rng = np.random.RandomState(0)
    for blobs in ours.params.values():
        for b in blobs:
            b.data[...] = rng.standard_normal(b.data.shape)
    ours.blobs["data"].data[...] = rng.standard_normal(ours.blobs["data"].shape)
    ours.forward()
    ours.blobs["conv2"].diff[...] = 1
    ours.backward()
    assert np.any(ours.params["conv1"][0].diff)


def test_cli_refuses_an_upsample_net_on_pycaffe_in_one_line(caffe, tmp_path, photos):
    from click.testing import CliRunner
    from magic_init import cli
    p = tmp_path / "up.prototxt"
    p.write_text(UPSAMPLED)
    out = tmp_path / "up.caffemodel"
    base = [str(p), "-o", str(out), "-d", photos, "-n", "4", "--batch-size", "4", "--engine", "caffe"]
    res = CliRunner().invoke(cli, base)
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "'up' (Upsample)" in lines[0] and "--engine numpy" in lines[0], res.output
    assert not out.exists()
    # the numpy engine initializes it
    res = CliRunner().invoke(cli, base[:-1] + ["numpy", "-q"])
    assert res.exit_code == 0, res.output
    assert out.exists()
