"""Fork schema fields (SSD, Faster R-CNN, OpenCV, mobile forks) and FP16 caffemodels.

Nets are small inline prototxts. The schema tests run in this process (whichever schema it
prefers) and again in child processes with and without pycaffe, so both configurations are
covered on every run. The OpenCV tests load our output with ``cv2.dnn.readNetFromCaffe``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from caffe_utils import netio, wire
from caffe_utils.errors import OutputError, PrototxtError, WeightsError
from reference import require_cv2

ROOT = Path(__file__).resolve().parent.parent

# one layer per fork field of caffe_utils/proto/caffe.proto (the nets are only parsed)
FORK_NET = """
name: "forks"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "perm" type: "Permute" bottom: "data" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "norm" type: "Normalize" bottom: "data" top: "norm"
        norm_param { across_spatial: false channel_shared: false eps: 1e-10 scale_filler { type: "constant" value: 20 } } }
layer { name: "prior" type: "PriorBox" bottom: "data" bottom: "data" top: "prior"
        prior_box_param { min_size: 30 max_size: 60 aspect_ratio: 2 flip: true clip: false
                          variance: 0.1 variance: 0.2 step: 8 offset: 0.5 } }
layer { name: "det" type: "DetectionOutput" bottom: "perm" bottom: "norm" bottom: "prior" top: "det"
        detection_output_param { num_classes: 2 share_location: true background_label_id: 0
                                 nms_param { nms_threshold: 0.45 top_k: 100 } code_type: CENTER_SIZE
                                 keep_top_k: 10 confidence_threshold: 0.01 } }
layer { name: "roi" type: "ROIPooling" bottom: "data" bottom: "rois" top: "roi"
        roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 0.0625 } }
layer { name: "py" type: "Python" bottom: "data" top: "py"
        python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" param_str: "'feat_stride': 16" } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }
layer { name: "relu6" type: "ReLU6" bottom: "data" top: "relu6" }
layer { name: "up" type: "Upsample" bottom: "data" top: "up" upsample_param { scale: 2 } }
layer { name: "interp" type: "Interp" bottom: "data" top: "interp" interp_param { zoom_factor: 2 } }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "data" top: "shuffle" shuffle_channel_param { group: 3 } }
layer { name: "dw" type: "DepthwiseConvolution" bottom: "data" top: "dw"
        convolution_param { num_output: 3 group: 3 kernel_size: 3 } }
"""

# fields the project's schema has that pycaffe's (brocolli-caffe) may lack
BUILTIN_ONLY_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR } }
layer { name: "interp" type: "Interp" bottom: "data" top: "interp" interp_param { zoom_factor: 2 } }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "data" top: "shuffle" shuffle_channel_param { group: 3 } }
layer { name: "roi" type: "ROIPooling" bottom: "data" bottom: "rois" top: "roi"
        roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 0.0625 } }
"""

SMALL_NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
"""


def _check_fork_net(net) -> None:
    """The fork fields of FORK_NET read back with their values."""
    layers = {lp.name: lp for lp in net.layer}
    assert list(layers["perm"].permute_param.order) == [0, 2, 3, 1]
    assert layers["norm"].norm_param.scale_filler.value == 20
    assert list(layers["prior"].prior_box_param.min_size) == [30]
    assert list(layers["prior"].prior_box_param.variance) == pytest.approx([0.1, 0.2])
    assert layers["det"].detection_output_param.nms_param.top_k == 100
    assert layers["det"].detection_output_param.keep_top_k == 10
    assert layers["roi"].roi_pooling_param.pooled_h == 2
    assert layers["py"].python_param.layer == "ProposalLayer"
    assert layers["pool"].pooling_param.ceil_mode is False
    assert layers["up"].upsample_param.scale == 2
    assert layers["interp"].interp_param.zoom_factor == 2
    assert layers["shuffle"].shuffle_channel_param.group == 3
    assert layers["dw"].convolution_param.group == 3


def test_fork_fields_parse():
    _check_fork_net(netio.read_net(netio.parse_net_text(FORK_NET)))


_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    from caffe_utils import netio
    from caffe_utils.schema import schema_source, is_builtin
    import test_forks
    for text in (test_forks.FORK_NET, test_forks.BUILTIN_ONLY_NET):
        net = netio.read_net(netio.parse_net_text(text))
    test_forks._check_fork_net(netio.read_net(netio.parse_net_text(test_forks.FORK_NET)))
    print(schema_source())
""")


def _child(builtin: bool) -> str:
    env = dict(os.environ)
    if builtin:
        env["MAGIC_INIT_SCHEMA"] = "builtin"
    res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


def test_fork_fields_parse_with_builtin_schema():
    assert _child(True) == "builtin"


@pytest.mark.pycaffe
def test_fork_fields_parse_where_pycaffe_is_importable(caffe):
    assert _child(False) == "pycaffe"


def test_fields_pycaffe_may_lack_parse():
    net = netio.read_net(netio.parse_net_text(BUILTIN_ONLY_NET))
    assert {lp.name for lp in net.layer} >= {"pool", "interp", "shuffle", "roi"}


def test_unknown_field_one_line_error():
    text = SMALL_NET.replace("kernel_size: 3 }", "kernel_size: 3 kernal_shape: 2 }")
    with pytest.raises(PrototxtError) as ei:
        netio.parse_net_text(text, "net.prototxt")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("net.prototxt:5:")
    assert 'ConvolutionParameter has no field named "kernal_shape"' in msg
    assert "not in BVLC Caffe or the forks we read" in msg


def test_syntax_error_keeps_its_message():
    with pytest.raises(PrototxtError, match="fix the prototxt syntax"):
        netio.parse_net_text('layer { name: "x" ', "bad.prototxt")


@pytest.mark.parametrize("option,expected", [("", 5), ("ceil_mode: false", 4), ("ceil_mode: true", 5),
                                             ("round_mode: FLOOR", 4), ("round_mode: CEIL", 5)])
def test_pooling_rounding_either_field(tmp_path, option, expected):
    """ceil_mode (forks, OpenCV) and round_mode (BVLC) both choose the rounding."""
    from caffe_utils.engine import open_net
    text = f"""
    layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 1 dim: 10 dim: 10 }} }} }}
    layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"
             pooling_param {{ pool: MAX kernel_size: 3 stride: 2 {option} }} }}
    """
    p = tmp_path / "pool.prototxt"
    p.write_text(text)
    try:
        net = open_net(p, engine="numpy")
    except PrototxtError as exc:  # pycaffe's schema and ours lack nothing here; never expected
        pytest.fail(str(exc))
    assert net.blobs["pool"].data.shape[2] == expected


# ----------------------------------------------------------------------------- FP16 caffemodels

def _fp16_blob(array: np.ndarray) -> bytes:
    """A BlobProto as OpenCV's FP16 models store it, built from wire bytes: shape (7),
    raw_data_type (10) = FLOAT16 (2 in opencv-caffe.proto's enum Type) and raw_data (12)."""
    raw = np.ascontiguousarray(array, dtype="<f2").tobytes()
    dims = b"".join(wire.encode_varint(d) for d in array.shape)
    shape = wire.len_prefix(1, len(dims)) + dims
    return (wire.len_prefix(7, len(shape)) + shape + wire.encode_key(10, wire.VARINT) + wire.encode_varint(2)
            + wire.len_prefix(12, len(raw)) + raw)


def _layer(name: str, ltype: str, blobs) -> bytes:
    body = wire.len_prefix(1, len(name)) + name.encode() + wire.len_prefix(2, len(ltype)) + ltype.encode()
    for b in blobs:
        body += wire.len_prefix(7, len(b)) + b
    return wire.len_prefix(100, len(body)) + body


def _halves(shape, seed: int) -> np.ndarray:
    """Random values that float16 holds exactly."""
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float16).astype(np.float32)


def test_handmade_fp16_caffemodel_reads_exactly(tmp_path):
    w, b = _halves((4, 3, 3, 3), 0), _halves((4,), 1)
    f = tmp_path / "fp16.caffemodel"
    f.write_bytes(_layer("conv1", "Convolution", [_fp16_blob(w), _fp16_blob(b)]))
    for got in (netio.read_caffemodel(f), netio.parse_caffemodel_bytes(f.read_bytes())):
        assert got["conv1"].blobs[0].dtype == np.float32
        assert np.array_equal(got["conv1"].blobs[0], w) and np.array_equal(got["conv1"].blobs[1], b)
    params = {"conv1": [np.zeros((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)]}
    assert list(netio.copy_caffemodel_into(f, params)) == ["conv1"]
    assert np.array_equal(params["conv1"][0], w) and np.array_equal(params["conv1"][1], b)


def test_mixed_fp16_fp32_layers(tmp_path):
    w16, w32 = _halves((5, 4), 2), np.random.RandomState(3).standard_normal((5, 4)).astype(np.float32)
    f = tmp_path / "mixed.caffemodel"
    f.write_bytes(_layer("a", "InnerProduct", [_fp16_blob(w16)])
                  + _layer("b", "InnerProduct", [wire.encode_blob(w32)]))
    got = netio.read_caffemodel(f)
    assert np.array_equal(got["a"].blobs[0], w16) and np.array_equal(got["b"].blobs[0], w32)


def test_fp16_writer_round_trip(tmp_path):
    net = netio.parse_net_text(SMALL_NET)
    params = {"conv1": [_halves((4, 3, 3, 3), 4), _halves((4,), 5)], "fc": [_halves((5, 64), 6), _halves((5,), 7)]}
    f16, f32 = tmp_path / "h.caffemodel", tmp_path / "f.caffemodel"
    netio.write_caffemodel(f16, net, params, blob_dtype="float16")
    netio.write_caffemodel(f32, net, params)
    assert f16.stat().st_size < 0.6 * f32.stat().st_size
    for f in (f16, f32):
        got = netio.read_caffemodel(f)
        for name, arrays in params.items():
            assert all(np.array_equal(a, g) for a, g in zip(arrays, got[name].blobs))
    bp = netio.caffe_pb2().NetParameter.FromString(f32.read_bytes()).layer[1].blobs[0]
    assert len(bp.data) == 4 * 27  # float32 output is plain BVLC 'data'


def test_fp16_writer_refuses_out_of_range(tmp_path):
    net = netio.parse_net_text(SMALL_NET)
    params = {"fc": [np.full((5, 64), 1e6, np.float32), np.zeros(5, np.float32)]}
    with pytest.raises(OutputError, match="beyond float16's range"):
        netio.write_caffemodel(tmp_path / "x.caffemodel", net, params, blob_dtype="float16")


@pytest.mark.parametrize("raw_type,error", [(3, "of type INT"), (None, "no raw_data_type")])
def test_unreadable_raw_data(tmp_path, raw_type, error):
    raw = np.arange(4, dtype="<i4").tobytes()
    blob = wire.len_prefix(12, len(raw)) + raw
    if raw_type is not None:
        blob = wire.encode_key(10, wire.VARINT) + wire.encode_varint(raw_type) + blob
    f = tmp_path / "int.caffemodel"
    f.write_bytes(_layer("a", "InnerProduct", [blob]))
    with pytest.raises(WeightsError, match=error):
        netio.read_caffemodel(f)


# ----------------------------------------------------------------------------- OpenCV

@pytest.mark.parametrize("blob_dtype", ["float32", "float16"])
def test_opencv_loads_our_caffemodel(tmp_path, blob_dtype):
    """cv2.dnn reads our float32 and FP16 output and computes what our numpy engine computes."""
    cv2 = require_cv2()
    from caffe_utils.engine import open_net
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL_NET)
    params = {"conv1": [_halves((4, 3, 3, 3), 8), _halves((4,), 9)], "fc": [_halves((5, 64), 10), _halves((5,), 11)]}
    f = tmp_path / f"{blob_dtype}.caffemodel"
    netio.write_caffemodel(f, netio.read_net(proto), params, blob_dtype=blob_dtype)
    x = np.random.RandomState(12).standard_normal((2, 3, 9, 9)).astype(np.float32)
    ours = open_net(proto, f, engine="numpy")
    ours.blobs["data"].data[...] = x
    want = ours.forward()["fc"].copy()
    cv_net = cv2.dnn.readNetFromCaffe(str(proto), str(f))
    cv_net.setInput(x)
    got = cv_net.forward("fc")
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-4)


@pytest.mark.pycaffe
def test_pycaffe_engine_on_fork_fields_suggests_numpy(caffe, tmp_path):
    from caffe_utils.engine import open_net
    from caffe_utils.errors import EngineError, UnsupportedLayerError
    p = tmp_path / "fork.prototxt"
    p.write_text(BUILTIN_ONLY_NET)
    with pytest.raises((EngineError, UnsupportedLayerError)) as ei:
        open_net(p, engine="caffe")
    assert "--engine numpy" in str(ei.value) and "\n" not in str(ei.value)



def test_run_writes_fp16_on_request(small, photos, tmp_path):
    """--fp16 stores the same weights as the float32 run, rounded to float16, in half the bytes."""
    from caffe_utils.magic import InitOptions
    from caffe_utils.pipeline import RunConfig, SampleSpec, run
    outs = {}
    for fp16 in (False, True):
        outs[fp16] = tmp_path / f"out{int(fp16)}.caffemodel"
        run(RunConfig(prototxt=str(small), output=str(outs[fp16]), sample=SampleSpec(data=photos, images=8),
                      options=InitOptions(init="gaussian", batch_size=4, iterations=1), engine="numpy", fp16=fp16))
    full, half = (netio.read_caffemodel(outs[k]) for k in (False, True))
    for name, layer in full.items():
        for a, b in zip(layer.blobs, half[name].blobs):
            np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32))
    assert outs[True].stat().st_size < 0.6 * outs[False].stat().st_size
