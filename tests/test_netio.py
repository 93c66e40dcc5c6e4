"""Reading and writing Caffe files without pycaffe: prototxt, upgrades, caffemodel, mean."""
from __future__ import annotations


import numpy as np
import pytest

from caffe_utils import caffemodel, netio, wire
from caffe_utils.errors import OutputError, PrototxtError, ShapeMismatchError, WeightsError
from caffe_utils.schema import caffe_pb2

NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" include { phase: TRAIN } }
layer { name: "staged" type: "ReLU" bottom: "fc" top: "fc" include { stage: "deploy" } }
"""

V1_NET = """
name: "v1"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 10 input_dim: 10
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
         blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
         convolution_param { num_output: 2 kernel_size: 3 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "pool1" bottom: "label" top: "loss" include { phase: TRAIN } }
"""


def test_prototxt_round_trip(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    net = netio.read_net_text(p)
    again = netio.parse_net_text(netio.net_to_text(net))
    assert again == net
    assert [l.name for l in net.layer] == ["data", "conv1", "relu1", "fc", "acc", "drop", "staged"]
    assert net.layer[1].convolution_param.weight_filler.type == "xavier"


def test_phase_and_stage_filtering(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    assert [l.name for l in netio.read_net(p, "TEST").layer] == ["data", "conv1", "relu1", "fc", "acc"]
    assert [l.name for l in netio.read_net(p, "TRAIN").layer] == ["data", "conv1", "relu1", "fc", "drop"]
    assert [l.name for l in netio.read_net(p, "TEST", stages=["deploy"]).layer][-1] == "staged"


def test_exclude_and_level_rules():
    net = netio.parse_net_text("""
      layer { name: "a" type: "ReLU" exclude { phase: TEST } }
      layer { name: "b" type: "ReLU" include { min_level: 1 } }
      layer { name: "c" type: "ReLU" include { stage: "x" not_stage: "y" } }""")
    assert [l.name for l in netio.filter_net(net, netio.TEST).layer] == []
    assert [l.name for l in netio.filter_net(net, netio.TRAIN, level=1, stages=["x"]).layer] == ["a", "b", "c"]
    assert [l.name for l in netio.filter_net(net, netio.TRAIN, level=0, stages=["x", "y"]).layer] == ["a"]


def test_v1_prototxt_upgrade(tmp_path):
    p = tmp_path / "v1.prototxt"
    p.write_text(V1_NET)
    net = netio.read_net(p, "TRAIN")
    assert [(l.name, l.type) for l in net.layer] == [
        ("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("pool1", "Pooling"),
        ("loss", "SoftmaxWithLoss")]
    assert list(net.layer[0].top) == ["data"]
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 3, 10, 10]
    conv = net.layer[1]
    assert [(s.lr_mult, s.decay_mult) for s in conv.param] == [(1, 1), (2, 0)]
    assert conv.convolution_param.num_output == 2
    assert not len(net.layers) and not len(net.input)
    assert [l.name for l in netio.read_net(p, "TEST").layer][-1] == "pool1"


def test_v1_data_transformation_upgrade():
    net = netio.parse_net_text("""
      layers { name: "d" type: DATA top: "data" top: "label"
               data_param { source: "db" batch_size: 4 crop_size: 227 mirror: true mean_file: "m.binaryproto" scale: 0.5 } }""")
    netio.upgrade_net(net)
    tp = net.layer[0].transform_param
    assert (tp.crop_size, tp.mirror, tp.mean_file, tp.scale) == (227, True, "m.binaryproto", 0.5)
    assert not net.layer[0].data_param.HasField("crop_size")
    assert net.layer[0].type == "Data"


def test_input_shape_upgrade():
    net = netio.parse_net_text('input: "a" input_shape { dim: 1 dim: 2 } input: "b" input_shape { dim: 3 }'
                               ' layer { name: "r" type: "ReLU" bottom: "a" top: "a" }')
    netio.upgrade_net(net)
    assert net.layer[0].type == "Input" and list(net.layer[0].top) == ["a", "b"]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2], [3]]
    assert net.layer[1].name == "r"


def test_batchnorm_param_specs_are_cleared():
    net = netio.parse_net_text('layer { name: "bn" type: "BatchNorm" param { lr_mult: 0 } '
                               'param { lr_mult: 0 } param { lr_mult: 0 } }')
    netio.upgrade_net(net)
    assert len(net.layer[0].param) == 0


def test_syntax_error_gives_line_and_column(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text('layer {\n  name: "a"\n  type: "ReLU"\n  bogus_field: 3\n}\n')
    with pytest.raises(PrototxtError, match=r"bad.prototxt:4:\d+.*bogus_field"):
        netio.read_net(p)
    p.write_text('layer { name: "a" ')
    with pytest.raises(PrototxtError, match="line and column"):
        netio.read_net(p)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(PrototxtError, match="does not exist"):
        netio.read_net(tmp_path / "nope.prototxt")
    with pytest.raises(PrototxtError, match="is a directory"):
        netio.read_net(tmp_path)
    with pytest.raises(WeightsError, match="does not exist"):
        caffemodel.read_caffemodel(tmp_path / "nope.caffemodel")


def _params(rng):
    return {"conv1": [rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                      rng.standard_normal((4,)).astype(np.float32)],
            "fc": [rng.standard_normal((5, 256)).astype(np.float32),
                   rng.standard_normal((5,)).astype(np.float32)]}


def test_caffemodel_write_read_bit_identical(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    net = netio.read_net(p)
    params = _params(np.random.RandomState(0))
    out = tmp_path / "w.caffemodel"
    caffemodel.write_caffemodel(out, net, params)
    back = caffemodel.read_caffemodel(out)
    assert list(back) == [l.name for l in net.layer]
    for name, arrays in params.items():
        assert back[name].type == {"conv1": "Convolution", "fc": "InnerProduct"}[name]
        for a, b in zip(arrays, back[name].blobs):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()
    # protobuf itself parses our file into the same message
    msg = caffe_pb2().NetParameter.FromString(out.read_bytes())
    assert list(msg.layer[1].blobs[0].shape.dim) == [4, 3, 3, 3]
    assert np.array_equal(np.array(msg.layer[1].blobs[0].data, np.float32), params["conv1"][0].ravel())
    assert msg.layer[1].convolution_param.num_output == 4


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    net = netio.read_net(p)
    out = tmp_path / "w.caffemodel"
    out.write_bytes(b"old contents")

    class Interrupted:
        """Array-like whose conversion is interrupted half-way through writing the file (Ctrl-C)."""

        def __array__(self, *args, **kwargs):
            raise KeyboardInterrupt

    params = _params(np.random.RandomState(0))
    bad = dict(params)
    bad["fc"] = [params["fc"][0], Interrupted()]
    with pytest.raises(KeyboardInterrupt):
        caffemodel.write_caffemodel(out, net, bad)
    assert out.read_bytes() == b"old contents"
    assert [f.name for f in tmp_path.iterdir()] and not list(tmp_path.glob("*.part"))
    with pytest.raises(OutputError, match="does not exist"):
        caffemodel.write_caffemodel(tmp_path / "missing" / "w.caffemodel", net, params)
    with pytest.raises(OutputError, match="is a directory"):
        caffemodel.write_caffemodel(tmp_path, net, params)


def _v1_caffemodel(params) -> bytes:
    pb2 = caffe_pb2()
    net = pb2.NetParameter(name="v1")
    types = {"conv1": pb2.V1LayerParameter.CONVOLUTION, "fc": pb2.V1LayerParameter.INNER_PRODUCT}
    data = net.layers.add(name="data", type=pb2.V1LayerParameter.DATA)
    data.top.append("data")
    for name, arrays in params.items():
        l = net.layers.add(name=name, type=types[name])
        for a in arrays:
            b = l.blobs.add()
            legacy = (1,) * (4 - a.ndim) + a.shape
            b.num, b.channels, b.height, b.width = legacy
            b.data.extend(a.ravel().tolist())
    return net.SerializeToString()


def test_v1_caffemodel_with_legacy_shapes(tmp_path):
    params = _params(np.random.RandomState(1))
    f = tmp_path / "v1.caffemodel"
    f.write_bytes(_v1_caffemodel(params))
    w = caffemodel.read_caffemodel(f)
    assert list(w) == ["data", "conv1", "fc"]
    assert w["fc"].type == "InnerProduct" and w["fc"].blobs[0].shape == (1, 1, 5, 256)
    assert w["fc"].legacy_shape == [True, True]
    matched = caffemodel.match_weights({"conv1": [(4, 3, 3, 3), (4,)], "fc": [(5, 256), (5,)]}, w)
    for name, arrays in params.items():
        for a, b in zip(arrays, matched[name]):
            assert np.array_equal(a, b) and a.shape == b.shape


def test_shape_mismatch_names_layer_and_shapes(tmp_path):
    params = _params(np.random.RandomState(2))
    f = tmp_path / "v1.caffemodel"
    f.write_bytes(_v1_caffemodel(params))
    w = caffemodel.read_caffemodel(f)
    with pytest.raises(ShapeMismatchError, match=r"'fc' blob 0 .*\(1, 1, 5, 256\).*\(6, 256\)"):
        caffemodel.match_weights({"fc": [(6, 256), (6,)]}, w)
    with pytest.raises(ShapeMismatchError, match="'fc' has 2 blobs"):
        caffemodel.match_weights({"fc": [(5, 256)]}, w)


def test_training_weights_have_extra_layers(tmp_path):
    """Weights saved from a train net carry data/loss/split layers that a deploy net lacks."""
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    params = _params(np.random.RandomState(3))
    train = netio.parse_net_text('layer { name: "train_data" type: "Data" top: "data" }'
                                 'layer { name: "conv1" type: "Convolution" }'
                                 'layer { name: "fc" type: "InnerProduct" }'
                                 'layer { name: "loss" type: "SoftmaxWithLoss" }')
    f = tmp_path / "train.caffemodel"
    caffemodel.write_caffemodel(f, train, params)
    matched = caffemodel.match_weights({"conv1": [(4, 3, 3, 3), (4,)], "fc": [(5, 256), (5,)],
                                   "other": [(1,)]}, caffemodel.read_caffemodel(f))
    assert list(matched) == ["conv1", "fc"]


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b'name: "x"\nlayer { name: "a" }\n', "text prototxt"),
    (bytes(range(256)) * 4, "not a readable caffemodel"),
])
def test_bad_caffemodels(tmp_path, content, match):
    f = tmp_path / "bad.caffemodel"
    f.write_bytes(content)
    with pytest.raises(WeightsError, match=match):
        caffemodel.read_caffemodel(f)


def test_truncated_caffemodel(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    f = tmp_path / "w.caffemodel"
    caffemodel.write_caffemodel(f, netio.read_net(p), _params(np.random.RandomState(4)))
    data = f.read_bytes()
    (tmp_path / "t.caffemodel").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        caffemodel.read_caffemodel(tmp_path / "t.caffemodel")


def test_mean_round_trip(tmp_path):
    mean = np.random.RandomState(5).uniform(0, 255, (3, 7, 9)).astype(np.float32)
    f = tmp_path / "mean.binaryproto"
    caffemodel.write_mean(f, mean)
    back = caffemodel.read_mean(f)
    assert back.shape == (3, 7, 9) and np.array_equal(back, mean)
    bp = caffe_pb2().BlobProto.FromString(f.read_bytes())
    assert (bp.num, bp.channels, bp.height, bp.width) == (1, 3, 7, 9)


def test_wire_varint_round_trip():
    for v in [0, 1, 127, 128, 300, 2**31 - 1, 2**40]:
        enc = wire.encode_varint(v)
        assert wire.read_varint(memoryview(enc), 0, len(enc)) == (v, len(enc))
    with pytest.raises(wire.WireFormatError):
        wire.read_varint(memoryview(b"\x80\x80"), 0, 2)


def test_netio_keeps_the_caffemodel_names():
    """Weights and mean files moved to caffe_utils.caffemodel; netio still offers them."""
    for name in ("CaffemodelFile", "LayerWeights", "copy_caffemodel_into", "match_weights",
                 "parse_caffemodel_bytes", "read_caffemodel", "read_mean", "write_caffemodel", "write_mean"):
        assert name in netio.__all__
        assert getattr(netio, name) is getattr(caffemodel, name)
