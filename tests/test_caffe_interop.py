"""Caffe file interoperability against the real pycaffe (built by scripts/install_caffe.sh)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from caffe_utils import netio

pytestmark = pytest.mark.pycaffe

NET = """
name: "interop"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 group: 1 weight_filler { type: "gaussian" std: 0.1 }
                            bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "prelu" type: "PReLU" bottom: "conv1" top: "p" prelu_param { filler { type: "uniform" } } }
layer { name: "fc" type: "InnerProduct" bottom: "p" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } bias_filler { type: "gaussian" } } }
"""

_DUMP = textwrap.dedent("""
    import json, sys
    from caffe_utils.schema import caffe_pb2, schema_source
    pb2 = caffe_pb2()
    out = {"source": schema_source(), "fields": {}}
    def walk(d, prefix):
        for f in d.fields:
            out["fields"][prefix + d.name + "." + f.name] = [
                f.number, f.type, repr(f.default_value) if f.has_default_value else None]
        for e in d.enum_types:
            for v in e.values:
                out["fields"][prefix + d.name + "." + e.name + "." + v.name] = [v.number]
        for n in d.nested_types:
            walk(n, prefix + d.name + ".")
    for d in pb2.DESCRIPTOR.message_types_by_name.values():
        walk(d, "")
    for e in pb2.DESCRIPTOR.enum_types_by_name.values():
        for v in e.values:
            out["fields"][e.name + "." + v.name] = [v.number]
    json.dump(out, sys.stdout)
""")

# Fields of BVLC master newer than the Caffe commit we build (9b89154), and one default that
# the brocolli fork changed; everything else must agree exactly.
NEWER_THAN_BUILD = {"LayerParameter.clip_param", "LayerParameter.swish_param", "ClipParameter.min",
                    "ClipParameter.max", "SwishParameter.beta", "InfogainLossParameter.axis",
                    "PoolingParameter.round_mode", "PoolingParameter.RoundMode.CEIL",
                    "PoolingParameter.RoundMode.FLOOR", "SolverParameter.layer_wise_reduce",
                    "SolverParameter.weights"}
FORK_DEFAULTS = {"ConvolutionParameter.stride_h", "ConvolutionParameter.stride_w"}
# Fork fields of our schema (caffe_utils/proto/caffe.proto names their sources) that the
# brocolli fork lacks, and the clashes where we follow another fork than brocolli (written down
# in caffe.proto): OpenCV's proposal_param 201 (brocolli 1000), SSD's PriorBox clip default false
# and DetectionOutput save_file 12 (brocolli: true, 13).
FORK_ONLY_MESSAGES = {"ROIPoolingParameter", "SmoothL1LossParameter", "InterpParameter",
                      "ShuffleChannelParameter", "Type"}
FORK_ONLY = {"BlobProto.raw_data_type", "BlobProto.raw_data", "LayerParameter.shuffle_channel_param",
             "LayerParameter.interp_param", "LayerParameter.roi_pooling_param",
             "LayerParameter.smooth_l1_loss_param", "BatchNormParameter.scale_bias",
             "DropoutParameter.scale_train", "PriorBoxParameter.offset_h", "PriorBoxParameter.offset_w",
             "PriorBoxParameter.width", "PriorBoxParameter.height", "DetectionOutputParameter.normalized_bbox"}
FORK_CLASHES = {"LayerParameter.proposal_param", "PriorBoxParameter.clip", "DetectionOutputParameter.save_file"}


def _dump(builtin: bool) -> dict:
    env = dict(os.environ)
    if builtin:
        env["MAGIC_INIT_SCHEMA"] = "builtin"
    res = subprocess.run([sys.executable, "-c", _DUMP], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout)


def test_builtin_schema_matches_real_caffe(caffe):
    ours, real = _dump(True), _dump(False)
    assert ours["source"] == "builtin" and real["source"] == "pycaffe"
    problems = []
    for key, spec in ours["fields"].items():
        if key in NEWER_THAN_BUILD or key in FORK_CLASHES:
            continue
        if key not in real["fields"]:
            if key in FORK_ONLY or key.split(".")[0] in FORK_ONLY_MESSAGES:
                continue
            problems.append(f"{key} missing in Caffe's schema")
        elif key in FORK_DEFAULTS:
            if spec[:2] != real["fields"][key][:2]:
                problems.append(f"{key}: {spec} vs Caffe {real['fields'][key]}")
        elif spec != real["fields"][key]:
            problems.append(f"{key}: {spec} vs Caffe {real['fields'][key]}")
    assert not problems, problems
    # every BVLC message Caffe has is covered
    ours_msgs = {k.split(".")[0] for k in ours["fields"]}
    for msg in ["NetParameter", "LayerParameter", "V1LayerParameter", "V0LayerParameter", "SolverParameter",
                "BlobProto", "Datum", "TransformationParameter", "PReLUParameter", "BatchNormParameter",
                "ScaleParameter", "CropParameter", "InputParameter", "ReshapeParameter"]:
        assert msg in ours_msgs


def _caffe_net(caffe, tmp_path, weights=None):
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    caffe.set_random_seed(3)
    if weights is None:
        return caffe.Net(str(p), caffe.TEST), p
    return caffe.Net(str(p), str(weights), caffe.TEST), p


def test_read_caffe_saved_model_bit_for_bit(caffe, tmp_path):
    net, _ = _caffe_net(caffe, tmp_path)
    f = tmp_path / "caffe_saved.caffemodel"
    net.save(str(f))
    ours = netio.read_caffemodel(f)
    assert set(net.params) <= set(ours)
    for name, blobs in net.params.items():
        assert len(ours[name].blobs) == len(blobs)
        for b, a in zip(blobs, ours[name].blobs):
            assert a.shape == b.data.shape and a.tobytes() == np.ascontiguousarray(b.data).tobytes()


def test_caffe_loads_our_caffemodel(caffe, tmp_path):
    net, proto = _caffe_net(caffe, tmp_path)
    rng = np.random.RandomState(0)
    params = {n: [rng.standard_normal(b.data.shape).astype(np.float32) for b in bl] for n, bl in net.params.items()}
    f = tmp_path / "ours.caffemodel"
    netio.write_caffemodel(f, netio.read_net(proto), params)
    net.copy_from(str(f))
    loaded, _ = _caffe_net(caffe, tmp_path, weights=f)
    for n in (net, loaded):
        for name, blobs in n.params.items():
            for b, a in zip(blobs, params[name]):
                assert np.array_equal(b.data, a)


def _compare_real_model(caffe, tmp_path, prototxt: Path, caffemodel: Path) -> int:
    real = caffe.Net(str(prototxt), str(caffemodel), caffe.TEST)
    ours = netio.read_caffemodel(caffemodel)
    shapes = {n: [tuple(b.data.shape) for b in bl] for n, bl in real.params.items()}
    matched = netio.match_weights(shapes, ours, str(caffemodel))
    assert list(matched) == list(real.params)
    n = 0
    for name, blobs in real.params.items():
        for b, a in zip(blobs, matched[name]):
            assert a.shape == b.data.shape and np.array_equal(a, b.data), name
            n += 1
    # write them back, re-read losslessly, and Caffe loads the rewritten file identically
    out = tmp_path / (caffemodel.stem + ".rewritten.caffemodel")
    netio.write_caffemodel(out, netio.read_net(prototxt), matched)
    back = netio.match_weights(shapes, netio.read_caffemodel(out))
    reloaded = caffe.Net(str(prototxt), str(out), caffe.TEST)
    for name, blobs in real.params.items():
        for b, a, c in zip(blobs, back[name], reloaded.params[name]):
            assert a.tobytes() == np.ascontiguousarray(b.data).tobytes()
            assert np.array_equal(c.data, b.data)
    return n


def test_open_nsfw_resnet50_weights(caffe, tmp_path, nsfw_model):
    n = _compare_real_model(caffe, tmp_path, nsfw_model["prototxt"], nsfw_model["caffemodel"])
    assert n > 300  # conv, BatchNorm (3 blobs each), Scale (2 blobs), fc


@pytest.mark.parametrize("det", ["det1", "det2", "det3"])
def test_mtcnn_weights(caffe, tmp_path, mtcnn_models, det):
    files = mtcnn_models[det]
    assert "input_dim" in files["prototxt"].read_text()  # the legacy input form is exercised
    assert _compare_real_model(caffe, tmp_path, files["prototxt"], files["caffemodel"]) > 8
